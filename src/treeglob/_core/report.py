"""The `explain` report: rows per leaf, rows per rule, a summary per label."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from .resolve import Options, Resolution, resolve
from .rules import MISSING, same_label
from .selector import Context, coerce, expanded
from .table import Painter, painter, render_table
from .tree import TreeView

__all__ = ["Explanation", "LeafRow", "RuleRow", "explain"]


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
    """One rule: how many leaves it matched and how many it decided.

    `selector` is its repr, in which a preset's long rule is one name
    (`presets.DEFAULT_NO_DECAY`); `expanded` writes such names out ("" where the
    selector names none).
    """

    index: int
    label: Any
    selector: str
    matched: int
    decided: int
    shadowed: bool
    expanded: str = ""


def _key(label: Any) -> Any:
    """The label as a summary key: itself, or its repr when it is unhashable (an array)."""
    try:
        hash(label)
    except TypeError:
        return repr(label)
    return label


def _per_row(values: list[Any], index: np.ndarray) -> list[Any]:
    """`[values[i] for i in index]`, gathered in C (an object array keeps tuples whole)."""
    table = np.empty(len(values), object)
    for i, value in enumerate(values):
        table[i] = value
    return table[index].tolist()


def _texts(values: list[Any], text: Callable[[Any], Any], keys: list[Any] | None = None) -> list[Any]:
    """`text(v)` for each value, computed once per distinct value (a tree has few shapes and
    dtypes), or once per distinct key where the key decides the value (a row's rule, its label)."""
    seen: dict[Any, Any] = {}
    out = []
    for v, k in zip(values, values if keys is None else keys, strict=True):
        t = seen.get(k, seen)
        if t is seen:
            t = seen[k] = text(v)
        out.append(t)
    return out


_FIELDS = tuple(f.name for f in fields(LeafRow))


@dataclass(frozen=True)
class Explanation:
    """What `treeglob.explain` returns; `str()` renders it as a table.

    Attributes:
        rows: one `LeafRow` per leaf (per layer slice under `stacked`), in
            leaf order; built on first access (the table and `to_dict` read
            the same columns without them).
        rules: one `RuleRow` per rule.
        summary: label -> `{"leaves": n, "elements": n}`, labels in rule
            order, the default last.
    """

    columns: tuple[list[Any], ...] = field(repr=False)  # per LeafRow field, one value per row
    rules: tuple[RuleRow, ...]
    summary: dict[Any, dict[str, int]]
    # The tree's view, and the view of `types_from` (where type selectors are read),
    # which `filter` evaluates selectors on; after a filter, the columns of every row
    # and the indices of the rows shown. The report keeps the tree alive while it lives.
    _view: TreeView | None = field(default=None, repr=False, compare=False)
    _types: TreeView | None = field(default=None, repr=False, compare=False)
    _all: tuple[list[Any], ...] | None = field(default=None, repr=False, compare=False)
    _shown: np.ndarray | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, resolution: Resolution, types_from: Any = None) -> Explanation:
        """The report of a resolution: exactly the decisions the outputs are built from
        (`types_from`: the tree whose node types the rules read, for `filter`)."""
        view, rules, decided = resolution.view, resolution.rules, resolution.decided
        # One repr per rule, not per row; per row an index into them (-1: the default).
        selectors = [repr(r.selector) for r in rules]
        written = [expanded(r.selector) for r in rules]  # with the presets' named rules written out
        rule_rows = tuple(
            RuleRow(
                index=r.index,
                label=r.label,
                selector=selectors[r.index],
                matched=int(m.sum()),
                decided=int((decided == r.index).sum()),
                shadowed=r.index in resolution.shadowed,
                expanded=written[r.index] if written[r.index] != selectors[r.index] else "",
            )
            for r, m in zip(rules, resolution.matches, strict=True)
        )
        columns = (
            view.paths,
            view.shapes,
            _texts(view.dtypes, lambda d: None if d is None else str(d)),
            view.sizes,
            _per_row([r.label for r in rules] + [resolution.default], decided),
            _per_row([*range(len(rules)), None], decided),
            _per_row([*selectors, "default"], decided),
        )
        # Labels in rule order, the default last (the order a reader wrote them);
        # rules sharing a label count together. Group -1 is the default's.
        order = rules.labels(resolution.default)
        group = [next(g for g, seen in enumerate(order) if same_label(r.label, seen)) for r in rules]
        default = resolution.default
        # Indexed by -1, the default's group (no row has -1 without a default).
        group.append(
            0 if default is MISSING else next(g for g, s in enumerate(order) if same_label(default, s))
        )
        row_group = np.asarray(group, dtype=np.intp)[decided]
        sizes = np.fromiter((s or 0 for s in view.sizes), dtype=np.float64, count=len(view))
        leaves = np.bincount(row_group, minlength=len(order))
        elements = np.bincount(row_group, weights=sizes, minlength=len(order))
        summary = {
            _key(label): {"leaves": int(leaves[g]), "elements": int(elements[g])}
            for g, label in enumerate(order)
            if leaves[g]
        }
        types = None if types_from is None else TreeView(types_from, view.stacked)
        return cls(columns, rule_rows, summary, view, types)

    def filter(self, selector: Any, *, strict: bool = True) -> Explanation:
        """The report of the leaves `selector` selects, in leaf order; the rules and the
        summary stay those of the whole tree (they say what the rules did).

        Args:
            selector: a selector, or a value that coerces to one.
            strict: raise `NoMatchError` (with close matches) when it selects nothing.

        Examples:
            >>> import numpy as np, treeglob
            >>> report = treeglob.explain({"a": {"w": np.zeros(2)}, "b": np.zeros(3)}, [("a", 1)], default=0)
            >>> [row.path for row in report.filter("*.w").rows]
            ['a.w']
        """
        if self._view is None:
            raise TypeError("filter() needs a report made by treeglob.explain.")
        selector = coerce(selector)
        if self._types is None:
            hit = Context(self._view, strict=strict).require(selector, "the filter")
        else:  # read where the types are, taken by path
            source = Context(self._types, strict=strict).require(selector, "the filter")
            rows = {path: i for i, path in enumerate(self._types.paths)}
            hit = source[[rows[path] for path in self._view.paths]]
        everything = self.columns if self._all is None else self._all
        shown = np.flatnonzero(hit) if self._shown is None else self._shown[hit[self._shown]]
        if strict and not len(shown) and not selector.may_be_empty:  # a filter of a filter
            raise Context(self._view, strict=True).no_match(selector, "the filter, on the rows shown,")
        columns = tuple(_per_row(column, shown) for column in everything)
        return replace(self, columns=columns, _all=everything, _shown=shown)

    @functools.cached_property
    def rows(self) -> tuple[LeafRow, ...]:
        return tuple(map(LeafRow, *self.columns))

    def to_dict(self, rows: Any = None) -> dict[str, Any]:
        """Plain data for logging: `{"leaves": [...], "rules": [...], "summary": {...}}`.

        Args:
            rows: the leaf rows to include (e.g. a filtered subset of `rows`); all by default.
        """
        if rows is None:
            leaves = [dict(zip(_FIELDS, values, strict=True)) for values in zip(*self.columns, strict=True)]
        else:
            leaves = [{name: getattr(r, name) for name in _FIELDS} for r in rows]
        return {
            "leaves": leaves,
            "rules": [asdict(r) for r in self.rules],
            "summary": {str(k): dict(v) for k, v in self.summary.items()},
        }

    def __str__(self) -> str:
        return self.format()

    def format(
        self,
        width: int | None = None,
        color: bool = False,
        rows: Any = None,
        *,
        leaves: bool = True,
        expand: bool = False,
    ) -> str:
        """The report as text.

        Args:
            width: the line width to fit; a table wider than it puts each
                path (and each rule's selector) on a line of its own, above
                its other columns, so long paths stay verbatim and readable.
            color: ANSI colours for a terminal (labels, headers).
            rows: the leaf rows to show (e.g. a filtered subset of `rows`); all by default.
            leaves: False for the summary alone: the rules with their hits and
                problems (shadowed, matching nothing), and the counts per label.
            expand: write out the presets' rules shown by name (`presets.DEFAULT_NO_DECAY`).
        """
        labels = [str(label) for label in self.summary]
        lines = self._leaf_lines(rows, width, painter(color, labels, 4)) if leaves else []
        if self.rules:
            rules = [("rule", "label", "matched", "decided", "selector")]
            for r in self.rules:
                mark = "  (shadowed: earlier rules take all its leaves)" if r.shadowed else ""
                mark = "  (optional: matches nothing)" if r.matched == 0 else mark
                selector = (expand and r.expanded) or r.selector
                rules.append((str(r.index), str(r.label), str(r.matched), str(r.decided), selector + mark))
            lines += [""] * bool(lines) + render_table(
                rules, right={0, 2, 3}, long=4, width=width, paint=painter(color, labels, 1), wrap=True
            )
        total = sum(v["elements"] for v in self.summary.values()) or 1
        summary = [("label", "leaves", "elements", "share")]
        for label, v in self.summary.items():
            summary.append(
                (str(label), str(v["leaves"]), f"{v['elements']:,}", f"{100 * v['elements'] / total:.1f}%")
            )
        return "\n".join(
            lines
            + [""] * bool(lines)
            + render_table(summary, right={1, 2, 3}, long=0, width=width, paint=painter(color, labels, 0))
        )

    def _leaf_lines(self, rows: Any, width: int | None, paint: Painter | None) -> list[str]:
        if rows is None:
            paths, shapes, dtypes, sizes, row_labels, rule, _ = self.columns
        else:
            paths, shapes, dtypes, sizes, row_labels, rule, _ = (
                [getattr(r, name) for r in rows] for name in _FIELDS
            )
        # Each column's text computed once per distinct value: a tree has few shapes, sizes, labels.
        table = [("path", "shape", "dtype", "size", "label", "rule")]
        table += zip(
            [p or "<root>" for p in paths],
            _texts(shapes, lambda s: "-" if s is None else str(s)),
            [d or "-" for d in dtypes],
            _texts(sizes, lambda s: "-" if s is None else f"{s:,}"),
            _texts(row_labels, str, keys=rule),  # the deciding rule decides the label
            _texts(rule, lambda i: "default" if i is None else str(i)),
            strict=True,
        )
        return render_table(table, right={3}, long=0, width=width, paint=paint)


def explain(
    tree: Any,
    rules: Any,
    *,
    default: Any = MISSING,
    strict: bool = True,
    stacked: Any = None,
    types_from: Any = None,
) -> Explanation:
    """Report which leaf gets which label, and which rule decided it.

    Runs the very resolution `labels` runs (and so raises exactly its errors,
    per-layer merges of stacked leaves included). `str()` of the result is
    an aligned table in which every full path appears verbatim, followed by
    a summary per label; `.rows`, `.rules`, `.summary` and `.to_dict()` give
    the same as plain data. Shadowed rules are marked instead of warned
    about. With `stacked`, the report has one row per layer slice.

    Examples:
        >>> import numpy as np, treeglob
        >>> params = {"emb": np.zeros((10, 4)), "fc": {"w": np.zeros((4, 4)), "b": np.zeros(4)}}
        >>> print(treeglob.explain(params, [("*.b", "no_decay"), ("fc", "decay")], default="frozen"))
        path  shape    dtype    size  label     rule
        emb   (10, 4)  float64    40  frozen    default
        fc.b  (4,)     float64     4  no_decay  0
        fc.w  (4, 4)   float64    16  decay     1
        <BLANKLINE>
        rule  label     matched  decided  selector
           0  no_decay        1        1  glob('*.b')
           1  decay           2        1  glob('fc')
        <BLANKLINE>
        label     leaves  elements  share
        no_decay       1         4   6.7%
        decay          1        16  26.7%
        frozen         1        40  66.7%
    """
    options = Options(default, strict, stacked, types_from)
    return Explanation.of(resolve(tree, rules, options, caller="explain", warn=False), types_from)
