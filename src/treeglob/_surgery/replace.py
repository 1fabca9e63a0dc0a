"""Model surgery by selector: every selected module replaced by `fn(module)`.

The modules are those `treeglob.modules` lists (see `_core/nodes.py` for
what a selector means on modules). A tree is rebuilt around its new modules
(Equinox and penzai models, Linen and Haiku parameter dicts are immutable
values), except where its framework changes models in place (Flax NNX, see
`frameworks.in_place`). A module inside a stacked subtree is one layer of a
stacked module: its replacement is built for all layers at once under
`eqx.filter_vmap`, so the new module is stacked as the old one was.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np

from .._core.frameworks import in_place
from .._core.nodes import NodeView, node_view, one_level, selected_rows
from .._core.stacking import describe_layers

__all__ = ["replace_modules"]


def replace_modules(
    tree: Any,
    selector: Any,
    fn: Callable[..., Any],
    *,
    key: jax.Array | None = None,
    nested: str = "outermost",
    strict: bool = True,
    stacked: Any = None,
) -> Any:
    """The tree with every module `selector` selects replaced by `fn(module)`.

    The modules are those `treeglob.modules(tree, selector, nested=...)`
    lists. `fn` also gets `path=` (the module's path) if it has a parameter
    named `path`, and `key=` (a fresh PRNG key per module, split from `key`)
    when `key` is given. It may return any PyTree: a wrapped module (LoRA),
    another module (a merged `Linear`), a dict with more entries (LoRA
    factors beside a Linen kernel).

    Equinox and penzai models and parameter dicts are returned rebuilt, the
    input unchanged. A Flax NNX module is changed in place, as NNX does
    (`model.attn.query = nnx.LoRA(...)`), and returned. Under `stacked=`, a
    module inside a stacked subtree is replaced in every layer at once:
    `fn` runs under `eqx.filter_vmap` on one layer's slice, with one key per
    layer and `path` naming the layers `*`, so the result stays stacked.
    Selecting some of a stack's layers only is an error.

    Args:
        tree: an Equinox, Flax NNX or penzai model, or Linen/Haiku parameters.
        selector: a selector, or a value that coerces to one.
        fn: `fn(module, *, path=..., key=...) -> new module`.
        key: a PRNG key to split into one key per replaced module.
        nested: `"outermost"` or `"innermost"`, see `treeglob.modules`.
        strict: raise `NoMatchError` (with close matches) when nothing is selected.
        stacked: `{path: axes}` of stacked subtrees (see `treeglob.mask`).

    Examples:
        >>> import treeglob
        >>> params = {"attn": {"q": {"kernel": 2.0}, "k": {"kernel": 3.0}}}
        >>> treeglob.replace_modules(params, "attn.q", lambda m: {**m, "lora_b": 0.0})
        {'attn': {'k': {'kernel': 3.0}, 'q': {'kernel': 2.0, 'lora_b': 0.0}}}
    """
    call = _caller(fn, key is not None)
    view = node_view(tree, "replace_modules", stacked)
    adapter = in_place(tree)
    # One call of fn per module: a module held at several paths (an NNX module shared by two
    # attributes) is replaced once and stays shared; a stacked one once for all its layers.
    groups: dict[Any, list[int]] = {}
    for row in selected_rows(view, selector, nested=nested, strict=strict, caller="replace_modules"):
        real = view.real[row]
        one = ("layers", real) if view.layers[row] is not None else id(view.reals[real].obj)
        groups.setdefault(one, []).append(row)
    keys = [None] * len(groups) if key is None else list(_split_key(key, len(groups)))
    new: dict[int, Any] = {}
    for rows, k in zip(groups.values(), keys, strict=True):
        real = view.real[rows[0]]
        if view.layers[rows[0]] is None:
            value = call(view.reals[real].obj, view.paths[rows[0]], k)
            new.update(dict.fromkeys((view.real[r] for r in rows), value))
        elif adapter is not None:
            raise ValueError(
                f"replace_modules() cannot replace {view.star_path(rows[0])}: it lies in the layers of a "
                f"stacked {adapter.name} module, which is changed in place and cannot be rebuilt layer by "
                "layer. Replace the module before stacking it (e.g. inside the function nnx.vmap builds it with)."
            )
        else:
            new[real] = _per_layer(view, real, rows, call, k)
    if adapter is None:
        return _rebuild(tree, {view.reals[real].positions: value for real, value in new.items()})
    for real, value in new.items():
        node = view.reals[real]
        if node.parent < 0:
            return value  # the root itself: nothing holds it
        adapter.assign(view.reals[node.parent].obj, node.keys[-1], value)
    return tree


def _split_key(key: Any, n: int) -> Any:
    """`n` keys from the user's `key`, which must be a JAX PRNG key."""
    try:
        return jax.random.split(key, n)
    except Exception as exc:
        raise TypeError(
            f"replace_modules(key=...) takes a JAX PRNG key (jax.random.key(0)), got "
            f"{type(key).__name__}: {key!r} ({exc})."
        ) from None


def _caller(fn: Callable[..., Any], with_key: bool) -> Callable[[Any, str, Any], Any]:
    """`fn` called as the user wrote it: with `path=` if it takes one, `key=` if asked."""
    if not callable(fn):
        raise TypeError(
            f"replace_modules() takes a function fn(module) -> new module, got {type(fn).__name__}: {fn!r}."
        )
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: called with the module only
        params = {}
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    takes_path = "path" in params
    name = getattr(fn, "__qualname__", repr(fn))
    if with_key and "key" not in params and not open_kwargs:
        raise TypeError(
            f"replace_modules(key=...) passes each module's key as fn(module, key=...), but {name} "
            "takes no `key` parameter. Add one (e.g. lambda module, key: ...), or leave out key=."
        )

    def call(module: Any, path: str, key: Any) -> Any:
        kwargs: dict[str, Any] = {}
        if takes_path:
            kwargs["path"] = path
        if key is not None:
            kwargs["key"] = key
        try:
            out = fn(module, **kwargs)
        except Exception as exc:
            exc.add_note(f"treeglob: raised by {name} while replacing the module at {path!r}.")
            raise
        if out is None:
            raise TypeError(
                f"{name} returned None for the module at {path!r}; it must return the new module. "
                "(Changed it in place? Return it too.)"
            )
        return out

    return call


def _per_layer(
    view: NodeView, real: int, rows: list[int], call: Callable[[Any, str, Any], Any], key: Any
) -> Any:
    """The replacement of a module in a stacked subtree, built for every layer under vmap."""
    shape = view.stack_shapes[real]
    path = view.star_path(rows[0])
    if len(rows) != math.prod(shape):
        chosen = {view.layers[r] for r in rows}
        layers = describe_layers(shape, [index in chosen for index in np.ndindex(*shape)])
        raise ValueError(
            f"replace_modules() selects {len(rows)} of the {math.prod(shape)} stacked layers of {path} "
            f"(layers {layers}). A module in a stacked subtree is replaced in every layer at once, so "
            f"that the stack stays stacked: select every layer (e.g. {path!r}), or build the model "
            "with a list of blocks."
        )

    def one(module: Any, k: Any) -> Any:
        return call(module, path, k)

    fn = one
    for _ in shape:
        fn = eqx.filter_vmap(fn)
    layer_keys = None if key is None else jax.random.split(key, shape)
    return fn(view.reals[real].obj, layer_keys)


def _rebuild(node: Any, replaced: dict[tuple[int, ...], Any], at: tuple[int, ...] = ()) -> Any:
    """`node` with the subtree at each child-position path in `replaced` swapped for its value."""
    if at in replaced:
        return replaced[at]
    depth = len(at)
    below = {p[depth] for p in replaced if p[:depth] == at and len(p) > depth}
    if not below:
        return node
    children, treedef = one_level(node)
    rebuilt = [
        _rebuild(child, replaced, (*at, i)) if i in below else child for i, (_, child) in enumerate(children)
    ]
    return jtu.tree_unflatten(treedef, rebuilt)
