"""Moving weights between a checkpoint and a model by rules: `load_plan`, `load`, `save`.

A transfer is planned once, from metadata only: checkpoint names are renamed
into model paths, `skip` keeps model leaves from initialisation, `ignore`
leaves checkpoint tensors out, `transform` changes a tensor on its way in.
The plan is the report (`LoadReport`), and `load` carries out exactly that
plan, reading one tensor at a time: what the dry run shows is what loading
does.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import pathlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._core.errors import LoadError, ShadowedRuleWarning, SourceError, listing, warn_user
from .._core.frameworks import parameters_elsewhere, random_state
from .._core.resolve import Options, paused_gc, resolve, view_of
from .._core.tree import TreeView
from .base import Checkpoint
from .export import Tensor, plan_export
from .formats import format_for_writing, open_checkpoint
from .layout import Box, box, extent, slices, whole
from .load_report import UNCHECKED, LoadReport, LoadRow
from .multihost import (
    WHOLE_VALUE_ACROSS_PROCESSES,
    agreed,
    holds_whole,
    save_from_every_process,
    spans_processes,
)
from .progress import progress as show_progress
from .rename import apply_renames, parse_renames
from .rules import as_patterns
from .sharded import remove_stale, write_sharded
from .transforms import Impossible, cast_after, combines, output_meta, parse_transforms, transform_name

__all__ = ["load", "load_plan", "save"]

_MAX_LISTED = 20  # paths listed in one message
# A uint32 (2,) or (4,) leaf is what jax.random.PRNGKey gives: nothing in a plain tree
# tells it from data, so it is reported, with the two ways to mark it.
_LEGACY_KEY = "a jax.random.PRNGKey? skip it, or hold jax.random.key(...), which load leaves alone"


# ----------------------------------------------------------------------------
# The plan


@dataclass
class _Plan:
    view: TreeView
    checkpoint: Checkpoint
    report: LoadReport
    # Per model row: (checkpoint names, transform) for rows that load (several names where a
    # transform combines them); None otherwise.
    reads: list[tuple[tuple[str, ...], Callable[[Any], Any] | None] | None]


def _plan(
    target: Any,
    source: Any,
    *,
    caller: str,
    rename: Any,
    skip: Any,
    ignore: Any,
    transform: Any,
    stacked: Any,
    strict: bool,
    allow_missing: bool,
    allow_unused: bool,
    cast: bool = False,
) -> _Plan:
    rename_rules = parse_renames(rename or [])  # malformed rules first, before any file is opened
    transforms = parse_transforms(transform or [])
    view = view_of(target, caller, stacked)
    _check_arrays(view, caller)
    checkpoint = open_checkpoint(source)
    chosen = _choose_transforms(view, transforms, caller, strict)
    combining = [k >= 0 and combines(transforms[k][1]) for k in chosen.tolist()]
    ignored, renamed, taken = _match_tensors(
        view, checkpoint, rename_rules, as_patterns(ignore), caller, strict, combining
    )
    skipped = np.zeros(len(view), dtype=bool)
    if skip_rules := [(p, True) for p in as_patterns(skip)]:
        skipped = _resolve_rows(view, skip_rules, caller, strict, f"the skip list given to {caller}()")
    rng = np.zeros(len(view), dtype=bool)
    kinds = random_state()
    if view.wrapped and kinds:  # random state the framework marks (NNX Rngs)
        rng = _resolve_rows(view, [(kinds, True)], caller, False, "")

    out_rows: list[LoadRow] = []
    reads: list[tuple[tuple[str, ...], Callable[[Any], Any] | None] | None] = [None] * len(view)
    # A model repeats a few shapes many times: each transform is traced once per input.
    outputs: dict[tuple[Any, ...], tuple[tuple[int, ...], Any] | str] = {}
    for r in view.data_rows:
        path, shape, dtype = view.paths[r], view.shapes[r], jnp.dtype(view.dtypes[r])
        names = taken.get(r)
        metas = [] if names is None else [checkpoint.meta[n] for n in names]
        name = None if names is None else " + ".join(names)
        src = _source_meta(metas[0]) if len(metas) == 1 else {}
        if skipped[r]:
            out_rows.append(LoadRow("skipped", path, name, shape, _text(dtype), **src, note="skip"))
            continue
        if names is None and rng[r]:
            note = f"random state ({', '.join(k.__name__ for k in kinds)}), kept"
            out_rows.append(LoadRow("skipped", path, None, shape, _text(dtype), note=note))
            continue
        if names is None:
            legacy = dtype == np.uint32 and shape in ((2,), (4,))
            note = _LEGACY_KEY if legacy else ""
            out_rows.append(LoadRow("missing", path, None, shape, _text(dtype), note=note))
            continue
        k = int(chosen[r])
        fn = transforms[k][1] if k >= 0 else None
        pickled = [n for n, m in zip(names, metas, strict=True) if np.dtype(m.dtype).kind == "O"]
        if pickled:  # an .npz object array: Python objects, which load never unpickles
            which = f" ({pickled[0]})" if len(names) > 1 else ""
            note = f"an object array{which}: pickled Python objects, which treeglob does not load"
            out_rows.append(LoadRow("mismatch", path, name, shape, _text(dtype), **src, note=note))
            continue
        inputs = [(tuple(m.shape), jnp.dtype(m.dtype)) for m in metas]
        got: tuple[tuple[int, ...], Any] | str = inputs[0]
        if fn is not None:
            key = (k, *inputs)
            if key not in outputs:
                many = combining[r]
                outputs[key] = output_meta(
                    fn, *(([s for s, _ in inputs], [d for _, d in inputs]) if many else inputs[0])
                )
            got = outputs[key]
        label = None if fn is None else transform_name(fn)
        row = LoadRow("loaded", path, name, shape, _text(dtype), **src, transform=label)
        if isinstance(got, Impossible):  # a transform written as data that cannot apply: certain
            out_rows.append(replace(row, status="mismatch", note=str(got)))  # names the failing step
            continue
        if isinstance(got, str):  # a function that fails on the stand-in and when traced
            row = replace(row, note=f"{UNCHECKED} fails without data ({got[:80]})")
        elif cast and got[0] == shape and got[1] != dtype and _floating(got[1]) and _floating(dtype):
            # The dtype policy: a floating tensor is cast to its leaf's floating dtype.
            fn = cast_after(fn, dtype)
            cast_note = f"cast from {got[1]}" + (f" after {label}" if label else "")
            row = replace(row, transform=transform_name(fn), note=cast_note)
        elif got != (shape, dtype):
            note = f"gives {got[1]}{got[0]}" + (f" after {label}" if label else "")
            out_rows.append(replace(row, status="mismatch", note=note))
            continue
        out_rows.append(row)
        reads[r] = (names, fn)

    used = {n for names in taken.values() for n in names}
    for p, meta in checkpoint.meta.items():
        src = _source_meta(meta)
        if p in ignored:
            out_rows.append(LoadRow("ignored", None, p, None, None, **src))
        elif p not in used:
            outs = [o for o, _ in renamed[p] if o != p]
            out_rows.append(LoadRow("unused", None, p, None, None, **src, note=", ".join(outs)))
    report = LoadReport(tuple(out_rows), checkpoint.where, allow_missing, allow_unused)
    return _Plan(view, checkpoint, report, reads)


def _match_tensors(
    view: TreeView,
    checkpoint: Checkpoint,
    rename_rules: list[Any],
    ignore: list[Any],
    caller: str,
    strict: bool,
    combining: list[bool],
) -> tuple[set[str], dict[str, list[tuple[str, tuple[int, ...]]]], dict[int, tuple[str, ...]]]:
    """The checkpoint names ignored, each name's renamed paths, and per model row the names it
    takes: one, or for a row whose transform combines (`concat`, `stack`) every tensor renamed
    onto it, in the order of the rename rules that brought them."""
    source_view = checkpoint.view  # names are the checkpoint's paths, as treeglob prints paths
    ignored: set[str] = set()
    if ignore:
        rules = [(p, True) for p in ignore]
        hit = _resolve_rows(source_view, rules, caller, strict, f"the ignore list given to {caller}()")
        ignored = {source_view.paths[r] for r in np.flatnonzero(hit).tolist()}
    kept = [p for p in checkpoint.meta if p not in ignored]
    renamed = apply_renames(kept, rename_rules, caller=caller, strict=strict)
    index = {view.paths[r]: r for r in view.data_rows}
    arrivals: dict[int, list[tuple[tuple[int, ...], str]]] = {}  # row -> (rules that renamed it, name)
    for name, outs in renamed.items():
        for out, history in outs:
            row = index.get(out)
            if row is not None:
                arrivals.setdefault(row, []).append((history, name))
    taken: dict[int, tuple[str, ...]] = {}
    collisions: dict[str, list[str]] = {}  # a model path -> every tensor that becomes it
    unordered: dict[str, list[str]] = {}
    for row, got in arrivals.items():
        if len(got) == 1 or combining[row]:
            got = sorted(got, key=lambda arrival: arrival[0])
            histories = [history for history, _ in got]
            if len(set(histories)) < len(histories):
                unordered[view.paths[row]] = [name for _, name in got]
            taken[row] = tuple(name for _, name in got)
        else:
            collisions[view.paths[row]] = [name for _, name in got]
    for found, what, fix in (
        (
            collisions,
            "take several checkpoint tensors",
            "A leaf takes one tensor: rename all but one of them elsewhere, or ignore=[...] them; "
            "or combine them with a 'concat(axis)' or 'stack(axis)' transform on the leaf.",
        ),
        (
            unordered,
            "take several tensors that the same rename rules brought, in no order",
            "concat and stack take the tensors in the order of the rename rules that rename them: "
            "write one rule per tensor, in that order.",
        ),
    ):
        if found:
            listed = listing([f"{path} <- {', '.join(map(repr, names))}" for path, names in found.items()])
            count = f"{len(found)} model {'paths would each' if len(found) > 1 else 'path would'}"
            raise LoadError(f"{caller}(): {count} {what}:\n{listed}\n{fix}", None)
    return ignored, renamed, taken


def _choose_transforms(
    view: TreeView, transforms: list[tuple[Any, Callable[[Any], Any]]], caller: str, strict: bool
) -> np.ndarray:
    """Per model row, the index of its transform (first match), -1 for none."""
    if not transforms:
        return np.full(len(view), -1)
    resolution = resolve(
        view,
        [(pattern, k) for k, (pattern, _) in enumerate(transforms)],
        Options(default=-1, strict=strict),
        caller=caller,
        merge="rows",
        warn=False,
        subject=f"a transform pattern given to {caller}()",
        whole_tensors=True,
    )
    for k in resolution.shadowed:
        warn_user(
            f"transform[{k}] ({transforms[k][0]!r}) never applies: every leaf it matches is taken by "
            "an earlier transform (the first match wins). Move it up or remove it.",
            ShadowedRuleWarning,
        )
    return resolution.decided


@functools.cache
def _floating(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating))


@functools.cache
def _text(dtype: Any) -> str:
    return str(dtype)  # NumPy builds a dtype's name anew each time


def _source_meta(meta: Any) -> dict[str, Any]:
    return {"source_shape": tuple(meta.shape), "source_dtype": _text(jnp.dtype(meta.dtype))}


def _resolve_rows(
    view: TreeView, rules: list[tuple[Any, bool]], caller: str, strict: bool, subject: str
) -> np.ndarray:
    """Per row: whether any of `rules` selects it (each rule must select something when strict)."""
    resolution = resolve(
        view,
        rules,
        Options(default=False, strict=strict),
        caller=caller,
        merge="rows",
        warn=False,
        subject=subject,
        whole_tensors=True,
    )
    return resolution.decided >= 0


def _check_arrays(view: TreeView, caller: str) -> None:
    """Refuse a model whose framework keeps its parameters outside the tree's leaves (penzai):
    there would be nothing to save or load, and no word about it."""
    elsewhere = parameters_elsewhere(view.leaf_types)
    if elsewhere:
        raise ValueError(f"{caller}(): {elsewhere}")


def load_plan(
    target: Any,
    source: Any,
    *,
    rename: Any = None,
    skip: Any = None,
    ignore: Any = None,
    transform: Any = None,
    stacked: Any = None,
    strict: bool = True,
    allow_missing: bool = False,
    allow_unused: bool = False,
    cast: bool = False,
) -> LoadReport:
    """What `treeglob.load` would do, from metadata only: no tensor is read.

    Takes the arguments of `treeglob.load` except `shardings`; `target` may be abstract
    (e.g. from `eqx.filter_eval_shape`). Rule errors raise as in `load`;
    missing, unused and mismatched tensors are in the report (`.ok`,
    `.problems()`, `.check()` raises them as `load` would).

    Examples:
        >>> import numpy as np, treeglob
        >>> report = treeglob.load_plan({"w": np.zeros(2), "b": np.zeros(1)}, {"w": np.ones(2), "x": np.ones(3)})
        >>> report.ok, report.problems()
        (False, ['missing', 'unused'])
        >>> print(report)
        path  status   source  shape  dtype    note
        b     missing  -       (1,)   float64
        w     loaded   = w     (2,)   float64
        -     unused   x       (3,)   float64
        <BLANKLINE>
        loaded            1 leaf                   2 elements
        missing           1 leaf                   1 element  <- stops the load
        unused            1 tensor                 3 elements  <- stops the load
    """
    with paused_gc():
        return _plan(
            target,
            source,
            caller="load_plan",
            rename=rename,
            skip=skip,
            ignore=ignore,
            transform=transform,
            stacked=stacked,
            strict=strict,
            allow_missing=allow_missing,
            allow_unused=allow_unused,
            cast=cast,
        ).report


def load(
    target: Any,
    source: Any,
    *,
    rename: Any = None,
    skip: Any = None,
    ignore: Any = None,
    transform: Any = None,
    stacked: Any = None,
    shardings: Any = None,
    strict: bool = True,
    allow_missing: bool = False,
    allow_unused: bool = False,
    cast: bool = False,
    progress: bool = False,
) -> tuple[Any, LoadReport]:
    """Load a checkpoint into a model by rules, reading one tensor at a time.

    Every array leaf of `target` is loaded from a checkpoint tensor or
    skipped by a rule; every checkpoint tensor is used or ignored; shapes
    and dtypes must agree (after `transform`). Anything else raises one
    `LoadError` listing all of it, before any tensor is read.

    Args:
        target: the model (any PyTree: an Equinox module, Flax params, an
            NNX State or module, Haiku params); abstract leaves
            (`jax.ShapeDtypeStruct`) are fine where every leaf is loaded.
        source: a `.safetensors` or `.npz` path, an orbax checkpoint
            directory, or a PyTree in memory (names are its paths).
        shardings: a tree of `jax.sharding.Sharding` like `target` (e.g.
            from `treeglob.shardings`): each tensor is placed on its devices
            as it is read, each slice the process's devices hold read once
            (of a `.safetensors` tensor, only that slice's bytes). Without it
            a loaded leaf takes the sharding of the JAX array it replaces; a
            NumPy leaf stays a NumPy array, an abstract one becomes a JAX
            array on the default device (an error in a run of several JAX
            processes: pass the shardings over the global mesh).
        rename: `[(pattern, replacement), ...]` (or a dict), applied in
            order, from checkpoint names to model paths. A glob replaces the
            segments it matches and captures a segment with `{name}`:
            `("h.{i}.attn.c_attn", "blocks.{i}.attn.qkv")`; `"re:..."` or a
            compiled regex replaces its first match (`{name}`, `{1}` for
            groups). A tuple of replacements feeds several model leaves from
            one tensor (then a `transform` per leaf takes its part).
        skip: patterns (or selectors) of model leaves kept from
            initialisation, even where the checkpoint has a tensor for them.
        ignore: patterns of checkpoint names that nothing should use.
        transform: `[(pattern, fn), ...]` (or a dict), first match by model
            path: `fn(array) -> array` on the tensor read for that leaf (a
            NumPy array), e.g. `lambda w: w.T`, or the names `"transpose"`
            and a dtype such as `"bfloat16"` (a cast).
        stacked: `{path: axes}`, as everywhere: per-layer checkpoint tensors
            (`h.0...`, `h.1...`) fill the layers of a stacked leaf.
        strict: each rename, skip, ignore and transform rule must match
            something (`NoMatchError` with close matches otherwise).
        allow_missing: let model leaves without a tensor keep their values.
        allow_unused: let checkpoint tensors go unused.
        cast: the dtype policy. By default a tensor's dtype must be its
            leaf's (a bfloat16 checkpoint into a float32 model is an error);
            with `cast=True` a floating tensor is cast to its leaf's
            floating dtype (after any transform), shown per row in the
            report (`cast from bfloat16`). Other kinds must still agree.
        progress: show the load's progress (tensors, bytes, rate) on standard
            error when it is a terminal and the load moves at least 64 MiB.
            Needs tqdm (`pip install "treeglob[progress]"`).

    Returns:
        `(model, report)`: `target` with the loaded leaves replaced, and the
        `LoadReport` (`print(report)` for the table, `report.to_dict()`).

    Raises:
        LoadError: (a `ValueError`) missing, unused or mismatched tensors.
        NoMatchError: a rule that matches nothing (with `strict`).

    Examples:
        >>> import numpy as np, treeglob
        >>> ckpt = {"h.0.w": np.ones(2), "h.1.w": np.zeros(2), "head": np.ones(3)}
        >>> model = {"blocks": [{"w": np.zeros(2)}, {"w": np.zeros(2)}], "head": np.zeros(5)}
        >>> model, report = treeglob.load(model, ckpt, rename=[("h", "blocks")], skip=["head"])
        >>> model["blocks"][0]["w"], model["head"]
        (array([1., 1.]), array([0., 0., 0., 0., 0.]))
        >>> report.counts["loaded"], report.counts["skipped"]
        ({'leaves': 2, 'elements': 4}, {'leaves': 1, 'elements': 5})
    """
    with paused_gc():
        plan = _plan(
            target,
            source,
            caller="load",
            rename=rename,
            skip=skip,
            ignore=ignore,
            transform=transform,
            stacked=stacked,
            strict=strict,
            allow_missing=allow_missing,
            allow_unused=allow_unused,
            cast=cast,
        )
    plan.report.check("load")
    _check_values(plan)
    return _execute(plan, _shardings_per_leaf(plan.view, shardings), progress), plan.report


def _check_values(plan: _Plan) -> None:
    """What only `load` needs: values to keep, and values to read (before anything is read)."""
    view, checkpoint = plan.view, plan.checkpoint
    arrays = (jax.Array, np.ndarray)
    kept = [
        view.paths[r]
        for r in view.data_rows
        if plan.reads[r] is None and not isinstance(view.leaves[view.leaf_of(r)], arrays)
    ]
    abstract = sorted(
        {name for read in plan.reads if read is not None for name in read[0] if name in checkpoint.abstract}
    )
    # A kept layer's values come from the leaf, which another process may hold part of.
    kept_elsewhere = [
        view.paths[rows[0]]
        for leaf_index, rows in enumerate(_leaf_rows(view))
        if len(rows) > 1
        and not holds_whole(view.leaves[leaf_index])
        and any(plan.reads[r] is None for r in rows)
        and any(plan.reads[r] is not None for r in rows)
    ]
    if kept_elsewhere:
        raise LoadError(
            f"load(): {len(kept_elsewhere)} stacked leaves keep some layers and load others "
            f"({', '.join(kept_elsewhere[:3])}), but they lie on other JAX processes' devices too, so no "
            "process can keep their layers alone: load every layer, or skip the whole leaf.",
            plan.report,
        )
    for paths, what in (
        (
            kept,
            "are skipped or missing, but the model holds no values for them (abstract leaves): "
            "load them, or initialise the model first",
        ),
        (abstract, "of the source tree hold no values (abstract leaves): load from arrays or a file"),
    ):
        if paths:
            shown = ", ".join(paths[:_MAX_LISTED]) + (", ..." if len(paths) > _MAX_LISTED else "")
            raise LoadError(f"load(): {len(paths)} leaves {what}: {shown}.", plan.report)


def _leaf_rows(view: TreeView) -> list[list[int]]:
    """Per leaf: its rows, in layer order."""
    if view.origin is None:
        return [[r] for r in range(len(view))]
    out: list[list[int]] = [[] for _ in view.leaves]
    for row, leaf in enumerate(view.origin.tolist()):
        out[leaf].append(row)
    return out


def _shardings_per_leaf(view: TreeView, shardings: Any) -> list[Any]:
    if shardings is None:  # the sharding of the leaf replaced (a ShapeDtypeStruct may have one)
        placements = [getattr(leaf, "sharding", None) for leaf in view.leaves]
        _check_placed_across_processes(view, placements)
        return placements
    try:
        flat = view.out_treedef.flatten_up_to(shardings)
    except (ValueError, TypeError) as exc:
        raise TypeError(
            "load(): shardings must have the structure of the model (e.g. treeglob.shardings(model, "
            f"rules, mesh)): {exc}"
        ) from None
    _check_placed_across_processes(view, flat)
    for path, s, shape in zip(view.leaf_paths, flat, view.leaf_shapes, strict=True):
        if s is None:
            continue
        if not isinstance(s, jax.sharding.Sharding):
            raise TypeError(f"load(): shardings at {path!r} is {s!r}, not a jax.sharding.Sharding.")
        if shape is not None:
            try:
                s.shard_shape(shape)
            except (ValueError, IndexError, TypeError) as exc:
                raise ValueError(
                    f"load(): shardings at {path!r} ({s}) does not fit its shape {shape}: {exc}"
                ) from None
    return flat


def _check_placed_across_processes(view: TreeView, placements: list[Any]) -> None:
    """In a run of several JAX processes, an abstract leaf without a sharding would become an
    array on each process's first device, a different one per process: refused."""
    if jax.process_count() == 1:
        return
    unplaced = [
        path
        for path, leaf, sharding in zip(view.leaf_paths, view.leaves, placements, strict=True)
        if sharding is None and isinstance(leaf, jax.ShapeDtypeStruct)
    ]
    if unplaced:
        shown = ", ".join(unplaced[:3]) + (", ..." if len(unplaced) > 3 else "")
        raise ValueError(
            f"load(): this is one of {jax.process_count()} JAX processes, and {len(unplaced)} abstract "
            f"leaves have no sharding ({shown}): each process would load them onto its own first device. "
            "Pass shardings= over the global mesh (e.g. treeglob.shardings(model, rules, mesh) with a "
            "mesh of jax.devices()), or give each jax.ShapeDtypeStruct a sharding."
        )


def _execute(plan: _Plan, placements: list[Any], progress: bool) -> Any:
    view = plan.view
    placer = _Placer(list(view.leaves))
    loading = [
        (leaf_index, rows)
        for leaf_index, rows in enumerate(_leaf_rows(view))
        if any(plan.reads[r] is not None for r in rows)  # else skipped, not an array, or missing
    ]
    sizes = [
        math.prod(view.leaf_shapes[i] or ()) * jnp.dtype(view.leaves[i].dtype).itemsize if progress else 0
        for i, _ in loading
    ]
    what = f"loading {plan.checkpoint.where}"
    with show_progress(progress, "load", what, len(loading), sum(sizes)) as advance:
        for (leaf_index, rows), size in zip(loading, sizes, strict=True):
            with _named_failure(plan, rows):
                _load_leaf(plan, placements, placer, leaf_index, rows)
            advance(size)
        with _named_failure(plan, []):
            placer.flush()
    return jtu.tree_unflatten(view.treedef, placer.out)


@contextlib.contextmanager
def _named_failure(plan: _Plan, rows: list[int]) -> Iterator[None]:
    """Turn an error NumPy, JAX or the file system raises while a leaf is read and placed
    (a file changed since it was planned, a device out of memory) into a `LoadError` that
    names the leaf, its tensors and the file; treeglob's own errors pass as they are."""
    try:
        yield
    except (LoadError, SourceError):
        raise
    except Exception as exc:
        reads = [(plan.view.paths[r], read[0]) for r in rows if (read := plan.reads[r]) is not None]
        what = (
            ", ".join(f"{path!r} (from {' + '.join(map(repr, names))})" for path, names in reads[:3])
            if reads
            else "the last tensors read"
        )
        raise LoadError(
            f"load(): loading {what} from {plan.checkpoint.where} failed: {type(exc).__name__}: {exc}",
            plan.report,
        ) from exc


def _load_leaf(plan: _Plan, placements: list[Any], placer: _Placer, leaf_index: int, rows: list[int]) -> None:
    """Read one leaf (every layer of a stacked one) and place it."""
    leaf, sharding = plan.view.leaves[leaf_index], placements[leaf_index]
    shape, dtype = plan.view.leaf_shapes[leaf_index], jnp.dtype(leaf.dtype)
    assert shape is not None
    reader = _LeafReader(plan, leaf_index, rows, shape, dtype)
    if sharding is not None and len(sharding.device_set) > 1:
        read = plan.reads[rows[0]]
        if len(rows) == 1 and not plan.view.leaf_stacks[leaf_index] and read is not None and read[1] is None:
            placed = plan.checkpoint.read_placed(read[0][0], sharding)
            if placed is not None:
                placer.out[leaf_index] = placed
                return
        # Each slice this process's devices hold is read once, however many of them hold it
        # (the other processes read theirs): the whole tensor is never in one place. On one
        # device the whole tensor is read straight into its buffer instead.
        slices: dict[Box, np.ndarray] = {}
        arrays = []
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            where = box(index, shape)
            if where not in slices:
                slices[where] = reader.read(where)
            arrays.append(jax.device_put(slices[where], device))
        placer.out[leaf_index] = jax.block_until_ready(
            jax.make_array_from_single_device_arrays(shape, sharding, arrays)
        )
        return
    placer.place(leaf_index, reader.read(whole(shape)), leaf, sharding)


class _LeafReader:
    """The values of one leaf's slices: of each layer's tensor, only the bytes of the slice
    where the checkpoint reads slices and no transform needs the whole tensor."""

    def __init__(self, plan: _Plan, leaf_index: int, rows: list[int], shape: tuple[int, ...], dtype: Any):
        self.plan, self.rows, self.shape, self.dtype = plan, rows, shape, dtype
        self.leaf, self.stack = plan.view.leaves[leaf_index], plan.view.leaf_stacks[leaf_index]
        self.layer_shape = shape[len(self.stack) :]
        self.wholes: dict[int, Any] = {}  # whole layers that several slices are cut from

    def read(self, where: Box) -> np.ndarray:
        """`leaf[where]` as loaded (the whole leaf for a box of whole dimensions)."""
        depth = len(self.stack)
        if depth == 0:
            return self._layer(self.rows[0], where)
        out = np.empty(extent(where), self.dtype)
        layers = [range(start, stop) for start, stop in where[:depth]]
        for at in itertools.product(*layers):
            row = self.rows[int(np.ravel_multi_index(at, self.stack))]
            inside = tuple(a - start for a, (start, _) in zip(at, where, strict=False))
            if self.plan.reads[row] is None:  # a skipped (or allowed missing) layer keeps its values
                out[inside] = np.asarray(self.leaf[at])[slices(where[depth:])]
            else:
                out[inside] = self._layer(row, where[depth:])
        return out

    def _layer(self, row: int, where: Box) -> Any:
        names, fn = self.plan.reads[row]  # type: ignore[misc]
        if where == whole(self.layer_shape):  # read once, so not kept
            return self._read_whole(row)
        if fn is None and self.plan.checkpoint.slices:
            return self.plan.checkpoint.read_slice(names[0], slices(where))
        # A transform needs all of the tensor, and a format without slice reads reads all
        # of it: read once for all the slices cut from it.
        if row not in self.wholes:
            self.wholes[row] = self._read_whole(row)
        return np.asarray(self.wholes[row])[slices(where)]

    def _read_whole(self, row: int) -> Any:
        names, fn = self.plan.reads[row]  # type: ignore[misc]
        return _read(self.plan.checkpoint, names, fn, self.plan.view.paths[row], self.layer_shape, self.dtype)


class _Placer:
    """Puts loaded values where the leaves they replace are: a NumPy array stays one (dtypes
    such as float64 intact), anything else becomes a JAX array on the leaf's devices.

    Small tensors go to the devices in batches of up to `BATCH_BYTES`: one `device_put`
    of many small tensors costs little more than one of a single tensor. A larger tensor
    goes alone, at once. Waiting for each put bounds the host memory held beyond the model
    to one tensor, or one batch of small ones."""

    BATCH_BYTES = 8 * 2**20
    SMALL_BYTES = 2**20

    def __init__(self, out: list[Any]):
        self.out = out
        self.pending: list[tuple[int, Any, Any]] = []
        self.bytes = 0

    def place(self, index: int, value: Any, leaf: Any, sharding: Any) -> None:
        if sharding is None and isinstance(leaf, np.ndarray):
            self.out[index] = np.asarray(value)
            return
        size = value.nbytes  # a NumPy or JAX array's: never a copy to measure it
        if size >= self.SMALL_BYTES:
            self.flush()
        self.pending.append((index, value, sharding))
        self.bytes += size
        if size >= self.SMALL_BYTES or self.bytes >= self.BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        indices, values, shardings = zip(*self.pending, strict=True)
        placed = jax.device_put(list(values), list(shardings))
        # Wait for the copies, so that the host buffers are released before more are read.
        for index, array in zip(indices, jax.block_until_ready(placed), strict=True):
            self.out[index] = array
        self.pending, self.bytes = [], 0


def _read(
    checkpoint: Checkpoint,
    names: tuple[str, ...],
    fn: Callable[[Any], Any] | None,
    path: str,
    shape: tuple[int, ...],
    dtype: Any,
) -> Any:
    """The value of one leaf (one layer): its tensor, or for a combining transform the list of
    its tensors, through its transform; checked against the model's shape and dtype."""
    value = [checkpoint.read(name) for name in names] if combines(fn) else checkpoint.read(names[0])
    if fn is not None:
        source = " + ".join(map(repr, names))
        where = (
            f"load(): the transform {transform_name(fn)} for {path!r} (from {source} in {checkpoint.where})"
        )
        try:
            value = fn([np.asarray(v) for v in value] if isinstance(value, list) else np.asarray(value))
        except Exception as exc:
            hint = ""
            if not isinstance(value, list) and np.asarray(value).dtype.kind == "V":
                hint = (
                    f" The tensor's dtype is {np.asarray(value).dtype} (raw bytes: NumPy writes "
                    "bfloat16 so in .npz files); reinterpret it, e.g. lambda x: x.view(jnp.bfloat16)."
                )
            raise LoadError(f"{where} failed: {type(exc).__name__}: {exc}.{hint}", None) from exc
        if tuple(np.shape(value)) != shape or jnp.dtype(value.dtype) != dtype:
            raise LoadError(
                f"{where} gives {jnp.dtype(value.dtype)}{tuple(np.shape(value))}, "
                f"which is {dtype}{shape} in the model.",
                None,
            )
    return value


def save(
    path: str | os.PathLike[str],
    tree: Any,
    *,
    select: Any = None,
    stacked: Any = None,
    strict: bool = True,
    max_shard_size: int | None = None,
    rename: Any = None,
    transform: Any = None,
    skip: Any = None,
    ignore: Any = None,
    like: Any = None,
    progress: bool = False,
) -> list[str]:
    """Write a model's arrays (or a selection of them) to a `.safetensors` or `.npz` file.

    Each array leaf is one tensor named by its path, as `treeglob.paths`
    prints it, so `treeglob.load(model, path)` loads it back bit for bit.
    Under `stacked`, each layer of a stacked leaf is its own tensor
    (`blocks.0.attn.weight`, `blocks.1.attn.weight`, ...): the checkpoint of
    the same model built with a list of blocks. Non-array leaves are left out.

    With `rename` and `transform`, the model is exported under another
    checkpoint's names: these are the rules `treeglob.load` reads that
    checkpoint with, undone. A rename rule is undone (`("^transformer.h",
    "blocks")` writes `blocks.0...` as `transformer.h.0...`), a transform
    too (`transpose` transposes back, a cast writes the model's dtype), the
    leaves a `split` took from one tensor are joined into it, and a leaf
    `concat(axis, sizes=...)` or `stack` built is split into its tensors.
    One rule set serves both directions; a rule that cannot be undone (a
    regex, a wildcard, a Python function, a reshape) is a `ValueError`
    naming it. Before writing, the export is planned back in the load
    direction: the file loads into the model exactly, or nothing is written.

    A model whose arrays span several JAX processes is saved by all of them:
    every process makes the same call, and each writes the shards it holds
    into one `.safetensors` file, which process 0 renames into place.

    Args:
        path: the file to write, in the format its suffix names
            (`.safetensors`, or `.npz`, which has no bfloat16); written beside
            it and renamed, so a reader never sees half a file.
        tree: any PyTree of arrays.
        select: a selector (or pattern) of the leaves to write; all by default.
        stacked: `{path: axes}` for stacked layers, as everywhere.
        strict: a `select`, `skip`, rename or transform rule that matches
            nothing raises `NoMatchError`.
        max_shard_size: for a `.safetensors` path, the most bytes per file: a
            larger model is written as Hugging Face shards it
            (`model-00001-of-0000N.safetensors` files beside
            `model.safetensors.index.json`, which `treeglob.load` reads back).
        rename, transform: the load rules of the checkpoint to write, as
            `treeglob.load` takes them.
        skip: leaves the checkpoint does not hold (a new head): not written.
        ignore: as `load` takes it; tensors it names are never written, and
            the export must not need them.
        like: the checkpoint the export must match (any source `load` reads;
            only its headers are read): where the rules turn several names
            into a path (`("gamma", "weight")` turns `weight` back into
            `gamma`, though a dense layer's `weight` was `weight`), the name
            it holds is written, and each tensor must have its shape and
            dtype. Without it, the name renamed by the most rules is written.
        progress: show the save's progress (tensors, bytes, rate) on standard
            error when it is a terminal and the save writes at least 64 MiB.
            Needs tqdm (`pip install "treeglob[progress]"`).

    Returns:
        The names written, in file order.

    Raises:
        SaveError: (an `OSError`) the disk, or the directory, refused the write; the
            file there before is unchanged, and no part of the new one is left.
        ValueError: rules that cannot be undone, or would not load the export back.

    Examples:
        >>> import os, tempfile, numpy as np, treeglob
        >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
        >>> treeglob.save(path, {"blocks": [{"w": np.ones(2)}], "head": np.zeros(3), "act": "gelu"})
        ['blocks.0.w', 'head']
        >>> model, report = treeglob.load({"blocks": [{"w": np.zeros(2)}], "head": np.ones(3)}, path)
        >>> model["blocks"][0]["w"]
        array([1., 1.])

        Under the names of a checkpoint that fuses `q` and `k` into `qk`:

        >>> rules = dict(rename=[("qk", ("q", "k"))], transform=[("q", "split(2, 0)"), ("k", "split(2, 1)")])
        >>> treeglob.save(path, {"q": np.ones(2), "k": np.zeros(2)}, **rules)
        ['qk']
        >>> treeglob.load({"q": np.zeros(2), "k": np.ones(2)}, path, **rules)[0]
        {'k': array([0., 0.]), 'q': array([1., 1.])}
    """
    target = pathlib.Path(path)
    with paused_gc():
        view = view_of(tree, "save", stacked)
        # A model on several processes' devices is saved by all of them together: any
        # check failing on one of them fails on all, before the first write.
        together = any(spans_processes(leaf) for leaf in view.leaves)
        with agreed("planning the save", target) if together else contextlib.nullcontext():
            file_format = _checked_destination(target, max_shard_size, together)
            tensors, layer_of = _plan_save(
                view, tree, select, stacked, strict, rename, transform, skip, ignore, like
            )
    if together:
        save_from_every_process(target, tensors, view, layer_of)
        return [t.name for t in tensors]
    listed = [(t.name, t.shape, t.dtype) for t in tensors]
    total = sum(math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype in listed)
    with show_progress(progress, "save", f"saving {path}", len(tensors), total) as advance:

        def make(k: int) -> np.ndarray:
            value = tensors[k].make()
            advance(value.nbytes)
            return value

        if max_shard_size is not None:
            write_sharded(target, listed, make, max_shard_size)
        else:
            file_format.write(path, listed, make)
            if file_format.name == "safetensors":
                remove_stale(target)
    return [t.name for t in tensors]


def _checked_destination(target: pathlib.Path, max_shard_size: Any, together: bool) -> Any:
    """The format to write `target` in, its directory and shard size checked."""
    file_format = format_for_writing(target, "save")
    if not target.parent.is_dir():
        raise FileNotFoundError(
            f"save(): the directory {str(target.parent)!r} of {str(target)!r} does not exist."
        )
    if max_shard_size is not None and (
        file_format.name != "safetensors" or not (isinstance(max_shard_size, int) and max_shard_size > 0)
    ):
        raise ValueError(
            f"save(max_shard_size={max_shard_size!r}): shards are .safetensors files of a positive "
            f"number of bytes; write to a .safetensors path, e.g. max_shard_size=5 * 2**30."
        )
    if together and (file_format.name != "safetensors" or max_shard_size is not None):
        fix = "leave out max_shard_size" if max_shard_size is not None else "save to a .safetensors path"
        raise ValueError(
            "save(): the model spans several JAX processes, which save it together into one .safetensors "
            f"file: {fix}."
        )
    return file_format


def _plan_save(
    view: TreeView,
    tree: Any,
    select: Any,
    stacked: Any,
    strict: bool,
    rename: Any,
    transform: Any,
    skip: Any,
    ignore: Any,
    like: Any,
) -> tuple[list[Tensor], Callable[[int], tuple[int, ...]]]:
    """The tensors a save writes, and where each stacked row's layer is in its leaf."""
    rename_rules = parse_renames(rename or [])
    transforms = parse_transforms(transform or [])
    _check_arrays(view, "save")
    chosen = np.ones(len(view), dtype=bool)
    if select is not None:
        chosen = _resolve_rows(view, [(select, True)], "save", strict, "the selector given to save()")
    if skip_rules := [(p, True) for p in as_patterns(skip)]:
        chosen &= ~_resolve_rows(view, skip_rules, "save", strict, "the skip list given to save()")
    rows = [r for r in view.data_rows if chosen[r]]
    left_out = [r for r in view.data_rows if not chosen[r]]
    reference = None if like is None else open_checkpoint(like)

    def layer_of(row: int) -> tuple[int, ...]:
        stack = view.leaf_stacks[view.leaf_of(row)]
        return tuple(int(k) for k in np.unravel_index(view.row_layers[row], stack)) if stack else ()

    def value(row: int) -> np.ndarray:
        leaf = view.leaves[view.leaf_of(row)]
        if not holds_whole(leaf):
            raise ValueError(f"save(): {view.paths[row]}: {WHOLE_VALUE_ACROSS_PROCESSES}.")
        return np.asarray(leaf[layer_of(row)])

    tensors, expected = plan_export(
        view,
        rows,
        rename_rules,
        transforms,
        _choose_transforms(view, transforms, "save", strict),
        value,
        strict,
        left_out,
        reference,
    )
    if rename_rules or transforms or ignore:
        _check_export(tree, tensors, expected, rename, transform, skip, ignore, stacked)
    return tensors, layer_of


def _check_export(
    tree: Any,
    tensors: list[Tensor],
    expected: dict[int, tuple[str, ...]],
    rename: Any,
    transform: Any,
    skip: Any,
    ignore: Any,
    stacked: Any,
) -> None:
    """Plan the load of an export before it is written: each row must come back from the
    tensors it was written to, and every tensor must be used."""
    source = {t.name: jax.ShapeDtypeStruct(t.shape, t.dtype) for t in tensors}
    plan = _plan(
        tree,
        source,
        caller="save",
        rename=rename,
        skip=skip,
        ignore=ignore,
        transform=transform,
        stacked=stacked,
        strict=False,
        allow_missing=True,
        allow_unused=True,
    )
    rows = {row.path: row for row in plan.report.rows if row.path is not None}
    problems = []
    for r, names in expected.items():
        read = plan.reads[r]
        if read is None or tuple(read[0]) != names:
            path = plan.view.paths[r]
            back = rows[path]
            got = {
                "missing": "find no tensor for it",
                "skipped": "skip it",
                "mismatch": f"give it {back.source} that does not fit ({back.note})",
            }.get(back.status, f"load it from {back.source}")
            problems.append(f"{path}: written as {' + '.join(names)}, but the rules {got}")
    problems += [
        f"{row.source}: written, but the rules load it into nothing"
        for row in plan.report.rows
        if row.status in ("unused", "ignored")
    ]
    if problems:
        raise ValueError(
            f"save(): the rules would not load the export back into the model:\n{listing(problems)}\n"
            "Nothing was written. Check the rules in the load direction with treeglob.load_plan."
        )
