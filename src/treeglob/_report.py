"""The `explain` report: rows per leaf, rows per rule, a summary per label."""

from __future__ import annotations

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
        table = [("path", "shape", "dtype", "size", "label", "rule")]
        for r in self.rows:
            table.append(
                (
                    r.path or "<root>",
                    "-" if r.shape is None else str(r.shape),
                    r.dtype or "-",
                    "-" if r.size is None else str(r.size),
                    str(r.label),
                    "default" if r.rule is None else str(r.rule),
                )
            )
        lines = _align(table, right={3})
        if self.rules:
            rules = [("rule", "label", "matched", "decided", "selector")]
            for r in self.rules:
                mark = "  (shadowed: earlier rules take all its leaves)" if r.shadowed else ""
                mark = "  (optional: matches nothing)" if r.matched == 0 else mark
                rules.append((str(r.index), str(r.label), str(r.matched), str(r.decided), r.selector + mark))
            lines += [""] + _align(rules, right={0, 2, 3})
        total = sum(v["elements"] for v in self.summary.values()) or 1
        summary = [("label", "leaves", "elements", "share")]
        for label, v in self.summary.items():
            summary.append(
                (str(label), str(v["leaves"]), str(v["elements"]), f"{100 * v['elements'] / total:.1f}%")
            )
        return "\n".join(lines + [""] + _align(summary, right={1, 2, 3}))


def _align(table: list[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for row in table:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines
