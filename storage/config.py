"""Where state lives and where data comes from: flags, then environment, then defaults."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from storage.atomic import ensure_writable_dir
from storage.mnist import DEFAULT_MIRRORS

DEFAULT_HOME = "~/.digitflow"


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """``--home``, else ``$DIGITFLOW_HOME``, else ``~/.digitflow``; created and proven writable."""
    return ensure_writable_dir(home or os.environ.get("DIGITFLOW_HOME") or DEFAULT_HOME)


def resolve_mirrors(mirrors: Sequence[str] | None = None) -> list[str]:
    """``--mirror`` flags in order, else ``$DIGITFLOW_MIRRORS`` (comma/space separated), else the public ones."""
    if mirrors:
        return list(mirrors)
    env = os.environ.get("DIGITFLOW_MIRRORS", "").strip()
    if env:
        return [m for m in re.split(r"[,\s]+", env) if m]
    return list(DEFAULT_MIRRORS)
