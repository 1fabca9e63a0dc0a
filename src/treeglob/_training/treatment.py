"""Every parameter's treatment in one value: the optimizer, and the table of what each leaf gets.

A `Treatment` holds the rules of each aspect of training: learning-rate
multipliers (numbers or schedules), layer-wise decay, weight-decay rates,
the step each leaf trains from, its sharding. `optimizer()` chains
treeglob's transforms from them, and `table()` evaluates, at the steps
asked for, the per-leaf values of the very same resolutions the transforms
multiply by: what the table shows is what the optimizer does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec

from .. import presets
from .._core.resolve import Options, resolve, view_of
from .._core.rules import MISSING
from .._core.table import painter, render_table
from .._core.tree import TreeView
from .layer_decay import layer_scales
from .recipes import per_leaf_factors, start_steps, trains_from
from .schedules import at_step, check_factor, value_at
from .sharding import shardings
from .wrapper import RuleWrapper

__all__ = ["Treatment", "TreatmentTable"]

_LAYER_DECAY_KEYS = ("decay", "blocks", "rules", "default", "schedule")


def _layer_decay_arguments(value: Any) -> dict[str, Any] | None:
    """`layer_decay=` as the keyword arguments of `treeglob.layer_decay`."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        value = {"decay": value}
    unknown = [k for k in value if k not in _LAYER_DECAY_KEYS]
    if unknown or "decay" not in value:
        raise TypeError(
            f"Treatment(layer_decay=...) is a decay such as 0.75, or a dict with the arguments of "
            f"treeglob.layer_decay ({', '.join(_LAYER_DECAY_KEYS)}; decay required), got {value!r}."
        )
    return {"blocks": None, "rules": presets.TIMM_VIT_LAYERS, "default": -1, "schedule": None, **value}


@dataclass(frozen=True)
class Treatment:
    """The rules of every aspect of training, from which the optimizer and its table are built.

    Each aspect is a rule list (`(selector, value)` pairs or `{value:
    selector}`, first match wins) or None when not used. Its leaves without
    a matching rule get the aspect's neutral value.

    Attributes:
        learning_rate: the base learning rate, a number or a schedule.
        lr_scale: learning-rate multipliers, numbers or schedules (1 for the
            rest), as `treeglob.scale_by_rules`.
        layer_decay: layer-wise decay, as `treeglob.layer_decay`: a decay
            (`0.75`, timm's ViT layers), or a dict of its arguments
            (`{"decay": 0.75, "blocks": "stages.*.blocks.*", "rules": ...,
            "schedule": ...}`).
        weight_decay: decoupled weight-decay rates, numbers or schedules (0
            for the rest), as `treeglob.weight_decay`.
        unfreeze: the step each leaf trains from (0 for the rest), as
            `treeglob.gradual_unfreeze`.
        sharding: `PartitionSpec` rules (replicated for the rest), as `treeglob.shardings`.
        labels: names of the groups, shown in the table (e.g. a weight-decay
            preset's labels); every leaf needs one.
        stacked: `{path: axes}` for stacked layers, for every aspect.
        strict: as in `treeglob.labels`, for every aspect.

    The optimizer is `inner`, then the decayed weights, the learning rate,
    the multipliers and the layer scales, each leaf's update kept from its
    step on. A leaf's effective learning rate at step `t` is
    `learning_rate(t) * lr_scale(t) * layer scale`, 0 before its step; its
    weight decay is applied as AdamW does, `rate * param` times that
    learning rate.

    Examples:
        >>> import jax.numpy as jnp, optax, treeglob
        >>> params = {"body": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, "head": jnp.ones((2, 2))}
        >>> treatment = treeglob.Treatment(
        ...     learning_rate=1e-3,
        ...     lr_scale=[("head", 10.0)],
        ...     weight_decay=[("*.w", 0.05), ("head", 0.01)],
        ...     unfreeze=[("body", 100)],
        ... )
        >>> tx = treatment.optimizer(optax.scale_by_adam())
        >>> print(treatment.table(params, steps=[0, 100]))
        path    shape   lr@0    lr@100  wd@0  wd@100
        body.b  (2,)    frozen  0.001      0       0
        body.w  (2, 2)  frozen  0.001   0.05    0.05
        head    (2, 2)  0.01    0.01    0.01    0.01
        <BLANKLINE>
        lr@0    lr@100  wd@0  wd@100  leaves  elements  share
        frozen  0.001      0       0       1         2  20.0%
        frozen  0.001   0.05    0.05       1         4  40.0%
        0.01    0.01    0.01    0.01       1         4  40.0%
    """

    learning_rate: Any = 1.0
    lr_scale: Any = None
    layer_decay: Any = None
    weight_decay: Any = None
    unfreeze: Any = None
    sharding: Any = None
    labels: Any = None
    stacked: Any = None
    strict: bool = True

    def __post_init__(self) -> None:
        check_factor(self.learning_rate, "Treatment()", "learning_rate")
        self._aspects(None)  # every rule list checked now, not at the first step

    def _options(self, default: Any, types_from: Any) -> Options:
        return Options(default, self.strict, self.stacked, types_from)

    def _aspects(self, types_from: Any) -> _Aspects:
        """The wrappers of every aspect given, built as the public transforms build them."""
        caller = "Treatment"
        lr = decay = layers = starts = None
        if self.lr_scale is not None:
            lr = per_leaf_factors(self.lr_scale, self._options(1.0, types_from), caller=caller, what="factor")
        if self.weight_decay is not None:
            options = self._options(0.0, types_from)
            decay = per_leaf_factors(self.weight_decay, options, caller=caller, what="rate")
        arguments = _layer_decay_arguments(self.layer_decay)
        if arguments is not None:
            schedule = arguments.pop("schedule")
            options = self._options(arguments.pop("default"), types_from)
            layers = (*layer_scales(**arguments, schedule=schedule, options=options, caller=caller), schedule)
        if self.unfreeze is not None:
            starts = start_steps(self.unfreeze, self._options(0, types_from), caller=caller)
        return _Aspects(lr, decay, layers, starts)

    def optimizer(
        self, inner: optax.GradientTransformation, *, types_from: Any = None
    ) -> optax.GradientTransformation:
        """The optimizer: `inner` (the update direction, without a learning rate, e.g.
        `optax.scale_by_adam()`), then every aspect.

        Args:
            inner: the update direction; a learning rate inside it would apply twice.
            types_from: as in `treeglob.mask` (for module-type rules on an NNX State).
        """
        aspects = self._aspects(types_from)
        parts = [inner]
        if aspects.decay is not None:
            rates, scheduled = aspects.decay
            parts.append(rates.add_params(counted=scheduled))
        parts.append(optax.scale_by_learning_rate(self.learning_rate))
        if aspects.lr is not None:
            factors, scheduled = aspects.lr
            parts.append(factors.scale(counted=scheduled))
        if aspects.layers is not None:
            scales, factor, _ = aspects.layers
            parts.append(scales.scale(factor, counted=factor is not None))
        if aspects.starts is not None:
            parts.append(aspects.starts.gate(trains_from, counted=True))
        return optax.chain(*parts)

    def shardings(self, tree: Any, mesh: Mesh) -> Any:
        """The `NamedSharding` of every leaf, from `sharding` (see `treeglob.shardings`)."""
        if self.sharding is None:
            raise ValueError("Treatment.shardings() needs sharding rules: Treatment(sharding=[...]).")
        return shardings(tree, self.sharding, mesh, stacked=self.stacked, strict=self.strict)

    def table(
        self, tree: Any, steps: Sequence[int] | int = (0,), *, types_from: Any = None
    ) -> TreatmentTable:
        """What every leaf (every layer under `stacked`) gets at each of `steps`: its label,
        effective learning rate (or frozen), weight-decay rate and sharding.

        Args:
            tree: the params (or the model, for types; see `treeglob.mask`).
            steps: a step, or the steps to show.
            types_from: as in `treeglob.mask`.
        """
        steps = (steps,) if isinstance(steps, int) else tuple(steps)
        if not steps or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps):
            raise ValueError(f"Treatment.table(): steps must be ints from 0, e.g. [0, 1000], got {steps!r}.")
        view = view_of(tree, "Treatment.table", self.stacked)
        aspects = self._aspects(types_from)
        lr = [np.full(len(view), at_step(self.learning_rate, s)) for s in steps]
        if aspects.lr is not None:
            values = aspects.lr[0](view).values
            lr = [rate * _rows(view, values, s) for rate, s in zip(lr, steps, strict=True)]
        if aspects.layers is not None:
            scales, _, schedule = aspects.layers
            per_row = _rows(view, scales(view).values, 0)
            lr = [
                rate * per_row * (1.0 if schedule is None else at_step(schedule, s))
                for rate, s in zip(lr, steps, strict=True)
            ]
        trained = [np.ones(len(view), bool)] * len(steps)
        if aspects.starts is not None:
            starts = _rows(view, aspects.starts(view).values, 0)
            trained = [starts <= s for s in steps]
        decay = None
        if aspects.decay is not None:
            values = aspects.decay[0](view).values
            decay = [_rows(view, values, s) for s in steps]
        options = self._options(MISSING, types_from)
        labels = sharding = None
        if self.labels is not None:
            labels = _row_labels(resolve(view, self.labels, options, caller="Treatment"))
        if self.sharding is not None:
            resolution = resolve(
                view, self.sharding, self._options(PartitionSpec(), types_from), caller="Treatment"
            )
            sharding = [_spec(s) for s in _row_labels(resolution)]
        return TreatmentTable(
            view.paths, view.shapes, view.sizes, steps, lr, trained, decay, labels, sharding
        )


@dataclass(frozen=True)
class _Aspects:
    lr: tuple[RuleWrapper, bool] | None
    decay: tuple[RuleWrapper, bool] | None
    layers: tuple[RuleWrapper, Any, Any] | None  # the scales, their factor function, the schedule
    starts: RuleWrapper | None


def _rows(view: TreeView, per_leaf: list[Any], step: int) -> np.ndarray:
    """Per-leaf factors at `step`, one float per row (a stacked leaf's per-layer values spread
    to its layers' rows). Each distinct factor is evaluated once."""
    at: dict[int, np.ndarray] = {}
    leaf_values = []
    for factor in per_leaf:
        value = at.get(id(factor))
        if value is None:
            value = at[id(factor)] = np.asarray(value_at(factor, step), np.float64).reshape(-1)
        leaf_values.append(value)
    origin = view.origin if view.origin is not None else np.arange(len(per_leaf))
    layers = view.row_layers
    return np.array(
        [
            leaf_values[leaf][layer if leaf_values[leaf].size > 1 else 0]
            for leaf, layer in zip(origin, layers, strict=True)
        ]
    )


def _row_labels(resolution: Any) -> list[Any]:
    return [resolution.label_of(int(d)) for d in resolution.decided]


def _spec(spec: Any) -> str:
    # Written out, not repr(): its form differs between JAX versions.
    return f"P({', '.join(map(repr, spec))})" if isinstance(spec, PartitionSpec) else repr(spec)


def _number(value: float) -> str:
    return f"{value:.4g}"


@dataclass(frozen=True)
class TreatmentTable:
    """What `Treatment.table` returns: per row (leaf, or layer of a stacked leaf) and step,
    the effective learning rate, whether it trains, its weight-decay rate; its label and
    sharding. `str()` renders it as an aligned table with a summary of the distinct
    treatments; `to_dict()` gives the same as plain data."""

    paths: list[str]
    shapes: list[Any]
    sizes: list[Any]
    steps: tuple[int, ...]
    lr: list[np.ndarray] = field(repr=False)  # per step, per row: the effective learning rate
    trained: list[np.ndarray] = field(repr=False)  # per step, per row: whether it trains
    weight_decay: list[np.ndarray] | None = field(repr=False)  # per step, per row: the rate
    labels: list[Any] | None = field(repr=False)
    sharding: list[str] | None = field(repr=False)

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        """The columns after path and shape: their headers, and their cells per row."""
        headers: list[str] = []
        columns: list[list[str]] = []
        if self.labels is not None:
            headers.append("label")
            columns.append([str(label) for label in self.labels])
        for step, lr, trained in zip(self.steps, self.lr, self.trained, strict=True):
            headers.append(f"lr@{step}")
            columns.append(
                [_number(v) if t else "frozen" for v, t in zip(lr.tolist(), trained.tolist(), strict=True)]
            )
        for step, rates in zip(self.steps, self.weight_decay or (), strict=False):
            headers.append(f"wd@{step}")
            columns.append([_number(v) for v in rates.tolist()])
        if self.sharding is not None:
            headers.append("sharding")
            columns.append(self.sharding)
        return headers, [list(row) for row in zip(*columns, strict=True)]

    def format(self, width: int | None = None, color: bool = False) -> str:
        """The table, then one line per distinct treatment with its leaves, elements and share."""
        headers, rows = self._cells()
        numeric = {i + 2 for i, h in enumerate(headers) if h.startswith(("lr@", "wd@"))}
        table = [("path", "shape", *headers)]
        table += [
            (path or "<root>", "-" if shape is None else str(shape), *cells)
            for path, shape, cells in zip(self.paths, self.shapes, rows, strict=True)
        ]
        paint = painter(color)
        lines = render_table(table, right=numeric, long=0, width=width, paint=paint)
        groups: dict[tuple[str, ...], list[int]] = {}
        for cells, size in zip(rows, self.sizes, strict=True):
            count = groups.setdefault(tuple(cells), [0, 0])
            count[0] += 1
            count[1] += size or 0
        total = sum(elements for _, elements in groups.values()) or 1
        summary = [(*headers, "leaves", "elements", "share")]
        summary += [
            (*cells, str(n), f"{elements:,}", f"{100 * elements / total:.1f}%")
            for cells, (n, elements) in groups.items()
        ]
        right = {i - 2 for i in numeric} | {len(headers), len(headers) + 1, len(headers) + 2}
        return "\n".join([*lines, "", *render_table(summary, right=right, long=0, width=width, paint=paint)])

    def __str__(self) -> str:
        return self.format()

    def to_dict(self) -> dict[str, Any]:
        """Plain data: `{"steps": [...], "leaves": [{"path", "shape", "size", "lr": [per step,
        None when frozen], "weight_decay": [...], "label", "sharding"}]}`."""
        leaves = []
        for row, (path, shape, size) in enumerate(zip(self.paths, self.shapes, self.sizes, strict=True)):
            leaf: dict[str, Any] = {"path": path, "shape": shape, "size": size}
            if self.labels is not None:
                leaf["label"] = self.labels[row]
            leaf["lr"] = [
                float(lr[row]) if t[row] else None for lr, t in zip(self.lr, self.trained, strict=True)
            ]
            if self.weight_decay is not None:
                leaf["weight_decay"] = [float(w[row]) for w in self.weight_decay]
            if self.sharding is not None:
                leaf["sharding"] = self.sharding[row]
            leaves.append(leaf)
        return {"steps": list(self.steps), "leaves": leaves}
