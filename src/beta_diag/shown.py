"""Text from files and paths, shown literally on the terminal and in plots.

Class names, metadata values, layer names and paths come from files a user was handed. On the way to
the terminal each is made inert: control characters (escape sequences, newlines, tabs, bidi controls)
become visible escapes such as ``\\x1b``, and long values are cut with an ellipsis (``plain``). Our consoles
(``ShownConsole``) parse no rich markup, so ``[bold red]`` or ``[link=file:///etc/passwd]`` prints as itself,
and they print no control character but the newline whatever reaches them. In plots a ``$`` is literal
(``plots`` turns matplotlib's mathtext off).
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.text import Text

LONG = 120  # characters kept of one name or value before the ellipsis


def _visible(c: str) -> str:
    """One character as itself when printable (a plain space included), else as an escape."""
    if c.isprintable():
        return c
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def plain(value: object, limit: int | None = LONG) -> str:
    """``value`` as one line of visible characters, cut to ``limit`` (None: whole); for print() and rich Text."""
    text = "".join(_visible(c) for c in str(value))
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "\u2026"


def lines(text: str) -> str:
    """``text`` with every control character but the newline made visible: what our consoles print of any string."""
    return "\n".join(plain(part, None) for part in text.split("\n"))


class ShownConsole(Console):
    """A rich console that parses no markup or emoji codes and prints no control character but the newline:
    whatever a string holds is printed as itself (styles come from ``Text`` objects, never from text)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(markup=False, emoji=False, highlight=False, **kwargs)

    def render_str(self, text: str, **kwargs: Any) -> Text:
        return super().render_str(lines(text), **kwargs)


def bold(text: str, style: str = "bold") -> Text:
    """One line of ours, styled (``text`` already holds only ``plain`` names)."""
    return Text(lines(text), style=style)


def times(x: float | None) -> str:
    """A jump for people: x1,800 reads as ``1,800``; two significant digits below 10."""
    if x is None or not math.isfinite(x):
        return "inf"
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"
