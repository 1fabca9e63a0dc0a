"""Selectors as the filters of the frameworks' own APIs, for gradient-side freezing.

`freeze` keeps no optimizer state for frozen leaves, but their gradients
are still computed. Differentiating only the trainable part saves the
memory and time of the frozen gradients: in Equinox by splitting the model
with `eqx.partition` (`partition` here), in Flax NNX with a filter
(`nnx_filter`) for `nnx.state`, `nnx.split`, `nnx.DiffState` and
`nnx.Optimizer(wrt=...)`. Both are built from `mask`, so they select
exactly what every other treeglob output selects.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

from .._core.resolve import Options, select

__all__ = ["nnx_filter", "partition"]


def partition(tree: Any, selector: Any, *, strict: bool = True, stacked: Any = None) -> tuple[Any, Any]:
    """`eqx.partition` by selector: `(selected, rest)`, the arrays `selector` selects and the others.

    The selected part holds only arrays (what `jax.grad` can differentiate);
    every other leaf goes to the rest. Differentiate the selected part alone
    and combine it back (`eqx.combine(selected, rest)`) inside the loss:
    frozen leaves then get no gradient at all (gradient-side freezing).

    Args:
        tree: an Equinox model or any PyTree.
        selector: what to train (a selector, or a value that coerces to one).
        strict: raise `NoMatchError` (with close matches) when nothing is selected.
        stacked: `{path: axes}` of stacked subtrees; a selection must take a stacked
            leaf whole (all its layers or none).

    Examples:
        >>> import numpy as np, treeglob
        >>> model = {"base": np.ones(2), "lora_a": np.zeros(2), "act": "gelu"}
        >>> trainable, frozen = treeglob.partition(model, "lora_*")
        >>> trainable
        {'act': None, 'base': None, 'lora_a': array([0., 0.])}
        >>> frozen
        {'act': 'gelu', 'base': array([1., 1.]), 'lora_a': None}
    """
    selected = select(tree, selector, Options(strict=strict, stacked=stacked), caller="partition").tree()
    spec = jtu.tree_map(lambda hit, leaf: hit and eqx.is_array(leaf), selected, tree)
    return eqx.partition(tree, spec)


class _PathFilter:
    """An NNX filter `(path, value) -> bool` that selects a fixed set of graph paths."""

    def __init__(self, paths: frozenset[tuple[Hashable, ...]], described: str):
        self.paths = paths
        self.described = described

    def __call__(self, path: tuple[Hashable, ...], value: Any) -> bool:
        return tuple(path) in self.paths

    def __repr__(self) -> str:
        return f"treeglob.nnx_filter({self.described}, {len(self.paths)} variables)"


def nnx_filter(
    model: Any, selector: Any, *, variables: Any = None, strict: bool = True, stacked: Any = None
) -> _PathFilter:
    """A Flax NNX filter that selects the Variables of `model` that `selector` selects.

    Use it wherever NNX takes a filter: `nnx.state(model, f)`,
    `nnx.split(model, f, ...)`, `nnx.DiffState(0, f)`,
    `nnx.Optimizer(model, tx, wrt=f)`. The selector is resolved on the
    model's `variables` (its `nnx.Param` variables, LoRA's `nnx.LoRAParam` among them,
    unless told otherwise) with the model's module types, as
    `treeglob.mask(nnx.state(model, variables), selector, types_from=model)`:
    `tg.inside(nnx.LayerNorm)`, `"blocks.{0..5}"` and `nnx.LoRAParam` all
    work, and a path never drags in batch statistics or RNG counters, which
    `nnx.grad` cannot differentiate. The filter is a function of the paths
    chosen now: build it again after replacing modules.

    The filter is a function, not a `treeglob.Selector`: a selector is
    deliberately never callable, since optax would call it as a schedule.

    Args:
        model: a Flax NNX module.
        selector: a selector, or a value that coerces to one.
        variables: the NNX filter of the Variables to choose from (default
            `nnx.Param`; e.g. `nnx.Any(nnx.Param, nnx.BatchStat)`).
        strict: raise `NoMatchError` (with close matches) when nothing is selected.
        stacked: `{path: axes}` of stacked subtrees; a selection must take a stacked
            Variable whole.
    """
    import flax.nnx as nnx  # only ever called with an NNX model: flax is then installed

    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"nnx_filter() takes a Flax NNX module, got {type(model).__name__}. For an Equinox model "
            "use treeglob.partition(model, selector); for any other tree, treeglob.mask."
        )
    state = nnx.state(model, nnx.Param if variables is None else variables)
    options = Options(strict=strict, stacked=stacked, types_from=model)
    selected = select(state, selector, options, caller="nnx_filter").tree()
    # An NNX State is nested mappings, list indices included: every key is a DictKey.
    paths = frozenset(
        tuple(key.key for key in path) for path, hit in jtu.tree_flatten_with_path(selected)[0] if hit
    )
    return _PathFilter(paths, repr(selector))
