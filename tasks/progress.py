"""A process-wide hook for progress (mirror downloads, bucket transfers, training epochs), so
the CLI can draw bars for tasks.

Tasks run in this process (threads), so a plain callback suffices. No hook: no output.
"""

from __future__ import annotations

from typing import Callable

_hook: Callable[[str, int, int | None], None] | None = None


def set_hook(hook: Callable[[str, int, int | None], None] | None) -> None:
    global _hook
    _hook = hook


def report(name: str, done: int, total: int | None) -> None:
    if _hook is not None:
        _hook(name, done, total)
