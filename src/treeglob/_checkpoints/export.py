"""Writing a model under a checkpoint's names: the rules that load that checkpoint, undone.

`save(path, model, rename=..., transform=...)` takes the rules `load` reads the
checkpoint with and writes the tensors that `load` turns back into the model:
each rename rule undone (a model path becomes the checkpoint name the rules
rename into it), each transform undone (a transpose transposed back, a cast
written in the model's dtype), the leaves that `split` took from one tensor
joined into it again, and a leaf that `concat`/`stack` built split into its
tensors. Where a rule cannot be undone (a regex, a wildcard, a Python
function, a reshape), the error says which and why. `save` then plans the
load of what it is about to write, so the file loads back into the model
exactly, or nothing is written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .._core.errors import NoMatchError, listing
from .._core.tree import TreeView
from .base import Checkpoint
from .rename import RenameRule, most_renamed, undo_renames
from .transforms import Named, Undo, checked_axis, transform_name, undo

__all__ = ["Tensor", "plan_export"]

Shape = tuple[int, ...]


class Tensor(NamedTuple):
    """One tensor an export writes: its name, shape, dtype, and how to make its data."""

    name: str
    shape: Shape
    dtype: Any
    make: Callable[[], np.ndarray]
    rows: tuple[int, ...]  # the model rows it comes from
    verbatim: bool = False  # its data is its first row's value as it is (shards can write it)


def _through(steps: tuple[Named, ...], shape: Shape, dtype: Any) -> tuple[Shape, Any]:
    for step in steps:
        shape, dtype = step.output(shape, dtype)
    return shape, dtype


def _apply(steps: tuple[Named, ...], value: np.ndarray) -> np.ndarray:
    for step in steps:
        value = step(value)
    return value


class _Claim(NamedTuple):
    row: int
    undo: Undo


def plan_export(
    view: TreeView,
    rows: list[int],
    rules: list[RenameRule],
    transforms: list[tuple[Any, Callable[[Any], Any]]],
    chosen: np.ndarray,
    value: Callable[[int], np.ndarray],
    strict: bool,
    left_out: list[int],
    like: Checkpoint | None,
) -> tuple[list[Tensor], dict[int, tuple[str, ...]]]:
    """The tensors that write `rows` under the checkpoint names `rules` rename into them, and
    per row the names `load` is expected to read it from. Where several names become a path,
    the one in `like` (a checkpoint whose names and layouts the export must have), else the
    one renamed by the most rules (see `most_renamed`).

    Raises:
        ValueError: every row whose rules cannot be undone, with the rule and the reason.
        NoMatchError: with `strict`, a rename rule that writes none of the rows, nor of the
            rows `left_out` (skipped or not selected).
    """
    problems: dict[str, list[str]] = {}  # why -> the leaves or tensors it stops
    used: set[int] = set()
    claims: dict[str, list[_Claim]] = {}
    tensors: list[Tensor] = []
    expected: dict[int, tuple[str, ...]] = {}
    for r in rows:
        path, k = view.paths[r], int(chosen[r])
        fn = transforms[k][1] if k >= 0 else None
        try:
            how = undo(fn)
        except ValueError as exc:
            why = f"transform[{k}] ({transform_name(fn)}): {exc}"  # type: ignore[arg-type]
            problems.setdefault(why, []).append(path)
            continue
        try:
            found = undo_renames(path, rules)
        except ValueError as exc:
            problems.setdefault(str(exc), []).append(path)
            continue
        picked = most_renamed(found) if like is None else {n: h for n, h in found.items() if n in like.meta}
        names = sorted(picked, key=lambda name: picked[name])  # the load's order, for concat/stack
        used.update(index for history in picked.values() for index in history)
        if not names:
            why = (
                f"none of the names the rules turn into it ({', '.join(sorted(found)[:3])}) is in {like.where}"
                if like is not None and found
                else "no checkpoint name becomes it: the rules rename the path itself; skip=[...] it, or "
                "fix the rules"
            )
            problems.setdefault(why, []).append(path)
        elif how.joint is not None and how.joint.combines is not None:
            try:
                tensors += _pieces(view, r, how, names, value)
            except ValueError as exc:
                problems.setdefault(str(exc), []).append(path)
                continue
            expected[r] = tuple(names)
        elif len(names) > 1:
            why = (
                f"the rename rules turn each of {', '.join(map(repr, names))} into it, so its name in the "
                "checkpoint is not known; make the rules tell them apart"
            )
            problems.setdefault(why, []).append(path)
        else:
            claims.setdefault(names[0], []).append(_Claim(r, how))
            expected[r] = (names[0],)
    for name, members in claims.items():
        try:
            tensors.append(_joined(view, name, members, value))
        except ValueError as exc:
            problems.setdefault(str(exc), []).append(name)
    seen: dict[str, Tensor] = {}
    for tensor in tensors:
        if tensor.name in seen:
            paths = [view.paths[r] for r in (*seen[tensor.name].rows, *tensor.rows)]
            problems.setdefault(f"written from both {', '.join(paths)}", []).append(tensor.name)
        seen[tensor.name] = tensor
    for r in left_out:  # a rule for a skipped new head, or a part not selected, is not a typo
        with contextlib.suppress(ValueError):
            used.update(index for history in undo_renames(view.paths[r], rules).values() for index in history)
    if like is not None:
        for tensor in tensors:
            meta = like.meta.get(tensor.name)
            if meta is not None and (tuple(meta.shape), np.dtype(meta.dtype)) != (
                tensor.shape,
                np.dtype(tensor.dtype),
            ):
                why = (
                    f"written as {np.dtype(tensor.dtype)}{tensor.shape}, which {like.where} holds as "
                    f"{np.dtype(meta.dtype)}{tuple(meta.shape)}"
                )
                problems.setdefault(why, []).append(tensor.name)
    # A rule that cannot be undone (a regex) is not found by undoing: its use is not known.
    unused = [rule for rule in rules if rule.index not in used and not isinstance(rule.inverse, str)]
    if strict and unused and not problems:
        raise NoMatchError(
            f"save(): {unused[0].describe()} writes none of the {len(rows)} model paths saved (its "
            "replacement matches none of them). Remove the rule, or fix it; pass strict=False to "
            "allow rules that match nothing."
        )
    if problems:
        lines = [
            f"{where[0]}: {why}"
            if len(where) == 1
            else f"{why} (for {len(where)}: {', '.join(where[:3])}{', ...' if len(where) > 3 else ''})"
            for why, where in problems.items()
        ]
        count = sum(map(len, problems.values()))
        raise ValueError(
            f"save(): the load rules cannot be undone for {count} {'tensors' if count > 1 else 'tensor'}:\n"
            f"{listing(lines)}\n"
            "Export with rules that can be undone (globs without wildcards, transforms written as "
            "data), or build the checkpoint's {name: array} dict yourself and save that."
        )
    return tensors, expected


def _pieces(
    view: TreeView, row: int, how: Undo, names: list[str], value: Callable[[int], np.ndarray]
) -> list[Tensor]:
    """A leaf that `concat`/`stack` built from several tensors, split into them again."""
    assert how.joint is not None and how.joint.combines is not None
    kind, axis, sizes = how.joint.combines
    shape, dtype = _through(how.steps, view.shapes[row] or (), view.dtypes[row])
    # The combined value's axis: stack's new one, or concat's.
    a = checked_axis(axis, len(shape), how.joint.label)
    if kind == "stack":
        if shape[a] != len(names):
            raise ValueError(
                f"{how.joint.label} stacks {shape[a]} tensors, but the rules rename {len(names)} into it"
            )
        shapes = [(*shape[:a], *shape[a + 1 :])] * len(names)
    else:
        if sizes is None:
            raise ValueError(
                f"{how.joint.label} cannot be split back without the sizes of its tensors: write "
                f"concat(axis={axis}, sizes=(...)) with their sizes along axis {axis}, in order"
            )
        if len(sizes) != len(names) or sum(sizes) != shape[a]:
            raise ValueError(
                f"{how.joint.label}: {len(sizes)} sizes adding up to {sum(sizes)}, but the rules rename "
                f"{len(names)} tensors into it and its axis {axis} has size {shape[a]}"
            )
        shapes = [(*shape[:a], size, *shape[a + 1 :]) for size in sizes]
    last: dict[str, list[np.ndarray]] = {}  # the leaf's parts, made once for all its tensors

    def piece(i: int) -> np.ndarray:
        if i == 0 or "parts" not in last:
            whole = _apply(how.steps, value(row))
            if kind == "stack":
                last["parts"] = [np.take(whole, j, axis=a) for j in range(len(names))]
            else:
                last["parts"] = np.split(whole, np.cumsum(sizes)[:-1].tolist(), axis=a)  # type: ignore[arg-type]
        part = last["parts"][i]
        if i == len(names) - 1:
            last.clear()
        return part

    return [
        Tensor(name, s, dtype, lambda i=i: piece(i), (row,))
        for i, (name, s) in enumerate(zip(names, shapes, strict=True))
    ]


def _joined(view: TreeView, name: str, members: list[_Claim], value: Callable[[int], np.ndarray]) -> Tensor:
    """The tensor that the leaves `members` came from: one leaf's, the parts that `split`
    took joined again, or one value that several leaves hold (tied)."""
    metas = [_through(m.undo.steps, view.shapes[m.row] or (), view.dtypes[m.row]) for m in members]
    rows = tuple(m.row for m in members)
    splits = [m.undo.joint.splits if m.undo.joint is not None else None for m in members]
    if all(s is None for s in splits):
        if len({(s, np.dtype(d)) for s, d in metas}) > 1:
            raise ValueError(
                "the rules load it into "
                + ", ".join(
                    f"{view.paths[m.row]} ({np.dtype(d)}{s})"
                    for m, (s, d) in zip(members, metas, strict=True)
                )
                + ", which differ"
            )
        first = members[0]
        if len(members) > 1:  # tied: compared now, before any file is written
            out = _apply(first.undo.steps, value(first.row))
            nan = bool(np.issubdtype(out.dtype, np.inexact))
            for m in members[1:]:
                if not np.array_equal(_apply(m.undo.steps, value(m.row)), out, equal_nan=nan):
                    raise ValueError(
                        f"{view.paths[first.row]} and {view.paths[m.row]} are both written as it, but "
                        "their values differ: the rules load one tensor into both"
                    )
        return Tensor(
            name,
            metas[0][0],
            metas[0][1],
            lambda: _apply(first.undo.steps, value(first.row)),
            rows,
            verbatim=not first.undo.steps,
        )
    parts_of = {(s[0], s[2]) for s in splits if s is not None}
    rests = {tuple(step.label for step in m.undo.rest) for m in members}
    if None in splits or len(parts_of) > 1 or len(rests) > 1:
        raise ValueError(
            "the rules load it into "
            + ", ".join(
                f"{view.paths[m.row]} ({transform_name(m.undo.joint) if m.undo.joint else 'whole'})"
                for m in members
            )
            + ", which do not split it the same way"
        )
    ((parts, axis),) = parts_of
    by_part: dict[int, list[_Claim]] = {}
    for m, s in zip(members, splits, strict=True):
        assert s is not None
        by_part.setdefault(s[1], []).append(m)
    missing = [p for p in range(parts) if p not in by_part]
    doubled = [p for p, ms in by_part.items() if len(ms) > 1]
    if missing or doubled:
        held = ", ".join(f"part {p}: {view.paths[ms[0].row]}" for p, ms in sorted(by_part.items()))
        which = (
            f"part {missing[0]} comes" if len(missing) == 1 else f"parts {', '.join(map(str, missing))} come"
        )
        why = (
            f"{which} from no leaf of the model, of its split into {parts}"
            if missing
            else f"part {doubled[0]} comes from several leaves"
        )
        raise ValueError(f"{why} ({held}); export the model with every part, or the parts yourself")
    order = [by_part[p][0] for p in range(parts)]
    shape, dtype = metas[members.index(order[0])]
    if any(metas[members.index(m)] != (shape, dtype) for m in order):
        raise ValueError("its parts come from leaves of different shapes or dtypes")
    a = checked_axis(axis, len(shape), transform_name(order[0].undo.joint))  # type: ignore[arg-type]
    joined = (*shape[:a], shape[a] * parts, *shape[a + 1 :])
    rest = order[0].undo.rest
    out_shape, out_dtype = _through(rest, joined, dtype)

    def join() -> np.ndarray:
        return _apply(rest, np.concatenate([_apply(m.undo.steps, value(m.row)) for m in order], axis=a))

    return Tensor(name, out_shape, out_dtype, join, tuple(m.row for m in order))
