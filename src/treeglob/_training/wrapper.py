"""The one factory behind every optax wrapper: rules resolved on each tree optax hands over.

An optax wrapper sees the params at `init` and the updates at `update`. Both
are resolved with the same rules and options, so the mask, the labels or the
scales always have the exact structure of the tree they go with, also inside
other combinators. The wrapper resolves at `init` too, and remembers what it
saw there: under `nnx.Optimizer` the params hold NNX Variables
(`nnx.LoRAParam`, ...) and the updates bare arrays of the same paths, so a
Variable-type rule decides at `init` and its decisions serve at `update`.
Every resolution happens at trace time: a jitted step holds only the
arithmetic the wrapper asks for.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import jax.tree_util as jtu
import optax

from .._core.resolve import Recall, Resolution, resolve

__all__ = ["RuleWrapper"]


class RuleWrapper:
    """One wrapper's rules and options, resolved on any tree it is given.

    Args:
        resolver: the pipeline's `resolve` (or `select`), or a recipe's own
            function that builds its rules from the tree first (layer decay
            finds the blocks); it takes the tree, then `arguments`, and must
            pass `recall` on to `resolve`.
        **arguments: the rest of the resolver's arguments: `rules` (or
            `selector`), `options` (one `Options` value), `caller`, `merge`, ...
    """

    def __init__(self, resolver: Callable[..., Resolution] = resolve, **arguments: Any):
        self._resolver = resolver
        self._arguments = arguments
        self._recall = Recall()

    def __call__(self, tree: Any) -> Resolution:
        return self._resolver(tree, recall=self._recall, **self._arguments)

    def tree_fn(self, fn: Callable[[Any], Any] | None = None) -> Callable[[Any], Any]:
        """The function optax calls with the params and the updates: the per-leaf tree
        of values (passed through `fn` if given), e.g. a mask or labels."""
        return lambda tree: self(tree).tree(fn)

    def scale(self, factor: Callable[[Any], Any] | None = None) -> optax.GradientTransformation:
        """Multiply each update by its value (through `factor` if given); a factor of 1
        costs nothing. Stateless; `init` resolves the params (and remembers them)."""

        def init_fn(params: Any) -> optax.EmptyState:
            self(params)
            return optax.EmptyState()

        def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
            del params
            resolution = self(updates)
            view = resolution.view
            factors = resolution.values if factor is None else map(factor, resolution.values)
            # Leaf by leaf on the updates' own treedef: wrappers that optax sees in the
            # updates (penzai's ParameterValue) keep their place.
            scaled = [_times(leaf, f) for leaf, f in zip(view.leaves, factors, strict=True)]
            return jtu.tree_unflatten(view.treedef, scaled), state

        return optax.GradientTransformation(init_fn, update_fn)


def _times(update: Any, factor: Any) -> Any:
    if isinstance(factor, numbers.Number) and factor == 1:
        return update
    return update * jnp.asarray(factor, dtype=update.dtype)
