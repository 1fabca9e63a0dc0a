"""Layer-wise learning-rate decay (BEiT / ELECTRA / timm `param_groups_layer_decay`).

With `L` blocks, block `i` is layer `i + 1`, the stem is layer 0 and the top
(the head) is layer `L + 1`; a leaf of layer `id` gets the learning-rate
scale `decay ** (L + 1 - id)`. This is timm's arithmetic exactly, so the
scales equal timm's `lr_scale` values bit for bit.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
import optax

from .. import presets
from .._core.conditions import glob
from .._core.errors import NoMatchError
from .._core.keys import quote, split_path
from .._core.pattern import compile_glob
from .._core.resolve import Options, Recall, Resolution, resolve, view_of
from .._core.rules import normalize_rules
from .._core.selector import optional
from .._core.structure import find, find_nodes
from .._core.tree import TreeView
from .layers import JOIN_NEXT, JOIN_PREVIOUS, LayerGroups
from .schedules import check_factor
from .wrapper import RuleWrapper

__all__ = ["layer_decay", "layer_decay_scales", "layer_ids"]


class _Block(NamedTuple):
    path: str  # printed path of the block's subtree
    segments: tuple[str, ...]
    layer: int  # its layer id: 1 for the first block


def _is_path(text: str) -> bool:
    """Whether `text` is a printed path (no glob syntax outside quotes)."""
    return ".".join(map(quote, split_path(text))) == text


def _blocks_at(view: TreeView, blocks: str) -> list[_Block]:
    """The children of the node at path `blocks`, numbered by their index."""
    hit = find(view.structure, split_path(blocks))
    if hit is None or not hit[1].children:
        raise NoMatchError(
            f"blocks={blocks!r} names no subtree of the tree.{view.close_subtrees(blocks)} Give the path of "
            "the block sequence as treeglob.paths() prints it, or a pattern for its blocks (e.g. "
            "'stages.*.blocks.*'); for stacked blocks (eqx.filter_vmap, nnx.vmap, a penzai LayerStack, "
            "hk.layer_stack), also pass stacked={'<that path>': 1} (treeglob.stacked_layers(model) gives it "
            "where the model declares it)."
        )
    out = []
    for segment, _ in hit[1].children:
        if not segment.isdecimal():
            raise ValueError(
                f"Layer ids come from the index after {blocks!r}, but {blocks}.{quote(segment)} has "
                f"{segment!r} there. Give blocks= the path of the list (or stacked module, with stacked=) "
                "of blocks, or a pattern that matches the blocks themselves (e.g. 'stages.*.blocks.*')."
            )
        out.append(_Block(f"{blocks}.{segment}", (*split_path(blocks), segment), int(segment) + 1))
    return out


def _blocks_matching(view: TreeView, pattern: str) -> list[_Block]:
    """The subtrees the glob `pattern` matches as a whole path, numbered in order: by the
    numbers in their keys (`encoderblock_10` after `encoderblock_9`, as Flax and Haiku
    name blocks), keys without a number in tree order."""
    compiled = compile_glob("^" + pattern.removeprefix("^").removesuffix("$") + "$")
    found = [segments for segments, _ in find_nodes(view.structure, compiled)]
    if not found:
        raise NoMatchError(
            f"blocks={pattern!r} matches no subtree from the root of the tree: blocks= is anchored at the "
            "root, a path to where the blocks are. Give a pattern whose matches are the blocks themselves "
            "(e.g. 'stages.*.blocks.*' or 'layer{1..4}.*'), or the path of the block "
            f"sequence.{view.close_subtrees(pattern)}"
        )
    order = _check_order(pattern, found)
    found.sort(key=lambda segments: tuple(order[segments[: d + 1]] for d in range(len(segments))))
    return [_Block(".".join(map(quote, segs)), segs, i + 1) for i, segs in enumerate(found)]


_DIGITS = re.compile(r"(\d+)")


def _check_order(pattern: str, found: list[tuple[str, ...]]) -> dict[tuple[str, ...], Any]:
    """The sort key of every node on the way to the blocks: among siblings, keys that carry
    numbers sort by them (`encoderblock_10` after `encoderblock_9`), keys without digits by
    their place in the tree. Where the keys do not say the order, refuse rather than guess:
    siblings of which some carry a number and some do not, numbered keys whose text differs
    (`enc_0`, `dec_0`), or two keys with the same numbers (`b01`, `b1`)."""
    children: dict[tuple[str, ...], dict[str, None]] = {}  # parent -> its keys in tree order
    for segments in found:
        for depth in range(len(segments)):
            children.setdefault(segments[:depth], {})[segments[depth]] = None
    order: dict[tuple[str, ...], Any] = {}
    for parent, keys in children.items():
        parts = {key: _DIGITS.split(key) for key in keys}
        numbers = {key: tuple(map(int, p[1::2])) for key, p in parts.items() if len(p) > 1}
        texts = {tuple(p[0::2]) for key, p in parts.items() if key in numbers}
        problem = ""
        if numbers and len(numbers) < len(keys):
            problem = "keys with and without a number"
        elif len(texts) > 1:
            problem = "numbered keys of different names"
        elif len(set(numbers.values())) < len(numbers):
            problem = "the same numbers in different keys"
        if problem:
            listed = ", ".join(".".join(map(quote, (*parent, k))) for k in keys)
            raise ValueError(
                f"blocks={pattern!r}: the order of the blocks is ambiguous ({problem}): {listed}. Blocks are "
                "numbered by the numbers in their keys; narrow the pattern to the numbered blocks (e.g. "
                "'encoder.layer_*'), or place the others with rules."
            )
        for place, key in enumerate(keys):
            order[(*parent, key)] = numbers.get(key, (place,))
    return order


def _layer_number(layer: Any, top: int, where: str) -> Any:
    if layer is JOIN_NEXT or layer is JOIN_PREVIOUS:
        return layer
    if (
        not isinstance(layer, numbers.Integral)
        or isinstance(layer, bool)
        or not -top - 1 <= int(layer) <= top
    ):
        raise ValueError(
            f"The layer id of {where} is {layer!r}; with {top - 1} blocks it must be an int from 0 (stem) "
            f"to {top} (top), negative counting from the top (-1 is {top}, -2 the last block, {top - 1}), "
            "or treeglob.JOIN_NEXT / treeglob.JOIN_PREVIOUS."
        )
    return int(layer) % (top + 1)


def _joined(blocks: list[_Block]):
    """Row labels to layer ids: JOIN_NEXT / JOIN_PREVIOUS become the id of the first / last
    of the blocks whose paths share the longest prefix with the row's path."""

    def common(a: tuple[str, ...], b: tuple[str, ...]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    def relabel(view: TreeView, rows: list[Any]) -> list[Any]:
        out = list(rows)
        for i, label in enumerate(rows):
            if label is JOIN_NEXT or label is JOIN_PREVIOUS:
                shared = [common(view.segments[i], b.segments) for b in blocks]
                nearest = [b for b, n in zip(blocks, shared, strict=True) if n == max(shared)]
                out[i] = (nearest[0] if label is JOIN_NEXT else nearest[-1]).layer
        return out

    return relabel


def _layer_ids(
    tree: Any, blocks: str | None, rules: Any, options: Options, *, caller: str, recall: Recall | None = None
) -> tuple[Resolution, int]:
    """The layer id of every leaf (the rules built from the blocks found in the tree, or in
    `types_from`, where the rules are resolved), and the number of blocks."""
    stacked, types_from = options.stacked, options.types_from
    view = view_of(tree, caller, stacked)
    if isinstance(rules, LayerGroups):  # an explicit blocks= wins over the family's
        blocks, rules = rules.blocks if blocks is None else blocks, rules.rules
    blocks = "blocks" if blocks is None else blocks
    if not isinstance(blocks, str) or not blocks:
        raise ValueError(
            "blocks must be the path of the block sequence (e.g. 'blocks', 'encoder.layers') or a pattern "
            "matching the blocks (e.g. 'stages.*.blocks.*')."
        )
    source = view if types_from is None else view_of(types_from, caller, stacked)
    found = _blocks_at(source, blocks) if _is_path(blocks) else _blocks_matching(source, blocks)
    num_blocks = max(b.layer for b in found)
    top = num_blocks + 1
    # Blocks take precedence: the rules see only the leaves outside them, and
    # come first so that errors number them as the caller wrote them. A rule
    # that was optional stays optional.
    inside_blocks = glob("^" + blocks.removeprefix("^").removesuffix("$"))
    outside = [
        (
            optional(r.selector - inside_blocks) if r.selector.may_be_empty else r.selector - inside_blocks,
            _layer_number(r.label, top, r.describe()),
        )
        for r in normalize_rules(rules)
    ]
    block_rules = [(glob("^" + b.path), b.layer) for b in found]
    default = _layer_number(options.default, top, "default")
    options = replace(options, default=default)
    resolution = resolve(
        view, outside + block_rules, options, caller=caller, relabel=_joined(found), recall=recall
    )
    return resolution, num_blocks


def _check_decay(decay: Any) -> None:
    if not isinstance(decay, numbers.Real) or isinstance(decay, bool) or decay <= 0:
        raise ValueError(f"decay must be a positive number such as 0.75, got {decay!r}.")


def layer_ids(
    tree: Any,
    *,
    blocks: str | None = None,
    rules: Any = presets.TIMM_VIT_LAYERS,
    default: int = -1,
    stacked: Any = None,
    strict: bool = True,
    types_from: Any = None,
) -> Any:
    """The layer id of every leaf: block `i` is `i + 1`, the rest from `rules`.

    Args:
        tree: the params.
        blocks: where the blocks are. The path of the block sequence (a
            list, an int- or digit-keyed dict, or a stacked module with
            `stacked=`): the index after it numbers the blocks. Or a glob
            whose matched subtrees are the blocks, numbered by the numbers
            in their keys (`encoderblock_10` after `encoderblock_9`), keys
            without a number in tree order, for models with nested stages:
            `"stages.*.blocks.*"`, `"layer{1..4}.*"`. Siblings whose keys
            leave the order open (some with a number and some without,
            different names around the numbers, equal numbers) are a
            `ValueError` that lists them.
            Blocks take precedence over `rules`. By default the blocks of
            the `LayerGroups` given as `rules`, or `"blocks"`.
        rules: `(selector, layer id)` pairs for the leaves outside the
            blocks, first match wins, or a `treeglob.LayerGroups` (a
            family's blocks and rules, e.g. `presets.TIMM_CONVNEXT_LAYERS`).
            Ids are ints from 0 (stem) to `L + 1` (top), negative from the
            top (-1 is `L + 1`, -2 is `L`, the last block), or
            `treeglob.JOIN_NEXT` / `treeglob.JOIN_PREVIOUS`: the first / last
            of the blocks nearest the leaf (sharing the longest path prefix
            with it), e.g. a stage's downsample joins the stage's first block.
            The default, `treeglob.presets.TIMM_VIT_LAYERS`, is timm's ViT
            grouping (stem tokens and embeddings 0, final `norm` with the
            last block).
        default: the id of leaves no rule matches; -1, the top, as in timm.
        stacked: `{path: axes}` for stacked blocks: a stacked leaf gets an
            int array of per-layer ids, shape `(L, 1, ...)`.
        strict: as in `treeglob.labels`.
        types_from: as in `treeglob.mask` (the blocks are found in it, too).

    Examples:
        >>> import numpy as np, treeglob
        >>> vit = {"cls_token": 0, "blocks": [{"w": 0}, {"w": 0}], "norm": {"scale": 0}, "head": {"w": 0}}
        >>> treeglob.layer_ids(vit)
        {'blocks': [{'w': 1}, {'w': 2}], 'cls_token': 0, 'head': {'w': 3}, 'norm': {'scale': 2}}
        >>> convnext = {"stem": 0, "stages": [{"blocks": [0, 0]}, {"downsample": 0, "blocks": [0]}], "head": 0}
        >>> treeglob.layer_ids(convnext, blocks="stages.*.blocks.*", rules=[("stem", 0), ("downsample", treeglob.JOIN_NEXT)])
        {'head': 4, 'stages': [{'blocks': [1, 2]}, {'blocks': [3], 'downsample': 3}], 'stem': 0}
    """
    options = Options(default, strict, stacked, types_from)
    return _layer_ids(tree, blocks, rules, options, caller="layer_ids")[0].tree()


def layer_decay_scales(
    tree: Any,
    decay: float,
    *,
    blocks: str | None = None,
    rules: Any = presets.TIMM_VIT_LAYERS,
    default: int = -1,
    stacked: Any = None,
    strict: bool = True,
    types_from: Any = None,
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
    options = Options(default, strict, stacked, types_from)
    return _scales(tree, decay, blocks, rules, options, caller="layer_decay_scales").tree()


def _scale(decay: float, top: int) -> Any:
    """A layer id (or per-layer ids of a stacked leaf) to its scale `decay ** (top - id)`."""

    def scale(layer: Any) -> Any:
        if isinstance(layer, np.ndarray):
            # Python floats, one per layer: the same arithmetic as the unstacked model.
            return np.array([decay ** (top - int(i)) for i in layer.flat]).reshape(layer.shape)
        return decay ** (top - layer)

    return scale


def _scales(
    tree: Any,
    decay: float,
    blocks: str | None,
    rules: Any,
    options: Options,
    *,
    caller: str,
    recall: Recall | None = None,
) -> Resolution:
    """The resolution of the layer ids, its values turned into scales."""
    resolution, num_blocks = _layer_ids(tree, blocks, rules, options, caller=caller, recall=recall)
    return replace(resolution, values=list(map(_scale(decay, num_blocks + 1), resolution.values)))


def layer_decay(
    decay: float,
    *,
    blocks: str | None = None,
    rules: Any = presets.TIMM_VIT_LAYERS,
    default: int = -1,
    schedule: Any = None,
    stacked: Any = None,
    strict: bool = True,
    types_from: Any = None,
) -> optax.GradientTransformation:
    """Layer-wise learning-rate decay as one transform.

    Chain it after the optimizer: `optax.chain(optax.adamw(lr, ...),
    treeglob.layer_decay(0.75))` multiplies each leaf's step by its scale
    from `treeglob.layer_decay_scales`, which is what timm's per-group
    `lr_scale` does, with one optimizer and one state for the whole model
    (not one optimizer per layer). Arguments as in `treeglob.layer_ids`,
    and:

    Args:
        schedule: an overall schedule (a function of the step count) the
            scales are multiplied by: each leaf's factor at step `t` is
            `schedule(t) * scale`. The state is then a step count; without
            it the transform is stateless.

    Examples:
        >>> import jax, jax.numpy as jnp, optax, treeglob
        >>> params = {"blocks": [jnp.ones(1), jnp.ones(1)], "head": jnp.ones(1)}
        >>> tx = optax.chain(optax.sgd(1.0), treeglob.layer_decay(0.5, rules=[]))
        >>> updates, _ = tx.update(params, tx.init(params))
        >>> [u.item() for u in jax.tree.leaves(updates)]
        [-0.25, -0.5, -1.0]
    """
    options = Options(default, strict, stacked, types_from)
    scales, factor = layer_scales(decay, blocks, rules, schedule, options, caller="layer_decay")
    return scales.scale(factor, counted=factor is not None)


def layer_scales(
    decay: float, blocks: str | None, rules: Any, schedule: Any, options: Options, *, caller: str
) -> tuple[RuleWrapper, Any]:
    """The wrapper giving each leaf its scale, and the function that turns a scale into
    its factor under `schedule` (None without one)."""
    _check_decay(decay)
    scales = RuleWrapper(_scales, decay=decay, blocks=blocks, rules=rules, options=options, caller=caller)
    if schedule is None:
        return scales, None
    check_factor(schedule, f"{caller}()", "schedule")
    return scales, lambda scale: lambda count: schedule(count) * scale
