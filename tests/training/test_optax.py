"""optax glue: numerical checks under jax.jit against hand-written masks and formulas."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

import treeglob as tg

NO_DECAY = tg.any_of("*.bias", eqx.nn.LayerNorm, eqx.nn.Embedding)


def hand_written_decay_mask(params):
    """The seed's approach: isinstance trees and eqx.tree_at."""

    def set_mask(x):
        if isinstance(x, eqx.nn.Linear):
            mask = jtu.tree_map(lambda _: True, x)
            return mask if x.bias is None else eqx.tree_at(lambda m: m.bias, mask, False)
        if isinstance(x, eqx.nn.LayerNorm | eqx.nn.Embedding):
            return jtu.tree_map(lambda _: False, x)
        return jtu.tree_map(lambda _: True, x)

    return jtu.tree_map(
        set_mask, params, is_leaf=lambda x: isinstance(x, eqx.nn.Linear | eqx.nn.LayerNorm | eqx.nn.Embedding)
    )


def grads_like(params, seed):
    leaves, treedef = jtu.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jtu.tree_unflatten(
        treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


def run(tx, params, steps=3):
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    state = tx.init(params)
    out = []
    for i in range(steps):
        updates, state = step(grads_like(params, i), state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return params, out


def assert_trees_close(a, b):
    assert jtu.tree_structure(a) == jtu.tree_structure(b)
    for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_mask_equals_the_hand_written_one(params):
    assert tg.mask(params, ~NO_DECAY) == hand_written_decay_mask(params)


def test_masked_decay_matches_the_formula(params):
    lr, wd = 0.1, 0.5
    tx = optax.chain(tg.masked(optax.add_decayed_weights(wd), ~NO_DECAY), optax.sgd(lr))
    new_params, _ = run(tx, params, steps=1)
    decay = hand_written_decay_mask(params)
    expected = jtu.tree_map(lambda p, g, d: p - lr * (g + wd * p * d), params, grads_like(params, 0), decay)
    assert_trees_close(new_params, expected)


def test_masked_adamw_equals_optax_with_a_hand_mask(params):
    ours = tg.masked(optax.adamw(1e-2, weight_decay=0.1), "blocks")
    reference = optax.masked(optax.adamw(1e-2, weight_decay=0.1), tg.mask(params, "blocks"))
    a, _ = run(ours, params)
    b, _ = run(reference, params)
    assert_trees_close(a, b)
    assert jtu.tree_structure(ours.init(params)) == jtu.tree_structure(reference.init(params))


def test_multi_transform_equals_partition_with_hand_labels(params):
    transforms = {
        "decay": optax.adamw(1e-2, weight_decay=0.1),
        "no_decay": optax.adam(1e-2),
        "frozen": optax.set_to_zero(),
    }
    rules = [("embed", "frozen"), (NO_DECAY, "no_decay")]
    ours = tg.multi_transform(transforms, rules, default="decay")
    hand = jtu.tree_map(lambda d: "decay" if d else "no_decay", hand_written_decay_mask(params))
    hand = eqx.tree_at(lambda p: p.embed.weight, hand, "frozen")
    reference = optax.partition(transforms, lambda _: hand)
    a, updates = run(ours, params)
    b, _ = run(reference, params)
    assert_trees_close(a, b)
    assert float(jnp.abs(updates[-1].embed.weight).max()) == 0.0


def test_raw_optax_partition_crashes_on_an_equinox_label_tree(params):
    """The trap treeglob.multi_transform avoids: optax calls a callable label tree."""
    label_tree = tg.labels(params, [(NO_DECAY, "no_decay")], default="decay")
    assert callable(label_tree)
    raw = optax.partition({"decay": optax.sgd(1.0), "no_decay": optax.sgd(1.0)}, label_tree)
    with pytest.raises(Exception):  # noqa: B017 - whatever the module's __call__ raises
        raw.init(params)


def test_nested_inside_other_combinators(params):
    inner = tg.multi_transform({"a": optax.sgd(1.0), "b": optax.scale(0.0)}, [("*.bias", "b")], default="a")
    outer_mask = tg.mask(params, "blocks")  # outside the blocks, leaves become MaskedNode for `inner`
    tx = optax.chain(optax.clip_by_global_norm(1e9), optax.masked(inner, outer_mask))
    _, updates = run(tx, params, steps=1)
    g = grads_like(params, 0)
    flags = dict(zip(tg.paths(params), jtu.tree_leaves(outer_mask), strict=True))
    for path, u, gi in zip(tg.paths(params), jtu.tree_leaves(updates[0]), jtu.tree_leaves(g), strict=True):
        if not flags[path]:
            np.testing.assert_allclose(u, gi)  # outside the mask: passed through
        elif path.endswith(".bias"):
            np.testing.assert_allclose(u, 0 * gi)
        else:
            np.testing.assert_allclose(u, -gi, rtol=1e-6)


def test_inject_hyperparams_with_a_static_mask(params):
    m = tg.mask(params, ~NO_DECAY)
    tx = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=1e-2, weight_decay=0.1, mask=m
    )
    reference = optax.adamw(1e-2, weight_decay=0.1, mask=m)
    assert_trees_close(run(tx, params)[0], run(reference, params)[0])


def test_identical_jaxpr_to_a_hand_written_mask(params):
    grads = grads_like(params, 0)
    ours = tg.masked(optax.adamw(1e-2), ~NO_DECAY)
    reference = optax.masked(optax.adamw(1e-2), hand_written_decay_mask(params))
    jaxpr_ours = jax.make_jaxpr(ours.update)(grads, ours.init(params), params)
    jaxpr_ref = jax.make_jaxpr(reference.update)(grads, reference.init(params), params)
    assert str(jaxpr_ours) == str(jaxpr_ref)


@pytest.mark.parametrize(
    "transforms, rules, default, message",
    [
        (
            {"decay": optax.sgd(1.0)},
            [("*.bias", "no_decay")],
            "decay",
            r"labels with no transform: \['no_decay'\]",
        ),
        (
            {"decay": optax.sgd(1.0), "no_decay": optax.sgd(1.0), "frozen": optax.sgd(0.0)},
            [("*.bias", "no_decay")],
            "decay",
            r"transforms no rule or default produces: \['frozen'\]",
        ),
        (
            {"decay": optax.sgd(1.0), "no_decy": optax.sgd(1.0)},
            [("*.bias", "no_decay")],
            "decay",
            re.escape(
                "The transforms and the rule labels of multi_transform() disagree: labels with no "
                "transform: ['no_decay']; transforms no rule or default produces: ['no_decy'].\n"
                "Transform keys: ['decay', 'no_decy']; rule labels: ['no_decay', 'decay'].\n"
                "Give every label exactly one transform (check the spelling), or remove the extra ones."
            )
            + "$",
        ),
    ],
)
def test_transforms_and_labels_must_agree(transforms, rules, default, message):
    with pytest.raises(ValueError, match=message):
        tg.multi_transform(transforms, rules, default=default)


def test_masks_are_static_on_shape_structs(transformer):
    abstract = eqx.filter_eval_shape(lambda: eqx.filter(transformer, eqx.is_array))
    assert tg.mask(abstract, ~NO_DECAY) == hand_written_decay_mask(eqx.filter(transformer, eqx.is_array))


@pytest.mark.parametrize(
    "transform",
    [
        tg.scale_by_rules([("w", 0.5)]),
        tg.scale_by_rules([("w", optax.linear_schedule(0.0, 1.0, 10))]),
        tg.weight_decay([("w", 0.1)]),
        tg.freeze(optax.sgd(1.0), "b"),
    ],
    ids=["scale", "scheduled scale", "weight_decay", "freeze"],
)
def test_bfloat16_updates_stay_bfloat16(transform):
    # A factor is cast to the update's dtype: a float32 factor would promote the update.
    params = {"w": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(3, jnp.bfloat16)}
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(transform.update)(grads, transform.init(params), params)
    assert {k: v.dtype for k, v in updates.items()} == {"b": jnp.bfloat16, "w": jnp.bfloat16}


def test_a_decay_rate_of_one_adds_the_params_and_zero_adds_nothing():
    # 1 is the neutral factor of a scale, not of a decay: it must not be skipped here.
    params = {"w": jnp.full(3, 2.0), "b": jnp.full(3, 2.0)}
    grads = jax.tree.map(jnp.ones_like, params)
    transform = tg.weight_decay([("w", 1.0), ("b", 0.0)])
    updates, _ = jax.jit(transform.update)(grads, transform.init(params), params)
    assert updates["w"].tolist() == [3.0, 3.0, 3.0] and updates["b"].tolist() == [1.0, 1.0, 1.0]
