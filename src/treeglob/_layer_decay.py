"""Layer-wise learning-rate decay (BEiT / ELECTRA / timm `param_groups_layer_decay`).

With `L` blocks, block `i` is layer `i + 1`, the stem is layer 0 and the top
(the head) is layer `L + 1`; a leaf of layer `id` gets the learning-rate
scale `decay ** (L + 1 - id)`. This is timm's arithmetic exactly, so the
scales equal timm's `lr_scale` values bit for bit.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import optax

from . import presets
from ._conditions import glob
from ._errors import NoMatchError
from ._keys import quote, split_path
from ._recipes import scale_updates
from ._resolve import Resolution, resolve, view_of
from ._rules import normalize_rules
from ._selector import optional
from ._structure import find
from ._tree import TreeView

__all__ = ["layer_decay", "layer_decay_scales", "layer_ids"]


def _block_indices(view: TreeView, blocks: str) -> list[str]:
    """The index segments of the block sequence at the path `blocks`, in tree order."""
    if not isinstance(blocks, str) or not blocks:
        raise ValueError("blocks must be the path of the block sequence, e.g. 'blocks' or 'encoder.layers'.")
    hit = find(view.structure, split_path(blocks))
    if hit is None or not hit[1].children:
        raise NoMatchError(
            f"blocks={blocks!r} names no subtree of the tree.{view.close_subtrees(blocks)} Give the path of "
            "the block sequence as treeglob.paths() prints it; for blocks stacked with eqx.filter_vmap, also "
            "pass stacked={'<that path>': 1}."
        )
    indices = [segment for segment, _ in hit[1].children]
    for segment in indices:
        if not segment.isdecimal():
            raise ValueError(
                f"Layer ids come from the index after {blocks!r}, but {blocks}.{quote(segment)} has "
                f"{segment!r} there. "
                "Give blocks= the path of the list (or stacked module, with stacked=) of blocks."
            )
    return indices


def _layer_number(layer: Any, top: int, where: str) -> int:
    if (
        not isinstance(layer, numbers.Integral)
        or isinstance(layer, bool)
        or not -top - 1 <= int(layer) <= top
    ):
        raise ValueError(
            f"The layer id of {where} is {layer!r}; with {top - 1} blocks it must be an int from 0 (stem) "
            f"to {top} (top), or negative counting from the top: -1 is {top}, -2 the last block ({top - 1})."
        )
    return int(layer) % (top + 1)


def _layer_ids(
    tree: Any, caller: str, blocks: str, rules: Any, default: Any, strict: bool, stacked: Any
) -> tuple[Resolution, int]:
    view = view_of(tree, caller, stacked)
    indices = _block_indices(view, blocks)
    num_blocks = max(map(int, indices)) + 1
    top = num_blocks + 1
    # Blocks take precedence: the rules see only the leaves outside them, and
    # come first so that errors number them as the caller wrote them. A rule
    # that was optional stays optional.
    inside_blocks = glob(f"^{blocks}")
    outside = [
        (
            optional(r.selector - inside_blocks) if r.selector.may_be_empty else r.selector - inside_blocks,
            _layer_number(r.label, top, r.describe()),
        )
        for r in normalize_rules(rules)
    ]
    block_rules = [(glob(f"^{blocks}.{i}"), int(i) + 1) for i in indices]
    resolution = resolve(
        view,
        outside + block_rules,
        caller=caller,
        default=_layer_number(default, top, "default"),
        strict=strict,
    )
    return resolution, num_blocks


def _check_decay(decay: Any) -> None:
    if not isinstance(decay, numbers.Real) or isinstance(decay, bool) or decay <= 0:
        raise ValueError(f"decay must be a positive number such as 0.75, got {decay!r}.")


def layer_ids(
    tree: Any,
    *,
    blocks: str = "blocks",
    rules: Any = presets.TIMM_VIT_LAYERS,
    default: int = -1,
    stacked: Any = None,
    strict: bool = True,
) -> Any:
    """The layer id of every leaf: block `i` is `i + 1`, the rest from `rules`.

    Args:
        tree: the params.
        blocks: the path of the block sequence (a list, an int- or
            digit-keyed dict, or a stacked module with `stacked=`); the
            index after it numbers the blocks. Blocks take precedence over
            `rules`.
        rules: `(selector, layer id)` pairs for the leaves outside the
            blocks, first match wins. Ids are ints from 0 (stem) to `L + 1`
            (top), or negative from the top: -1 is `L + 1`, -2 is `L` (the
            last block). The default, `treeglob.presets.TIMM_VIT_LAYERS`, is
            timm's ViT grouping (stem tokens and embeddings 0, final `norm`
            with the last block).
        default: the id of leaves no rule matches; -1, the top, as in timm.
        stacked: `{path: axes}` for stacked blocks: a stacked leaf gets an
            int array of per-layer ids, shape `(L, 1, ...)`.
        strict: as in `treeglob.labels`.

    Examples:
        >>> import numpy as np, treeglob
        >>> vit = {"cls_token": 0, "blocks": [{"w": 0}, {"w": 0}], "norm": {"scale": 0}, "head": {"w": 0}}
        >>> treeglob.layer_ids(vit)
        {'blocks': [{'w': 1}, {'w': 2}], 'cls_token': 0, 'head': {'w': 3}, 'norm': {'scale': 2}}
    """
    return _layer_ids(tree, "layer_ids", blocks, rules, default, strict, stacked)[0].tree()


def layer_decay_scales(
    tree: Any,
    decay: float,
    *,
    blocks: str = "blocks",
    rules: Any = presets.TIMM_VIT_LAYERS,
    default: int = -1,
    stacked: Any = None,
    strict: bool = True,
) -> Any:
    """The learning-rate scale of every leaf: `decay ** (L + 1 - layer id)`.

    The tree `treeglob.layer_decay` multiplies the updates by, for logging or
    reuse. Arguments as in `treeglob.layer_ids`; under `stacked`, a stacked
    leaf gets a float array of shape `(L, 1, ...)` that broadcasts over it.

    Examples:
        >>> import treeglob
        >>> vit = {"cls_token": 0, "blocks": [{"w": 0}, {"w": 0}], "norm": {"scale": 0}, "head": {"w": 0}}
        >>> treeglob.layer_decay_scales(vit, 0.5)
        {'blocks': [{'w': 0.25}, {'w': 0.5}], 'cls_token': 0.125, 'head': {'w': 1.0}, 'norm': {'scale': 0.5}}
    """
    _check_decay(decay)
    return _scales(tree, "layer_decay_scales", decay, blocks, rules, default, strict, stacked)


def _scales(
    tree: Any, caller: str, decay: float, blocks: str, rules: Any, default: Any, strict: bool, stacked: Any
) -> Any:
    resolution, num_blocks = _layer_ids(tree, caller, blocks, rules, default, strict, stacked)
    top = num_blocks + 1

    def scale(layer: Any) -> Any:
        if isinstance(layer, np.ndarray):
            # Python floats, one per layer: the same arithmetic as the unstacked model.
            return np.array([decay ** (top - int(i)) for i in layer.flat]).reshape(layer.shape)
        return decay ** (top - layer)

    return resolution.tree(scale)


def layer_decay(
    decay: float,
    *,
    blocks: str = "blocks",
    rules: Any = presets.TIMM_VIT_LAYERS,
    default: int = -1,
    stacked: Any = None,
    strict: bool = True,
) -> optax.GradientTransformation:
    """Layer-wise learning-rate decay as one stateless transform.

    Chain it after the optimizer: `optax.chain(optax.adamw(lr, ...),
    treeglob.layer_decay(0.75))` multiplies each leaf's step by its scale
    from `treeglob.layer_decay_scales`, which is what timm's per-group
    `lr_scale` does, with one optimizer and one state for the whole model
    (not one optimizer per layer). Arguments as in `treeglob.layer_ids`.

    Examples:
        >>> import jax, jax.numpy as jnp, optax, treeglob
        >>> params = {"blocks": [jnp.ones(1), jnp.ones(1)], "head": jnp.ones(1)}
        >>> tx = optax.chain(optax.sgd(1.0), treeglob.layer_decay(0.5, rules=[]))
        >>> updates, _ = tx.update(params, tx.init(params))
        >>> [u.item() for u in jax.tree.leaves(updates)]
        [-0.25, -0.5, -1.0]
    """
    _check_decay(decay)
    return scale_updates(
        lambda tree: _scales(tree, "layer_decay", decay, blocks, rules, default, strict, stacked)
    )
