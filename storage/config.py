"""Where state lives and where data comes from: flags, then environment, then defaults."""

from __future__ import annotations

import os
from typing import Sequence

from storage import DigitflowError
from storage.home import DEFAULT_HOME, Home  # noqa: F401 (DEFAULT_HOME re-exported)
from storage.download import DEFAULT_TIMEOUT  # noqa: F401 (one source, re-exported)
from storage.mnist import DEFAULT_MIRRORS
from storage.settings import settings

def resolve_home(home: str | os.PathLike | None = None) -> Home:
    """``--home``, else ``$DIGITFLOW_HOME``, else ``~/.digitflow``; created and proven writable."""
    return Home.resolve(home)


def resolve_mirrors(mirrors: Sequence[str] | None = None, default: Sequence[str] = DEFAULT_MIRRORS) -> list[str]:
    """``--mirror`` flags in order, else ``$DIGITFLOW_MIRRORS`` (comma/space separated), else the
    dataset's public ones (``default``; MNIST's unless given)."""
    if mirrors:
        return list(mirrors)
    return settings().mirrors or list(default)


# Defaults and bounds of the ingest settings, checked once before any work (flag or parameter).
DEFAULT_ROWS_PER_SHARD = 10_000
DEFAULT_RETRIES = 3
INGEST_BOUNDS = {
    "rows_per_shard": (1, 1_000_000),
    "timeout": (0.1, 3600.0),     # seconds of silence before a mirror counts as failed
    "retries": (0, 10),           # retries of a download after transient failures
    "deadline": (1.0, 86_400.0),  # seconds one mirror may take for one file (None: from its size)
}


def check_ingest_settings(**settings) -> None:
    """Raise a one-line DigitflowError for the first setting outside its bounds."""
    for name, value in settings.items():
        if value is None and name == "deadline":
            continue
        low, high = INGEST_BOUNDS[name]
        whole = isinstance(low, int)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and not isinstance(value, int)) \
                or not low <= value <= high:
            flag = "--" + name.replace("_", "-")
            raise DigitflowError(f"{flag} must be {'an integer' if whole else 'a number'} in {low}..{high}, "
                                 f"got {value!r}")
