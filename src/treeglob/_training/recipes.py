"""Training recipes: weight-decay masks, freezing, per-leaf update scales.

Each recipe computes its selection from the tree optax hands over (params in
`init`, updates in `update`), at trace time, so a jitted step holds only the
arithmetic the recipe asks for: no mask, label or scale is a traced value.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import optax

from .. import presets
from .._core.resolve import Options
from .._core.rules import normalize_rules
from .._core.selector import Selector, coerce
from .schedules import check_factor, counted, merge_factors
from .wrapper import RuleWrapper

__all__ = ["decay_mask", "freeze", "gradual_unfreeze", "relabel", "scale_by_rules", "weight_decay"]


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

    One transform for the whole tree. Chain it after the optimizer:
    `optax.chain(optax.adamw(lr), scale_by_rules(...))` scales the step of
    each leaf like a per-group learning rate (AdamW's weight decay term
    included, as in PyTorch parameter groups). A label is a number or a
    schedule (a function of the step count, e.g. an optax schedule): a
    longer warmup for a new head, a backbone that starts at zero. With
    schedules the state is a step count (`optax.ScaleByScheduleState`),
    without them the transform is stateless. Under `stacked`, layers of one
    stacked leaf may get different factors, schedules included.

    Examples:
        >>> import jax.numpy as jnp, optax, treeglob
        >>> params = {"head": jnp.ones(2), "body": jnp.ones(2)}
        >>> tx = optax.chain(optax.sgd(1.0), treeglob.scale_by_rules([("body", 0.5)]))
        >>> updates, _ = tx.update(params, tx.init(params))
        >>> {k: v.tolist() for k, v in updates.items()}
        {'body': [-0.5, -0.5], 'head': [-1.0, -1.0]}
        >>> warmup = optax.linear_schedule(0.0, 1.0, transition_steps=4)
        >>> tx = optax.chain(optax.sgd(1.0), treeglob.scale_by_rules([("head", warmup)]))
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     updates, state = tx.update(params, state)
        >>> {k: v.tolist() for k, v in updates.items()}  # the head at step 1 of its warmup
        {'body': [-1.0, -1.0], 'head': [-0.25, -0.25]}
    """
    factors, scheduled = per_leaf_factors(
        rules, Options(default, strict, stacked, types_from), caller="scale_by_rules", what="factor"
    )
    return factors.scale(counted=scheduled)


def weight_decay(
    rules: Any,
    *,
    default: Any = 0.0,
    stacked: Any = None,
    strict: bool = True,
    types_from: Any = None,
) -> optax.GradientTransformation:
    """Decoupled weight decay with a rate per leaf from rules: `update + rate * param`.

    `optax.add_decayed_weights` with a rate (a number or a schedule) per
    rule instead of one rate and an on/off mask: 0.1 on matrices, 0.01 on
    embeddings, 0 on norms. Place it as AdamW does, between the direction
    and the learning rate: `optax.chain(optax.scale_by_adam(),
    treeglob.weight_decay(rules), optax.scale_by_learning_rate(lr))`. With
    one rate, that chain is `optax.adamw(lr, weight_decay=rate, mask=...)`
    exactly; to give a preset's labels rates, relabel it:
    `treeglob.relabel(treeglob.presets.DEFAULT, {"decay": 0.1, "no_decay": 0.0})`.

    Args:
        rules: `(selector, rate)` pairs or a dict `{rate: selector}`, first
            match wins; a rate is a real number or a schedule.
        default: the rate of leaves no rule matches.
        stacked, strict, types_from: as in `treeglob.labels`; layers of a
            stacked leaf may get different rates.

    Examples:
        >>> import jax, jax.numpy as jnp, optax, treeglob
        >>> params = {"emb": jnp.ones(2), "w": jnp.ones(2), "norm": jnp.ones(2)}
        >>> tx = treeglob.weight_decay([("emb", 0.01), ("w", 0.1)])
        >>> updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        >>> {k: round(v[0].item(), 4) for k, v in updates.items()}
        {'emb': 0.01, 'norm': 0.0, 'w': 0.1}
    """
    rates, scheduled = per_leaf_factors(
        rules, Options(default, strict, stacked, types_from), caller="weight_decay", what="rate"
    )
    return rates.add_params(counted=scheduled)


def per_leaf_factors(rules: Any, options: Options, *, caller: str, what: str) -> tuple[RuleWrapper, bool]:
    """The wrapper giving each leaf its factor (a number, a schedule, per-layer ones), and
    whether any factor is a schedule; `what` names the labels in messages ("rate")."""
    normalized = normalize_rules(rules, options.default)
    for r in normalized:
        check_factor(r.label, r.describe(), what)
    check_factor(options.default, "default", what)
    wrapper = RuleWrapper(rules=normalized, options=options, caller=caller, merge=merge_factors)
    return wrapper, counted([*normalized.labels(), options.default])


def relabel(rules: Any, mapping: Mapping[Any, Any]) -> list[tuple[Selector, Any]]:
    """The rules with each label replaced by `mapping[label]`: a preset's labels turned into
    numbers, e.g. weight-decay rates or learning-rate multipliers.

    Every label of the rules must be in `mapping`, and every key of `mapping`
    must be a label of the rules (a misspelt key would silently change nothing).

    Examples:
        >>> import treeglob
        >>> treeglob.relabel([("*.bias", "no_decay"), ("**", "decay")], {"decay": 0.1, "no_decay": 0.0})
        [(glob('*.bias'), 0.0), (glob('**'), 0.1)]
    """
    normalized = normalize_rules(rules)
    if not isinstance(mapping, Mapping):
        raise TypeError(f"relabel() maps labels with a dict {{label: value}}, got {type(mapping).__name__}.")
    produced = normalized.labels()
    missing = [label for label in produced if label not in mapping]
    unused = [key for key in mapping if key not in produced]
    if missing or unused:
        problems = [f"labels without a value: {missing!r}"] if missing else []
        problems += [f"keys no rule has as its label: {unused!r}"] if unused else []
        raise ValueError(
            f"relabel(): the mapping and the rules' labels disagree: {'; '.join(problems)}. The rules' "
            f"labels are {produced!r}; give each exactly one value (check the spelling)."
        )
    return [(r.selector, mapping[r.label]) for r in normalized]


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


def gradual_unfreeze(
    inner: optax.GradientTransformation,
    rules: Any,
    *,
    default: Any = 0,
    stacked: Any = None,
    strict: bool = True,
    types_from: Any = None,
) -> optax.GradientTransformation:
    """Train with `inner`, each leaf from the step its rule names: gradual unfreezing.

    The rules label leaves with the step from which they train, first match
    wins: `[("head", 0), ("blocks.{10..11}", 1000), ("blocks.{8..9}", 2000)]`
    trains the head alone until step 1,000, then blocks 10 and 11 as well,
    and so on. Before its step a leaf's update is exactly zero.

    `inner` runs on the whole tree from the first step (under `jit` its state
    must exist from the start, so the optimizer state costs what it costs
    without freezing), and sees every gradient: a leaf that unfreezes has
    the moments of its gradients so far, and schedules inside `inner` count
    from step 0. To keep no state for leaves that never train, use
    `treeglob.freeze`. Under `stacked`, layers of one stacked leaf may
    unfreeze at different steps.

    Args:
        inner: the optimizer (e.g. `optax.adamw(...)`).
        rules: `(selector, step)` pairs or a dict `{step: selector}`; a step
            is an int from 0 (trained from the start), or `math.inf` (never).
        default: the step of leaves no rule matches: 0, trained from the start.
        stacked, strict, types_from: as in `treeglob.labels`.

    Examples:
        >>> import jax.numpy as jnp, optax, treeglob
        >>> params = {"head": jnp.ones(1), "body": jnp.ones(1)}
        >>> tx = treeglob.gradual_unfreeze(optax.sgd(1.0), [("body", 2)])
        >>> state = tx.init(params)
        >>> for step in range(3):
        ...     updates, state = tx.update(params, state)
        ...     print(step, {k: v.item() for k, v in updates.items()})
        0 {'body': 0.0, 'head': -1.0}
        1 {'body': 0.0, 'head': -1.0}
        2 {'body': -1.0, 'head': -1.0}
    """
    starts = start_steps(rules, Options(default, strict, stacked, types_from), caller="gradual_unfreeze")
    return optax.chain(inner, starts.gate(trains_from, counted=True))


def start_steps(rules: Any, options: Options, *, caller: str) -> RuleWrapper:
    """The wrapper giving each leaf the step it trains from (per-layer steps under `stacked`)."""
    normalized = normalize_rules(rules, options.default)
    for r in normalized:
        _check_step(r.label, r.describe())
    _check_step(options.default, "default")
    return RuleWrapper(rules=normalized, options=options, caller=caller)


def trains_from(start: Any) -> Any:
    """A leaf's start step (or per-layer start steps) to its factor: 1 from that step on, else 0."""
    if isinstance(start, numbers.Real) and start == 0:
        return 1
    return lambda count: count >= np.asarray(start)


def _check_step(step: Any, where: str) -> None:
    if (
        isinstance(step, numbers.Integral) and not isinstance(step, bool) and int(step) >= 0
    ) or step == math.inf:
        return
    raise TypeError(
        f"The label of {where} is {step!r}; gradual_unfreeze() labels are the steps from which leaves "
        "train: ints from 0, or math.inf for never."
    )
