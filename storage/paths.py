"""Paths built from text we do not control stay inside their root. No Prefect.

Every path digitflow builds from a URL (a bucket prefix), a spec field (dataset, split and file
names), a model name, or a key listed in a bucket goes through ``inside(root, rel)``: the
relative part must be plain segments (no empty, ``.`` or ``..`` segment, no backslash, no NUL,
not absolute) and the joined path, normalized, must still be under ``root``. Anything else is
one ``PathError`` line, raised before anything is read, written or deleted.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from storage import DigitflowError


class PathError(DigitflowError):
    pass


def check_rel(rel: str, what: str = "path") -> str:
    """``rel`` as plain ``/``-separated segments, or a PathError naming what it is."""
    if not isinstance(rel, str) or "\\" in rel or "\0" in rel or rel.startswith("/"):
        raise PathError(f"{what} {rel!r}: not a plain relative path")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise PathError(f"{what} {rel!r}: empty, '.' or '..' segments are not allowed")
    return rel


def inside(root: str | os.PathLike, rel: str, what: str = "path") -> Path:
    """``root / rel``, proven to stay under ``root`` (``rel`` checked by ``check_rel``)."""
    check_rel(rel, what)
    base = os.path.normpath(os.path.abspath(root))
    joined = os.path.normpath(os.path.join(base, *PurePosixPath(rel).parts))
    if os.path.commonpath([base, joined]) != base:
        raise PathError(f"{what} {rel!r}: leaves {base}")
    return Path(joined)
