"""Per-leaf factors that may change with the step: numbers, optax schedules, per-layer mixes.

A factor is what a numeric-label recipe multiplies (or adds) per leaf: a
number, a NumPy array of per-layer numbers (a stacked leaf whose layers get
different numbers), or a function of the step count: an optax schedule, or
the per-layer mix of schedules and numbers that a stacked leaf merges to.
Static factors stay Python values, so a factor of 1 costs nothing in the
compiled step; a schedule is evaluated at the transform's own count.

The report evaluates the very same labels at a concrete step, row by row,
so that the table of treatments shows what the transforms compute.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax.numpy as jnp
import numpy as np

from .._core.resolve import MERGES
from .._core.rules import same_label
from .._core.selector import Selector
from .._core.tree import TreeView

__all__ = [
    "PerLayer",
    "at_step",
    "check_factor",
    "counted",
    "is_schedule",
    "merge_factors",
    "value_at",
]


def is_schedule(value: Any) -> bool:
    """A function of the step count (an optax schedule); a class or a selector is not one."""
    return callable(value) and not isinstance(value, type | Selector)


def check_factor(value: Any, where: str, what: str) -> None:
    """A real number or a schedule, else a `TypeError` naming `where`."""
    if is_schedule(value):
        return
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(
            f"The {what} of {where} is {value!r}; give a real number or a schedule (a function of the "
            "step count, e.g. optax.linear_schedule(0.0, 1.0, 100))."
        )


class PerLayer:
    """The factor of a stacked leaf whose layers get different schedules (or schedules and
    numbers): at a step, an array of shape `stack + (1,) * per-layer ndim`."""

    def __init__(self, distinct: list[Any], index: np.ndarray):
        self.distinct = distinct
        self.index = index  # per layer, the position of its value in `distinct`

    def __call__(self, count: Any) -> Any:
        values = jnp.stack([jnp.asarray(value_at(v, count), jnp.float32) for v in self.distinct])
        return values[self.index]


def merge_factors(view: TreeView, caller: str, leaf: int, values: list[Any], stack: tuple[int, ...]) -> Any:
    """The layers of a stacked leaf merged into its factor: equal ones into one, numbers into
    a per-layer array (as `labels` does), schedules among them into a `PerLayer`."""
    if not any(map(is_schedule, values)):
        return MERGES["numbers"](view, caller, leaf, values, stack)
    distinct: list[Any] = []
    for value in values:
        if not any(same_label(value, seen) for seen in distinct):
            distinct.append(value)
    if len(distinct) == 1:
        return distinct[0]
    shape = view.leaf_shapes[leaf] or ()
    index = [next(i for i, seen in enumerate(distinct) if same_label(v, seen)) for v in values]
    return PerLayer(distinct, np.asarray(index).reshape(stack + (1,) * (len(shape) - len(stack))))


def value_at(factor: Any, count: Any) -> Any:
    """The factor at step `count` (a traced count in a transform, an int in a report)."""
    return factor(count) if is_schedule(factor) else factor


def counted(values: list[Any]) -> bool:
    """Whether any of the rules' labels needs the step count."""
    return any(map(is_schedule, values))


def at_step(factor: Any, step: int) -> float:
    """A row's label at a concrete step, as a Python float (for reports)."""
    return float(np.asarray(value_at(factor, step)))
