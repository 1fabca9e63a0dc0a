"""Aligned text tables for the report and the command line, optionally coloured."""

from __future__ import annotations

import textwrap
from collections.abc import Callable

__all__ = ["Painter", "painter", "render_table"]

#: `paint(row, column, padded cell, cell text)` -> the cell as printed.
Painter = Callable[[int, int, str, str], str]

_COLORS = ("32", "33", "36", "35", "34", "31")  # green, yellow, cyan, magenta, blue, red


def painter(color: bool, labels: list[str] = [], label_column: int = -1) -> Painter | None:  # noqa: B006 (read only)
    """Bold headers and one colour per label in `label_column`; None (plain text) without `color`."""
    if not color:
        return None

    def style(row: int, col: int, cell: str, text: str) -> str:
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
    # Column by column: a report has one row per leaf, and a checkpoint 100k leaves.
    texts = list(zip(*table, strict=True))
    widths = [max(map(len, column)) for column in texts]

    def align(cols: list[int], indent: str) -> list[str]:
        padded = []
        for c in cols:
            pad = str.rjust if c in right else str.ljust
            cells = [pad(text, widths[c]) for text in texts[c]]
            if paint is not None:
                cells = [
                    style(i, c, cell, text)
                    for i, (cell, text) in enumerate(zip(cells, texts[c], strict=True))
                ]
            padded.append(cells)
        return [(indent + "  ".join(cells)).rstrip() for cells in zip(*padded, strict=True)]

    columns = range(len(table[0]))
    full_width = sum(widths) + 2 * (len(columns) - 1)
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
