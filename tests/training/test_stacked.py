"""Stacked (scanned) layers: the same model stacked and unstacked gets the same updates."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import treeglob as tg
from conftest import Transformer

STACKED = {"blocks": 1}
LAYER_RULES = [("embed", 0), ("ln_f", -2)]


def stack(params):
    """The same params with the list of blocks stacked into one Block, as eqx.filter_vmap builds it."""
    return eqx.tree_at(lambda m: m.blocks, params, jtu.tree_map(lambda *xs: jnp.stack(xs), *params.blocks))


@pytest.fixture
def deep():
    model = Transformer(depth=4, key=jax.random.key(3))
    params, static = eqx.partition(model, eqx.is_array)
    tokens = jnp.arange(6) % 11

    def loss(p):
        return jnp.mean(eqx.combine(p, static)(tokens) ** 2)

    return params, jax.grad(loss)(params)


def test_filter_vmap_builds_what_stack_builds():
    from conftest import Block

    built = eqx.filter(
        eqx.filter_vmap(lambda k: Block(4, key=k))(jax.random.split(jax.random.key(0), 3)), eqx.is_array
    )
    ours = stack(eqx.filter(Transformer(depth=3, key=jax.random.key(0)), eqx.is_array)).blocks
    assert jtu.tree_structure(built) == jtu.tree_structure(ours)
    assert [x.shape for x in jax.tree.leaves(built)] == [x.shape for x in jax.tree.leaves(ours)]


def test_stacked_paths_and_shapes_are_those_of_the_unstacked_model(deep):
    params, _ = deep
    stacked = stack(params)
    assert sorted(tg.paths(stacked, stacked=STACKED)) == sorted(tg.paths(params))
    rows = {r.path: r.shape for r in tg.explain(stacked, [("**", "x")], stacked=STACKED).rows}
    assert rows == {r.path: r.shape for r in tg.explain(params, [("**", "x")]).rows}


def test_ndim_sees_the_per_layer_shape(deep):
    params, _ = deep
    stacked = stack(params)
    declared = tg.mask(stacked, tg.ndim >= 2, stacked=STACKED)
    assert declared.blocks.ln1.weight is False and declared.blocks.attn.query_proj.weight is True
    # Without the declaration the leading layer axis makes every stacked bias look like a matrix.
    assert tg.mask(stacked, tg.ndim >= 2).blocks.ln1.weight is True


def run(tx, params, grads, steps=3):
    @jax.jit
    def go(params):
        state = tx.init(params)
        out = []
        for _ in range(steps):
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            out.append(updates)
        return out

    return go(params)


def assert_same_updates(stacked_updates, unstacked_updates):
    for s, u in zip(stacked_updates, unstacked_updates, strict=True):
        for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(stack(u)), strict=True):
            np.testing.assert_array_equal(a, b)


def test_weight_decay_same_updates(deep):
    params, grads = deep
    unstacked = run(optax.adamw(0.1, weight_decay=0.5, mask=tg.decay_mask()), params, grads)
    stacked = run(
        optax.adamw(0.1, weight_decay=0.5, mask=tg.decay_mask(stacked=STACKED)), stack(params), stack(grads)
    )
    assert_same_updates(stacked, unstacked)


def test_layer_decay_same_updates_with_per_layer_scales(deep):
    params, grads = deep
    scales = tg.layer_decay_scales(stack(params), 0.5, rules=LAYER_RULES, stacked=STACKED)
    assert scales.blocks.attn.query_proj.weight.shape == (4, 1, 1)
    assert scales.blocks.ln1.bias.shape == (4, 1)
    assert scales.blocks.ln1.bias.ravel().tolist() == [0.5**4, 0.5**3, 0.5**2, 0.5**1]
    assert scales.ln_f.weight == 0.5 and scales.embed.weight == 0.5**5

    def tx(stacked):
        return optax.chain(
            optax.adamw(0.1, weight_decay=0.5), tg.layer_decay(0.5, rules=LAYER_RULES, stacked=stacked)
        )

    assert_same_updates(run(tx(STACKED), stack(params), stack(grads)), run(tx(None), params, grads))


def test_freezing_the_first_layers_same_updates(deep):
    params, grads = deep
    unstacked = run(tg.freeze(optax.adam(0.1), "blocks.{0..1}"), params, grads)
    stacked = run(tg.freeze(optax.adam(0.1), "blocks.{0..1}", stacked=STACKED), stack(params), stack(grads))
    assert_same_updates(stacked, unstacked)
    weight = stacked[-1].blocks.attn.query_proj.weight
    assert not np.any(weight[:2]) and np.all(weight[2:] != 0)


def test_freezing_whole_stacked_leaves_allocates_no_state(deep):
    params, _ = deep
    tx = tg.freeze(optax.adam(0.1), "blocks", stacked=STACKED)
    state = tx.init(stack(params))
    trainable = sum(
        x.nbytes
        for p, x in zip(tg.paths(params), jax.tree.leaves(params), strict=True)
        if not p.startswith("blocks")
    )
    assert sum(x.nbytes for x in jax.tree.leaves(state)) == 2 * trainable + 4


def test_sharding_specs_describe_one_layer():
    mesh = jax.make_mesh((1,), ("model",))
    params = {"blocks": {"w": np.zeros((3, 4, 8)), "b": np.zeros((3, 8))}}
    specs = tg.shardings(params, [("*.w", P(None, "model"))], mesh, stacked={"blocks": 1})
    assert specs["blocks"]["w"].spec == P(None, None, "model")
    assert specs["blocks"]["b"].spec == P(None)


# ----------------------------------------------------------------------------
# Errors


@pytest.fixture
def stacked_tree():
    return {"blocks": {"w": np.zeros((4, 3, 3)), "b": np.zeros((4, 3))}, "head": np.zeros((3, 2))}


def test_mask_refuses_to_split_a_stacked_leaf(stacked_tree):
    with pytest.raises(
        ValueError,
        match=r"mask\(\) cannot split the stacked leaf blocks.b: the selector picks layers 0, 1 of it",
    ):
        tg.mask(stacked_tree, "blocks.{0..1}", stacked={"blocks": 1})


def test_labels_cannot_split_a_leaf_with_string_labels(stacked_tree):
    with pytest.raises(
        ValueError, match=r"different labels \('early', 'late'\) to the layers of the stacked leaf blocks.b"
    ):
        tg.labels(stacked_tree, [("blocks.{0..1}", "early")], default="late", stacked={"blocks": 1})


def test_numeric_labels_become_per_layer_arrays(stacked_tree):
    out = tg.labels(stacked_tree, [("blocks.{0..1}", 0.0)], default=1.0, stacked={"blocks": 1})
    assert out["blocks"]["w"].shape == (4, 1, 1) and out["blocks"]["w"].ravel().tolist() == [0, 0, 1, 1]
    assert out["head"] == 1.0


@pytest.mark.parametrize(
    "declaration, error, message",
    [
        (
            {"block": 1},
            ValueError,
            r"stacked names the subtree 'block', which is not in the tree. Close matches: blocks",
        ),
        ({"blocks": 3}, ValueError, r"blocks.b has shape \(4, 3\), fewer than 3 axes"),
        (
            {"blocks": 0},
            TypeError,
            r"stacked\['blocks'\] is 0; it must be the number of leading stacked axes",
        ),
        (["blocks"], TypeError, r"stacked must be a dict \{path: number of leading axes\}"),
        (
            {"blocks": 1, "blocks.w": 1},
            ValueError,
            r"declares both 'blocks' and 'blocks.w', which lies inside it",
        ),
    ],
)
def test_bad_declarations(stacked_tree, declaration, error, message):
    with pytest.raises(error, match=message):
        tg.paths(stacked_tree, stacked=declaration)


def test_mismatched_layer_counts_are_caught():
    tree = {"blocks": {"w": np.zeros((4, 3)), "b": np.zeros((5, 3))}}
    with pytest.raises(
        ValueError,
        match=r"have the same leading axis \(the layers\): blocks.b has shape \(5, 3\) but blocks.w has shape \(4, 3\)",
    ):
        tg.labels(tree, [("**", 1.0)], stacked={"blocks": 1})


def test_multi_transform_and_masked_take_the_declaration(stacked_tree):
    params = jax.tree.map(jnp.ones_like, stacked_tree)
    tx = tg.multi_transform(
        {"decay": optax.add_decayed_weights(0.5), "none": optax.identity()},
        [(tg.ndim >= 2, "decay")],
        default="none",
        stacked={"blocks": 1},
    )
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert float(updates["blocks"]["b"].sum()) == 0 and float(updates["blocks"]["w"].min()) == 0.5
    tx = tg.masked(optax.add_decayed_weights(0.5), tg.ndim >= 2, stacked={"blocks": 1})
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert float(updates["blocks"]["b"].sum()) == 0 and float(updates["head"].min()) == 0.5


# ----------------------------------------------------------------------------
# Schedules, weight-decay rates and gradual unfreezing split per layer: stacked == unstacked

WARMUP = optax.linear_schedule(0.0, 1.0, transition_steps=3)


def test_per_layer_schedules_same_updates(deep):
    params, grads = deep
    rules = [("blocks.{0..1}", WARMUP), ("blocks.2", 0.5), ("head", WARMUP)]

    def tx(stacked):
        return optax.chain(optax.adam(0.1), tg.scale_by_rules(rules, stacked=stacked))

    stacked = run(tx(STACKED), stack(params), stack(grads))
    assert_same_updates(stacked, run(tx(None), params, grads))
    # Layers 0 and 1 start at zero, layers 2 and 3 do not.
    weight = stacked[0].blocks.attn.query_proj.weight
    assert not np.any(weight[:2]) and np.all(weight[2:] != 0)


def test_per_layer_weight_decay_rates_same_updates(deep):
    params, grads = deep
    rules = [("blocks.{0..1}.**", 0.5), (tg.glob("blocks.*.**") & (tg.ndim >= 2), WARMUP)]

    def tx(stacked):
        return optax.chain(
            optax.scale_by_adam(), tg.weight_decay(rules, stacked=stacked), optax.scale_by_learning_rate(0.1)
        )

    assert_same_updates(run(tx(STACKED), stack(params), stack(grads)), run(tx(None), params, grads))


def test_per_layer_unfreezing_same_updates(deep):
    params, grads = deep
    rules = [("blocks.3", 0), ("blocks.2", 1), ("blocks.{0..1}", 2), ("embed", float("inf"))]

    def tx(stacked):
        return tg.gradual_unfreeze(optax.adam(0.1), rules, stacked=stacked)

    stacked = run(tx(STACKED), stack(params), stack(grads))
    assert_same_updates(stacked, run(tx(None), params, grads))
    frozen_layers = [int(np.sum(~np.any(u.blocks.ln1.weight != 0, axis=1))) for u in stacked]
    assert frozen_layers == [3, 2, 0]


@pytest.mark.parametrize(
    "stack, selector, layers",
    [
        (24, "blocks.{0..11}.w", "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11"),
        # Past 12 layers, a count of all of them.
        (24, "blocks.{0..12}.w", "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, ... (13 of 24)"),
        # Several stacked axes: index tuples.
        ((2, 3), "blocks.1.*.w", "(1, 0), (1, 1), (1, 2)"),
    ],
)
def test_a_mask_that_would_split_a_stacked_leaf_names_the_layers_it_picks(stack, selector, layers):
    shape = (stack,) if isinstance(stack, int) else stack
    tree = {"blocks": {"w": np.zeros((*shape, 2))}}
    with pytest.raises(ValueError, match=re.escape(f"the selector picks layers {layers} of it, and")):
        tg.mask(tree, selector, stacked={"blocks": len(shape)})


def test_multi_transform_refuses_to_split_a_stacked_leaf_between_transformations():
    params = {"blocks": {"w": jnp.ones((2, 3))}}
    tx = tg.multi_transform(
        {"a": optax.sgd(1.0), "b": optax.sgd(2.0)}, [("blocks.0.w", "a")], default="b", stacked={"blocks": 1}
    )
    message = (
        "multi_transform(): the rules give different labels ('a', 'b') to the layers of the stacked leaf "
        "blocks.w (layers 0: 'a'; layers 1: 'b'). Each leaf goes to one transformation, whole: give all "
        "layers of a stacked leaf the same label, or freeze single layers with treeglob.freeze(..., stacked=...)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        tx.init(params)
