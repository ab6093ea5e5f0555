"""Text we did not write, escaped for where it lands. No Prefect.

Class names, spec sources, lineage values and anything else read from a spec file or a version
folder may hold markup or control characters. Each target has one function:

- ``md``: Markdown (report.md, the dashboard's artifacts): control characters become spaces and
  every character that can start markup is backslash-escaped (emphasis, code, links, images,
  HTML tags and entities, table cells, headings, math; at the start, list and heading
  markers), so no heading, table cell, link, image or tag can be started from inside the text;
  other punctuation (``-``, ``.``, ``:``) stays readable;
- ``terminal``: one line on a terminal: control characters (newlines, escape sequences,
  bidirectional overrides) are shown as ``\\x..``/``\\u....`` instead of acting.

HTML is escaped where HTML is made (the API page sets ``textContent``, never ``innerHTML``).
"""

from __future__ import annotations

import re
import unicodedata

_MARKUP = re.compile("([" + re.escape("\\`*_[]<>!|#~&$") + "])")
_LINE_START = re.compile(r"^(\s*)([-+=:]|\d+(?=[.)]))")  # a list item, a setext underline, an ordered item


def _is_control(ch: str) -> bool:
    # Cc: C0/C1 controls (newline, ESC, DEL); Cf: format characters (bidi overrides, zero-width);
    # Zl/Zp: line and paragraph separators.
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")


def md(text) -> str:
    """``text`` as literal Markdown inline text: no markup in it takes effect."""
    flat = "".join(" " if _is_control(ch) else ch for ch in str(text))
    escaped = _MARKUP.sub(r"\\\1", flat)
    return _LINE_START.sub(lambda m: m.group(1) + ("\\" + m.group(2) if not m.group(2).isdigit()
                                                   else m.group(2) + "\\"), escaped)


def terminal(text) -> str:
    """``text`` on one terminal line: control characters made visible, never executed."""
    def show(ch: str) -> str:
        return ch.encode("unicode_escape").decode("ascii") if _is_control(ch) else ch
    return "".join(show(ch) for ch in str(text))


def has_control(text: str) -> bool:
    return any(_is_control(ch) for ch in text)


def count(n: int, noun: str) -> str:
    """``1 epoch``, ``12 epochs``: a number and its noun, for messages and names."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
