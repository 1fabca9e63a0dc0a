"""The `explain` report: rows per leaf, rows per rule, a summary per label."""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._paths import TreeView
    from ._rules import Rule

__all__ = ["Explanation", "LeafRow", "RuleRow", "same_label"]


@dataclass(frozen=True)
class LeafRow:
    """One leaf: where it is, what it is, what it got and why."""

    path: str
    shape: tuple[int, ...] | None
    dtype: str | None
    size: int | None
    label: Any
    rule: int | None  # index of the deciding rule; None for the default
    selector: str  # the deciding rule's selector, or "default"


@dataclass(frozen=True)
class RuleRow:
    """One rule: how many leaves it matched and how many it decided."""

    index: int
    label: Any
    selector: str
    matched: int
    decided: int
    shadowed: bool


def same_label(a: Any, b: Any) -> bool:
    """Equal labels of the same type; labels whose `==` is not a bool compare by identity."""
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except (TypeError, ValueError):  # e.g. NumPy array labels
        return False


def _key(label: Any) -> Any:
    """The label as a summary key: itself, or its repr when it is unhashable (an array)."""
    try:
        hash(label)
    except TypeError:
        return repr(label)
    return label


@dataclass(frozen=True)
class Explanation:
    """What `treeglob.explain` returns; `str()` renders it as a table."""

    rows: tuple[LeafRow, ...]
    rules: tuple[RuleRow, ...]
    summary: dict[Any, dict[str, int]]  # label -> {"leaves": n, "elements": n}

    @classmethod
    def build(
        cls, view: TreeView, deciders: list[Rule | None], default: Any, rules: list[RuleRow]
    ) -> Explanation:
        rows = []
        for path, shape, dtype, size, rule in zip(
            view.paths, view.shapes, view.dtypes, view.sizes, deciders, strict=True
        ):
            rows.append(
                LeafRow(
                    path=path,
                    shape=shape,
                    dtype=None if dtype is None else str(dtype),
                    size=size,
                    label=default if rule is None else rule.label,
                    rule=None if rule is None else rule.index,
                    selector="default" if rule is None else repr(rule.selector),
                )
            )
        # Labels in rule order, the default last: the order a reader wrote them.
        order: list[Any] = []
        for label in [r.label for r in rules] + [default]:
            if not any(same_label(label, seen) for seen in order):
                order.append(label)
        summary: dict[Any, dict[str, int]] = {}
        for label in order:
            for row in rows:
                if same_label(row.label, label):
                    entry = summary.setdefault(_key(label), {"leaves": 0, "elements": 0})
                    entry["leaves"] += 1
                    entry["elements"] += row.size or 0
        return cls(tuple(rows), tuple(rules), summary)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for logging: `{"leaves": [...], "rules": [...], "summary": {...}}`."""
        return {
            "leaves": [asdict(r) for r in self.rows],
            "rules": [asdict(r) for r in self.rules],
            "summary": {str(k): dict(v) for k, v in self.summary.items()},
        }

    def __str__(self) -> str:
        return self.format()

    def format(self, width: int | None = None, color: bool = False, rows: Any = None) -> str:
        """The report as text.

        Args:
            width: the line width to fit; a table wider than it puts each
                path (and each rule's selector) on a line of its own, above
                its other columns, so long paths stay verbatim and readable.
            color: ANSI colours for a terminal (labels, headers).
            rows: the leaf rows to show (e.g. a filtered subset); all by default.
        """
        labels = list(self.summary)
        table = [("path", "shape", "dtype", "size", "label", "rule")]
        for r in self.rows if rows is None else rows:
            table.append(
                (
                    r.path or "<root>",
                    "-" if r.shape is None else str(r.shape),
                    r.dtype or "-",
                    "-" if r.size is None else f"{r.size:,}",
                    str(r.label),
                    "default" if r.rule is None else str(r.rule),
                )
            )
        paint = _painter(color, [str(label) for label in labels])
        lines = render_table(table, right={3}, long=0, width=width, paint=paint(4))
        if self.rules:
            rules = [("rule", "label", "matched", "decided", "selector")]
            for r in self.rules:
                mark = "  (shadowed: earlier rules take all its leaves)" if r.shadowed else ""
                mark = "  (optional: matches nothing)" if r.matched == 0 else mark
                rules.append((str(r.index), str(r.label), str(r.matched), str(r.decided), r.selector + mark))
            lines += [""] + render_table(
                rules, right={0, 2, 3}, long=4, width=width, paint=paint(1), wrap=True
            )
        total = sum(v["elements"] for v in self.summary.values()) or 1
        summary = [("label", "leaves", "elements", "share")]
        for label, v in self.summary.items():
            summary.append(
                (str(label), str(v["leaves"]), f"{v['elements']:,}", f"{100 * v['elements'] / total:.1f}%")
            )
        return "\n".join(
            lines + [""] + render_table(summary, right={1, 2, 3}, long=0, width=width, paint=paint(0))
        )


_COLORS = ("32", "33", "36", "35", "34", "31")  # green, yellow, cyan, magenta, blue, red


def _painter(color: bool, labels: list[str]):
    """`paint(label_column)` -> a cell styler: bold headers, one colour per label."""

    def for_column(label_column: int):
        def style(row: int, col: int, cell: str, text: str) -> str:
            if not color:
                return cell
            if row == 0:
                return f"\033[1m{cell}\033[0m"
            if col == label_column and text in labels:
                return f"\033[{_COLORS[labels.index(text) % len(_COLORS)]}m{cell}\033[0m"
            return cell

        return style

    return for_column


def render_table(
    table: list[tuple[str, ...]],
    right: set[int],
    long: int,
    width: int | None = None,
    paint: Any = None,
    wrap: bool = False,
) -> list[str]:
    """Aligned columns (row 0 is the header). When wider than `width`, column
    `long` goes on a line of its own (wrapped to `width` if `wrap`; paths are
    never wrapped), the other columns aligned on an indented line below it.
    `paint(row, col, padded, text)` may style a cell."""
    paint = paint or (lambda row, col, padded, text: padded)

    def align(cols: list[int], indent: str) -> list[str]:
        widths = {c: max(len(r[c]) for r in table) for c in cols}
        out = []
        for i, r in enumerate(table):
            cells = [
                paint(i, c, r[c].rjust(widths[c]) if c in right else r[c].ljust(widths[c]), r[c])
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
        out += [paint(i, long, piece, r[long]) for piece in pieces or [""]] + [rest[i]]
    return out
