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
from .schedules import value_at

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

    def scale(
        self, factor: Callable[[Any], Any] | None = None, *, counted: bool = False
    ) -> optax.GradientTransformation:
        """Multiply each update by its value (through `factor` if given); a factor of 1
        costs nothing. `init` resolves the params (and remembers them).

        Args:
            factor: turns a leaf's value into its factor.
            counted: some factors are schedules (functions of the step count): the state
                is then a count, as in `optax.scale_by_schedule`; else the transform is
                stateless.
        """
        return self._transform(lambda update, param, f: update * f, factor, counted, needs_params=False)

    def gate(
        self, factor: Callable[[Any], Any] | None = None, *, counted: bool
    ) -> optax.GradientTransformation:
        """Keep each update where its value is true, zero it elsewhere (no `-0.0`, unlike
        a multiplication by 0); a value of 1 costs nothing. Arguments as in `scale`."""
        return self._transform(
            lambda update, param, f: jnp.where(f, update, 0), factor, counted, needs_params=False
        )

    def add_params(
        self, factor: Callable[[Any], Any] | None = None, *, counted: bool
    ) -> optax.GradientTransformation:
        """Add each param times its value to its update (decoupled weight decay, as
        `optax.add_decayed_weights`); a value of 0 costs nothing. Arguments as in `scale`."""
        return self._transform(
            lambda update, param, f: update + f * param, factor, counted, needs_params=True
        )

    def _transform(
        self,
        combine: Callable[[Any, Any, Any], Any],
        factor: Callable[[Any], Any] | None,
        counted: bool,
        needs_params: bool,
    ) -> optax.GradientTransformation:
        neutral = 0 if needs_params else 1

        def init_fn(params: Any) -> Any:
            self(params)
            return (
                optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)) if counted else optax.EmptyState()
            )

        def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
            resolution = self(updates)
            view = resolution.view
            factors = resolution.values if factor is None else list(map(factor, resolution.values))
            if counted:
                factors = [value_at(f, state.count) for f in factors]
                state = optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count))
            if needs_params:
                if params is None:
                    raise ValueError(
                        f"{self._arguments.get('caller')}() needs the params: pass them to update()."
                    )
                # The params in the updates' own structure (penzai's ParameterValue wrappers,
                # NNX Variables, optax's MaskedNode leaves stay where the updates have them).
                param_leaves = view.treedef.flatten_up_to(params)
            else:
                param_leaves = [None] * len(factors)
            # Leaf by leaf on the updates' own treedef: wrappers that optax sees in the
            # updates (penzai's ParameterValue) keep their place.
            out = [
                _apply(combine, update, param, f, neutral)
                for update, param, f in zip(view.leaves, param_leaves, factors, strict=True)
            ]
            return jtu.tree_unflatten(view.treedef, out), state

        return optax.GradientTransformation(init_fn, update_fn)


def _apply(
    combine: Callable[[Any, Any, Any], Any], update: Any, param: Any, factor: Any, neutral: int
) -> Any:
    """`combine(update, param, factor)`, skipped where the factor is statically neutral."""
    if isinstance(factor, numbers.Number) and factor == neutral:
        return update
    return combine(update, param, jnp.asarray(factor, dtype=update.dtype))
