"""A process-wide hook for progress (mirror downloads, bucket transfers, training epochs), so
the CLI can draw bars for tasks.

Tasks run in this process (threads), so a plain callback suffices. No hook: no output.
"""

from __future__ import annotations

from typing import Callable

_hook: Callable[[str, float, float | None, str | None], None] | None = None


def set_hook(hook: Callable[[str, float, float | None, str | None], None] | None) -> None:
    global _hook
    _hook = hook


def report(name: str, done: float, total: float | None, text: str | None = None) -> None:
    """``done`` of ``total`` (bytes, epochs); ``text``: what to show beside the bar, if anything."""
    if _hook is not None:
        _hook(name, done, total, text)


def on_batch(callback):
    """``callback`` while someone draws progress, else None (nn.fit then skips the calls)."""
    return callback if _hook is not None else None
