"""Per-group metrics: numerically the hand-written reductions, and nothing more in the compiled step."""

import collections
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import treeglob as tg
from conftest import Transformer
from treeglob._training.metrics import STATS

RULES = tg.presets.DEFAULT


@pytest.fixture
def grads():
    model = Transformer(depth=4, key=jax.random.key(1))
    params, static = eqx.partition(model, eqx.is_array)
    tokens = jnp.arange(6) % 11

    def loss(p):
        return jnp.mean(eqx.combine(p, static)(tokens) ** 2)

    return jax.grad(loss)(params)


def stack(tree):
    return eqx.tree_at(lambda m: m.blocks, tree, jtu.tree_map(lambda *xs: jnp.stack(xs), *tree.blocks))


#: The new statistics of a group's leaves `xs` with `count` elements, written out as a training script would.
BY_HAND = {
    "zero_fraction": lambda xs, count: (
        functools.reduce(jnp.add, [jnp.sum(x == 0).astype(jnp.float32) for x in xs]) / count
    ),
    "mean": lambda xs, count: functools.reduce(jnp.add, [jnp.sum(x) for x in xs]) / count,
    "min": lambda xs, count: functools.reduce(jnp.minimum, [jnp.min(x) for x in xs]),
    "max": lambda xs, count: functools.reduce(jnp.maximum, [jnp.max(x) for x in xs]),
}

#: The same statistics in numpy, of all the group's elements concatenated (in float64).
NUMPY = {
    "zero_fraction": lambda x: np.mean(x == 0),
    "mean": np.mean,
    "min": np.min,
    "max": np.max,
}


def hand_written(grads):
    """Per-label norm, rms, max |x|, count and the statistics of `BY_HAND`, as a training script would."""
    labels = jax.tree.leaves(tg.labels(grads, RULES))
    out = {}
    for label in ("no_decay", "decay"):
        xs = [x for x, lab in zip(jax.tree.leaves(grads), labels, strict=True) if lab == label]
        squares = functools.reduce(jnp.add, [jnp.sum(jnp.square(x)) for x in xs])
        count = sum(x.size for x in xs)
        out[f"grad/norm/{label}"] = jnp.sqrt(squares)
        out[f"grad/rms/{label}"] = jnp.sqrt(squares / count)
        out[f"grad/max_abs/{label}"] = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x)) for x in xs])
        out[f"grad/count/{label}"] = jnp.asarray(count)
        for stat, by_hand in BY_HAND.items():
            out[f"grad/{stat}/{label}"] = by_hand(xs, count)
    return out


def with_zeros(tree):
    """Every (2 + i % 3)-th element of leaf i set to 0: the zero fraction differs from leaf to leaf."""
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [x.reshape(-1).at[:: 2 + i % 3].set(0).reshape(x.shape) for i, x in enumerate(leaves)]
    return jax.tree.unflatten(treedef, leaves)


def numpy_reference(groups, stat, prefix):
    """`{"<prefix>/<stat>/<name>": value}` of each group of leaves, computed in numpy."""
    elements = {
        name: np.concatenate([np.asarray(x, np.float64).ravel() for x in xs]) for name, xs in groups.items()
    }
    return {f"{prefix}/{stat}/{name}": NUMPY[stat](x) for name, x in elements.items()}


def test_equal_to_hand_written_reductions_under_jit(grads):
    grads = with_zeros(grads)
    ours = jax.jit(lambda g: tg.summarize(g, RULES, stats=STATS, prefix="grad"))(grads)
    reference = jax.jit(hand_written)(grads)
    assert ours.keys() == reference.keys()
    for key in reference:
        np.testing.assert_allclose(ours[key], reference[key], rtol=1e-6, err_msg=key)


def _primitives(fn, tree):
    """The primitives `fn` traces to, counted; those of a `jax.jit` inside it instead of the `jit` itself (named `pjit` before JAX 0.7)."""

    def count(jaxpr):
        for eqn in jaxpr.eqns:
            inner = eqn.params.get("jaxpr")
            yield from count(inner.jaxpr) if eqn.primitive.name in ("jit", "pjit") else [eqn.primitive.name]

    return collections.Counter(count(jax.make_jaxpr(fn)(tree).jaxpr))


def test_the_compiled_step_holds_only_the_hand_written_reductions(grads):
    labels = jax.tree.leaves(tg.labels(grads, RULES))

    def by_hand(g):
        out = {}
        for label in ("no_decay", "decay"):
            xs = [x for x, lab in zip(jax.tree.leaves(g), labels, strict=True) if lab == label]
            out[label] = jnp.sqrt(functools.reduce(jnp.add, [jnp.sum(jnp.square(x)) for x in xs]))
        return out

    ours = _primitives(lambda g: tg.summarize(g, RULES), grads)
    assert ours == _primitives(by_hand, grads)
    assert set(ours) <= {"square", "integer_pow", "reduce_sum", "add", "sqrt"}


@pytest.mark.parametrize(
    "stat, allowed",
    [
        ("mean", {"reduce_sum", "add", "div"}),
        ("zero_fraction", {"eq", "convert_element_type", "reduce_sum", "add", "div"}),
        ("min", {"reduce_min", "min"}),
        ("max", {"reduce_max", "max"}),
    ],
)
def test_the_new_statistics_compile_to_the_hand_written_reductions(grads, stat, allowed):
    labels = jax.tree.leaves(tg.labels(grads, RULES))

    def by_hand(g):
        out = {}
        for label in ("no_decay", "decay"):
            xs = [x for x, lab in zip(jax.tree.leaves(g), labels, strict=True) if lab == label]
            out[label] = BY_HAND[stat](xs, sum(x.size for x in xs))
        return out

    ours = _primitives(jax.jit(lambda g: tg.summarize(g, RULES, stats=(stat,))), grads)
    reference = _primitives(jax.jit(by_hand), grads)
    # One reduction per leaf, nothing computed for the statistics not asked for (no square for the mean).
    assert ours == reference
    assert set(ours) <= allowed
    assert sum(n for name, n in ours.items() if name.startswith("reduce_")) == len(jax.tree.leaves(grads))


def test_labels_are_resolved_while_tracing_only(grads):
    calls = []

    def spy(path, leaf):
        calls.append(path)
        return path.endswith("bias")

    step = jax.jit(lambda g: tg.summarize(g, [(tg.where(spy), "bias")], default="other"))
    first = step(grads)
    traced = len(calls)
    second = step(jax.tree.map(lambda x: 2 * x, grads))
    assert len(calls) == traced > 0
    np.testing.assert_allclose(second["norm/bias"], 2 * first["norm/bias"], rtol=1e-6)


def test_a_stacked_model_reports_what_the_unstacked_one_does(grads):
    stacked, declared = stack(grads), {"blocks": 1}
    flat = tg.summarize(grads, RULES, stats=("norm", "max_abs", "count"))
    ours = tg.summarize(stacked, RULES, stats=("norm", "max_abs", "count"), stacked=declared, per_layer=True)
    for key, value in flat.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-6, err_msg=key)
    for i, block in enumerate(grads.blocks):
        block_norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(block)))
        np.testing.assert_allclose(ours[f"norm/blocks.{i}"], block_norm, rtol=1e-6)
        assert int(ours[f"count/blocks.{i}"]) == sum(x.size for x in jax.tree.leaves(block))
    assert sorted(k for k in ours if "blocks" in k) == sorted(
        f"{s}/blocks.{i}" for s in ("norm", "max_abs", "count") for i in range(4)
    )


def test_layers_of_a_stacked_leaf_may_differ_in_label(grads):
    rules = [("blocks.{0..1}", "frozen")]
    flat = tg.summarize(grads, rules, default="train", stats=("norm", "count"))
    ours = jax.jit(
        lambda g: tg.summarize(g, rules, default="train", stats=("norm", "count"), stacked={"blocks": 1})
    )(stack(grads))
    assert ours.keys() == flat.keys()
    for key in flat:
        np.testing.assert_allclose(ours[key], flat[key], rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("stat", NUMPY)
def test_the_new_statistics_of_a_dict_equal_numpy(stat):
    rng = np.random.default_rng(0)

    def leaf(*shape):
        return jnp.asarray(np.where(rng.random(shape) < 0.3, 0.0, rng.normal(size=shape)), jnp.float32)

    tree = {"w1": leaf(3, 4), "w2": leaf(5), "b1": leaf(4), "b2": leaf(2, 1)}
    step = jax.jit(lambda t: tg.summarize(t, [("b*", "bias")], default="weight", stats=(stat,), prefix="p"))
    ours = step(tree)
    groups = {"bias": [tree["b1"], tree["b2"]], "weight": [tree["w1"], tree["w2"]]}
    reference = numpy_reference(groups, stat, "p")
    assert list(ours) == list(reference)
    for key in reference:
        np.testing.assert_allclose(ours[key], reference[key], rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("stat", NUMPY)
@pytest.mark.parametrize(
    "rules, options",
    [(RULES, {}), ([("blocks.{0..1}", "frozen")], {"default": "train"})],
    ids=["preset", "layers-differ-in-label"],
)
def test_the_new_statistics_of_a_stacked_tree_per_layer_equal_numpy(grads, stat, rules, options):
    grads = with_zeros(grads)
    ours = jax.jit(
        lambda g: tg.summarize(
            g, rules, stats=stat, prefix="grad", stacked={"blocks": 1}, per_layer=True, **options
        )
    )(stack(grads))
    groups = collections.defaultdict(list)
    labels = jax.tree.leaves(tg.labels(grads, rules, **options))
    for x, label in zip(jax.tree.leaves(grads), labels, strict=True):
        groups[label].append(x)
    for i, block in enumerate(grads.blocks):
        groups[f"blocks.{i}"] = jax.tree.leaves(block)
    reference = numpy_reference(groups, stat, "grad")
    assert ours.keys() == reference.keys()
    for key in reference:
        np.testing.assert_allclose(ours[key], reference[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_norm_ratios(grads):
    params = jax.tree.map(lambda x: x + 1.0, grads)
    ratios = tg.norm_ratios(grads, params, RULES, name="grad/param")
    norms_g, norms_p = tg.summarize(grads, RULES), tg.summarize(params, RULES)
    assert list(ratios) == ["grad/param/no_decay", "grad/param/decay"]
    for label in ("no_decay", "decay"):
        np.testing.assert_allclose(
            ratios[f"grad/param/{label}"], norms_g[f"norm/{label}"] / norms_p[f"norm/{label}"]
        )


def test_metric_errors():
    tree = {"w": jnp.ones(2)}
    with pytest.raises(
        ValueError,
        match=r"summarize\(\): unknown statistics \['median'\]; "
        r"choose from norm, rms, max_abs, count, zero_fraction, mean, min, max\.$",
    ):
        tg.summarize(tree, [("w", "x")], stats=("mean", "median"))
    with pytest.raises(
        ValueError, match=r"summarize\(per_layer=True\) reports the layers of stacked subtrees"
    ):
        tg.summarize(tree, [("w", "x")], per_layer=True)
    with pytest.raises(tg.NoMatchError, match=r"The selector of rule 0 \(label 'x'\) glob\('wq'\)"):
        tg.summarize(tree, [("wq", "x")], default="y")
    with pytest.raises(ValueError, match=r"norm_ratios\(\): the two trees give different groups"):
        tg.norm_ratios(tree, {"v": jnp.ones(2)}, [(tg.optional("w"), "x")], default="y")
