"""optax glue: `masked` and `multi_transform` that select from the params they see.

Both delegate to optax's own `masked` / `partition` with a function that
builds the mask or labels from the tree optax hands over (params in `init`,
updates in `update`). Handing optax a function rather than a tree avoids its
two traps with Equinox: `optax.partition` calls a label tree that is callable
at the root (an `eqx.Module`-shaped tree is), and `inject_hyperparams` treats
any callable as a schedule. The state and the compiled step are optax's own;
masks are built at trace time, so a jitted step contains no trace of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optax

from .._core.resolve import Options, select
from .._core.rules import MISSING, normalize_rules
from .._core.selector import coerce
from .wrapper import RuleWrapper

__all__ = ["masked", "multi_transform"]


def masked(
    inner: optax.GradientTransformation,
    selector: Any,
    *,
    strict: bool = True,
    stacked: Any = None,
    types_from: Any = None,
) -> optax.GradientTransformation:
    """Apply `inner` only to the leaves `selector` selects (`optax.masked`).

    The mask is computed from the params given to `init` and from the
    updates given to `update`, so it always has their exact structure, also
    inside other combinators (where masked-out leaves are `MaskedNode` values).
    Unselected leaves pass through unchanged and get no inner state.

    Args:
        inner: the transformation for the selected leaves.
        selector: a selector or a value that coerces to one.
        strict, stacked, types_from: as in `treeglob.mask`.

    Examples:
        >>> import jax.numpy as jnp, optax, treeglob
        >>> params = {"w": jnp.ones(2), "b": jnp.ones(2)}
        >>> tx = treeglob.masked(optax.scale(-0.5), "w")
        >>> updates, _ = tx.update(params, tx.init(params))
        >>> {k: v.tolist() for k, v in updates.items()}
        {'b': [1.0, 1.0], 'w': [-0.5, -0.5]}
    """
    options = Options(strict=strict, stacked=stacked, types_from=types_from)
    mask_of = RuleWrapper(select, selector=coerce(selector), options=options, caller="masked").tree_fn()
    return optax.masked(inner, mask_of)


def multi_transform(
    transforms: Mapping[Any, optax.GradientTransformation],
    rules: Any,
    *,
    default: Any = MISSING,
    strict: bool = True,
    stacked: Any = None,
    types_from: Any = None,
) -> optax.GradientTransformation:
    """One transformation per label, labels from rules (`optax.partition`).

    The rules follow `treeglob.labels` (first match wins, strictness,
    `default`). The transforms' keys and the rules' labels (with `default`)
    must agree exactly; this is checked when the transformation is built.

    The raw-optax equivalents, for a fixed tree: `optax.partition(transforms,
    lambda _: labels)` (never pass an Equinox-shaped label tree directly),
    and for masks under `inject_hyperparams`:
    `optax.inject_hyperparams(optax.adamw, static_args=("mask",))(..., mask=m)`.

    Args:
        transforms: a mapping from label to transformation.
        rules: as in `treeglob.labels`.
        default: the label of leaves no rule matches.
        strict: as in `treeglob.labels`.
        stacked: as in `treeglob.labels`; all layers of a stacked leaf need
            the same label (one leaf goes to one transform), else a
            `ValueError` names the leaf and its labels.
        types_from: as in `treeglob.mask`.

    Raises:
        ValueError: a label without a transform, or a transform no rule produces.

    Examples:
        >>> import jax.numpy as jnp, optax, treeglob
        >>> params = {"emb": jnp.ones(2), "w": jnp.ones(2)}
        >>> tx = treeglob.multi_transform(
        ...     {"frozen": optax.set_to_zero(), "train": optax.sgd(0.5)},
        ...     [("emb", "frozen")], default="train")
        >>> updates, _ = tx.update(params, tx.init(params))
        >>> {k: v.tolist() for k, v in updates.items()}
        {'emb': [0.0, 0.0], 'w': [-0.5, -0.5]}
    """
    if not isinstance(transforms, Mapping):
        raise TypeError(
            f"transforms must be a dict {{label: transformation}}, got {type(transforms).__name__}."
        )
    normalized = normalize_rules(rules, default)
    produced = normalized.labels(default)
    missing = [label for label in produced if label not in transforms]
    unused = [label for label in transforms if label not in produced]
    if missing or unused:
        problems = []
        if missing:
            problems.append(f"labels with no transform: {missing!r}")
        if unused:
            problems.append(f"transforms no rule or default produces: {unused!r}")
        raise ValueError(
            "The transforms and the rule labels of multi_transform() disagree: "
            + "; ".join(problems)
            + f".\nTransform keys: {list(transforms)!r}; rule labels: {produced!r}.\n"
            "Give every label exactly one transform (check the spelling), or remove the extra ones."
        )

    options = Options(default, strict, stacked, types_from)
    labels_of = RuleWrapper(
        rules=normalized, options=options, caller="multi_transform", merge="label"
    ).tree_fn()
    return optax.partition(dict(transforms), labels_of)
