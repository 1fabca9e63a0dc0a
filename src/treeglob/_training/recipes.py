"""Training recipes: weight-decay masks, freezing, per-leaf update scales.

Each recipe computes its selection from the tree optax hands over (params in
`init`, updates in `update`), at trace time, so a jitted step holds only the
arithmetic the recipe asks for: no mask, label or scale is a traced value.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import optax

from .. import presets
from .._core.resolve import Options
from .._core.rules import normalize_rules
from .._core.selector import coerce
from .wrapper import RuleWrapper

__all__ = ["decay_mask", "freeze", "scale_by_rules"]


def decay_mask(
    rules: Any = presets.DEFAULT,
    *,
    label: Any = "decay",
    stacked: Any = None,
    strict: bool = True,
    types_from: Any = None,
) -> Callable[[Any], Any]:
    """A weight-decay mask for `optax.adamw(mask=...)`: True where the rules say `label`.

    Returns a function of the params (optax calls it with the params in
    `init` and the updates in `update`), so the mask always has their exact
    structure and one AdamW with one state covers the whole model.

    Args:
        rules: a rule list labelling every leaf, by default
            `treeglob.presets.DEFAULT`; also `presets.NANOGPT`, `presets.TIMM`,
            `presets.HF`, or your own list.
        label: the label that means "decay".
        stacked: `{path: axes}` for stacked layers (see `treeglob.mask`), so
            that `ndim` sees the per-layer shape.
        strict: as in `treeglob.labels`.
        types_from: as in `treeglob.mask` (for module-type rules on a Flax
            NNX State, pass the model).

    Examples:
        >>> import jax.numpy as jnp, optax, treeglob
        >>> params = {"fc": {"weight": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
        >>> treeglob.decay_mask()(params)
        {'fc': {'bias': False, 'weight': True}}
        >>> tx = optax.adamw(1e-3, weight_decay=0.1, mask=treeglob.decay_mask(treeglob.presets.NANOGPT))
    """
    normalized = normalize_rules(rules)
    if label not in normalized.labels():
        raise ValueError(
            f"decay_mask(): no rule has the label {label!r}; the rules' labels are "
            f"{normalized.labels()!r}. Pass label=<the label meaning decay>."
        )

    options = Options(strict=strict, stacked=stacked, types_from=types_from)
    return RuleWrapper(rules=normalized, options=options, caller="decay_mask").tree_fn(lambda v: v == label)


def scale_by_rules(
    rules: Any, *, default: Any = 1.0, stacked: Any = None, strict: bool = True, types_from: Any = None
) -> optax.GradientTransformation:
    """Multiply each update by its numeric label: learning-rate multipliers by rule.

    Stateless and one transform for the whole tree. Chain it after the
    optimizer: `optax.chain(optax.adamw(lr), scale_by_rules(...))` scales the
    step of each leaf like a per-group learning rate (AdamW's weight decay
    term included, as in PyTorch parameter groups). Under `stacked`, layers
    of one stacked leaf may get different factors.

    Examples:
        >>> import jax.numpy as jnp, optax, treeglob
        >>> params = {"head": jnp.ones(2), "body": jnp.ones(2)}
        >>> tx = optax.chain(optax.sgd(1.0), treeglob.scale_by_rules([("body", 0.5)]))
        >>> updates, _ = tx.update(params, tx.init(params))
        >>> {k: v.tolist() for k, v in updates.items()}
        {'body': [-0.5, -0.5], 'head': [-1.0, -1.0]}
    """
    normalized = normalize_rules(rules, default)
    for r in normalized:
        _check_number(r.label, r.describe())
    _check_number(default, "default")

    options = Options(default, strict, stacked, types_from)
    return RuleWrapper(rules=normalized, options=options, caller="scale_by_rules").scale()


def _check_number(value: Any, where: str) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"The factor of {where} is {value!r}; scale factors must be real numbers.")


def freeze(
    inner: optax.GradientTransformation,
    frozen: Any,
    *,
    stacked: Any = None,
    strict: bool = True,
    types_from: Any = None,
) -> optax.GradientTransformation:
    """Train with `inner`, except the `frozen` leaves: zero updates and no optimizer state.

    Frozen leaves are split off with `optax.partition` before `inner` sees
    them, so `inner` (e.g. Adam) allocates state only for the trainable
    leaves. For LoRA-style fine-tuning freeze everything but the adapters:
    `freeze(optax.adam(1e-3), ~treeglob.glob("*lora*"))`.

    Under `stacked`, a selection may freeze some layers of a stacked leaf
    (e.g. `"blocks.{0..3}"`): such a leaf stays with `inner` (its state
    covers the whole leaf) and its update is multiplied by 0 on the frozen
    layers and 1 elsewhere, which gives exactly zero updates there.

    Args:
        inner: the optimizer of the trainable leaves.
        frozen: a selector or a value that coerces to one.
        stacked: `{path: axes}` for stacked layers (see `treeglob.mask`).
        strict: raise `NoMatchError` when `frozen` (or a negated operand in
            it) matches nothing.
        types_from: as in `treeglob.mask`.

    Examples:
        >>> import jax, jax.numpy as jnp, optax, treeglob
        >>> params = {"backbone": jnp.ones(3), "lora_a": jnp.ones(2)}
        >>> tx = treeglob.freeze(optax.adam(0.1), "backbone")
        >>> state = tx.init(params)
        >>> updates, _ = tx.update(params, state)
        >>> {k: [round(x, 4) for x in v.tolist()] for k, v in updates.items()}
        {'backbone': [0.0, 0.0, 0.0], 'lora_a': [-0.1, -0.1]}
        >>> sum(x.size for x in jax.tree.leaves(state))  # Adam's mu and nu for lora_a, and a count
        5
    """
    # 0.0 on frozen rows, 1.0 elsewhere; a stacked leaf frozen on some
    # layers only gets a per-layer array of them.
    factors = RuleWrapper(
        rules=normalize_rules([(coerce(frozen), 0.0)]),
        options=Options(1.0, strict, stacked, types_from),
        caller="freeze",
        subject="the selector given to freeze()",
    )
    split = optax.partition(
        {"train": inner, "frozen": optax.set_to_zero()},
        factors.tree_fn(lambda f: "frozen" if _all_frozen(f) else "train"),
    )
    if stacked is None:
        return split
    # Wholly frozen leaves are already zero (set_to_zero): their factor stays 1.
    return optax.chain(split, factors.scale(lambda f: 1.0 if _all_frozen(f) else f))


def _all_frozen(factor: Any) -> bool:
    return isinstance(factor, float) and factor == 0.0
