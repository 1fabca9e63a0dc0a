"""Gradient-side freezing with `treeglob.partition`: only the selected arrays are differentiated,
and training gives what optimizer-side freezing (`treeglob.freeze`) gives."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import treeglob as tg
from conftest import Transformer

TRAIN = tg.glob("blocks.1") | "head"
X = jnp.arange(6) % 11


def loss(model, x):
    return jnp.mean(jax.vmap(model)(x[None]) ** 2)


def test_partition_splits_arrays_by_selector_and_leaves_the_rest_frozen():
    model = Transformer(key=jax.random.key(0))
    trainable, frozen = tg.partition(model, TRAIN)
    selected = tg.paths(trainable)  # None (what was left out) is no leaf
    mask = tg.mask(model, TRAIN)
    expected = [
        p
        for p, hit, leaf in zip(tg.paths(model), jax.tree.leaves(mask), jax.tree.leaves(model), strict=True)
        if hit and eqx.is_array(leaf)
    ]
    assert selected == expected and "blocks.1.mlp.activation" not in selected  # a function stays frozen
    assert jax.tree.structure(eqx.combine(trainable, frozen)) == jax.tree.structure(model)


def test_gradient_side_freezing_gives_the_updates_of_optimizer_side_freezing_under_jit():
    model = Transformer(key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)

    @jax.jit
    def optimizer_side(params, state):
        tx = tg.freeze(optax.adam(1e-2), ~TRAIN)
        grads = jax.grad(lambda p: loss(eqx.combine(p, static), X))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    trainable, frozen = tg.partition(params, TRAIN)

    @jax.jit
    def gradient_side(trainable, frozen, state):
        grads = jax.grad(lambda t: loss(eqx.combine(t, frozen, static), X))(trainable)
        updates, state = optax.adam(1e-2).update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state

    a_params, a_state = params, tg.freeze(optax.adam(1e-2), ~TRAIN).init(params)
    b_params, b_state = trainable, optax.adam(1e-2).init(trainable)
    for _ in range(3):
        a_params, a_state = optimizer_side(a_params, a_state)
        b_params, b_state = gradient_side(b_params, frozen, b_state)
    a, b = jax.tree.leaves(a_params), jax.tree.leaves(eqx.combine(b_params, frozen))
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    # the frozen arrays did not move; and the gradient-side step never differentiated them
    for x, y in zip(
        jax.tree.leaves(frozen), jax.tree.leaves(eqx.filter(params, tg.mask(params, ~TRAIN))), strict=True
    ):
        np.testing.assert_array_equal(x, y)
    grads = jax.make_jaxpr(lambda t: jax.grad(lambda t: loss(eqx.combine(t, frozen, static), X))(t))(
        trainable
    )
    assert len(grads.out_avals) == len(jax.tree.leaves(trainable))


def test_a_stacked_leaf_must_be_taken_whole():
    params = {"blocks": {"w": np.zeros((3, 2, 2))}}
    trainable, _ = tg.partition(params, "blocks.*", stacked={"blocks": 1})
    assert trainable["blocks"]["w"] is params["blocks"]["w"]
    with pytest.raises(ValueError, match=r"blocks\.w"):
        tg.partition(params, "blocks.0", stacked={"blocks": 1})


def test_partition_is_strict_by_default_and_reads_stacked_layers():
    tree = {"blocks": {"w": np.zeros((3, 2))}, "head": np.zeros(2)}
    with pytest.raises(
        tg.NoMatchError, match=r"^The selector given to partition\(\) glob\('zzz'\) matches no leaf"
    ):
        tg.partition(tree, "zzz")
    selected, rest = tg.partition(tree, "zzz", strict=False)
    assert selected == {"blocks": {"w": None}, "head": None} and rest is not None
    selected, rest = tg.partition(tree, "blocks.*.w", stacked={"blocks": 1})
    assert selected["head"] is None and rest["blocks"]["w"] is None
    with pytest.raises(
        ValueError,
        match=r"^partition\(\) cannot split the stacked leaf blocks.w: the selector picks layers 1",
    ):
        tg.partition(tree, "blocks.1.w", stacked={"blocks": 1})
