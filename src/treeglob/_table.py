"""Aligned text tables for the report and the command line, optionally coloured."""

from __future__ import annotations

import textwrap
from collections.abc import Callable

__all__ = ["Painter", "painter", "render_table"]

#: `paint(row, column, padded cell, cell text)` -> the cell as printed.
Painter = Callable[[int, int, str, str], str]

_COLORS = ("32", "33", "36", "35", "34", "31")  # green, yellow, cyan, magenta, blue, red


def painter(color: bool, labels: list[str] = [], label_column: int = -1) -> Painter:  # noqa: B006 (read only)
    """Bold headers and one colour per label in `label_column`; plain text without `color`."""

    def style(row: int, col: int, cell: str, text: str) -> str:
        if not color:
            return cell
        if row == 0:
            return f"\033[1m{cell}\033[0m"
        if col == label_column and text in labels:
            return f"\033[{_COLORS[labels.index(text) % len(_COLORS)]}m{cell}\033[0m"
        return cell

    return style


def render_table(
    table: list[tuple[str, ...]],
    right: set[int],
    long: int,
    width: int | None = None,
    paint: Painter | None = None,
    wrap: bool = False,
) -> list[str]:
    """Aligned columns (row 0 is the header). When wider than `width`, column
    `long` goes on a line of its own (wrapped to `width` if `wrap`; paths are
    never wrapped), the other columns aligned on an indented line below it."""
    style: Painter = paint or (lambda row, col, padded, text: padded)

    def align(cols: list[int], indent: str) -> list[str]:
        widths = {c: max(len(r[c]) for r in table) for c in cols}
        out = []
        for i, r in enumerate(table):
            cells = [
                style(i, c, r[c].rjust(widths[c]) if c in right else r[c].ljust(widths[c]), r[c])
                for c in cols
            ]
            out.append((indent + "  ".join(cells)).rstrip())
        return out

    columns = range(len(table[0]))
    full_width = sum(max(len(r[c]) for r in table) for c in columns) + 2 * (len(columns) - 1)
    if width is None or full_width <= width:
        return align(list(columns), "")
    rest = align([c for c in columns if c != long], "    ")
    out = []
    for i, r in enumerate(table):
        pieces = (
            textwrap.wrap(r[long], width, subsequent_indent="  ", break_on_hyphens=False)
            if wrap
            else [r[long]]
        )
        out += [style(i, long, piece, r[long]) for piece in pieces or [""]] + [rest[i]]
    return out
