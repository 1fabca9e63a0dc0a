"""Treatment: one set of rules builds the optimizer and the table, and the table is what the
optimizer does, step by step, leaf by leaf (and layer by layer when stacked)."""

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

STEPS = 6
WARMUP = optax.linear_schedule(0.0, 1.0, transition_steps=4)
COSINE = optax.cosine_decay_schedule(1.0, decay_steps=STEPS)


def full_treatment(**overrides):
    """Every aspect, schedules and unfreezing included."""
    aspects = dict(
        learning_rate=optax.linear_schedule(0.1, 0.05, STEPS),
        lr_scale=[("head", WARMUP), ("embed", 0.5)],
        layer_decay={"decay": 0.5, "rules": [("embed", 0), ("ln_f", -2)], "schedule": COSINE},
        weight_decay=[("embed", 0.01), (tg.ndim >= 2, WARMUP)],
        unfreeze=[("head", 0), ("blocks.1", 2), ("blocks.0", 4)],
        sharding=[(tg.glob("*.weight") & (tg.ndim == 2), P(None, "model"))],
        labels=tg.presets.DEFAULT,
    )
    return tg.Treatment(**{**aspects, **overrides})


@pytest.fixture
def model_params():
    return eqx.filter(Transformer(depth=2, key=jax.random.key(1)), eqx.is_array)


def updates_of(tx, params, steps=STEPS):
    """The updates and the params before each of `steps` jitted steps, gradients all ones."""
    grads = jtu.tree_map(jnp.ones_like, params)

    @jax.jit
    def go(params):
        state, out = tx.init(params), []
        for _ in range(steps):
            updates, state = tx.update(grads, state, params)
            out.append((updates, params))
            params = optax.apply_updates(params, updates)
        return out

    return go(params)


def test_the_table_is_what_the_optimizer_does(model_params):
    treatment = full_treatment()
    # With the identity as the direction, an update is -lr * (grad + rate * param), 0 when frozen.
    history = updates_of(treatment.optimizer(optax.identity()), model_params)
    table = treatment.table(model_params, steps=range(STEPS))
    for k, (updates, params) in enumerate(history):
        for row, (u, p) in enumerate(zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True)):
            lr, trained, rate = table.lr[k][row], table.trained[k][row], table.weight_decay[k][row]
            expected = -lr * (1 + rate * np.asarray(p)) if trained else np.zeros(u.shape)
            np.testing.assert_allclose(u, expected, rtol=2e-6, atol=1e-9, err_msg=f"{table.paths[row]} @ {k}")


def test_the_optimizer_equals_the_hand_written_chain(model_params):
    treatment = full_treatment()
    rules = [("embed", 0), ("ln_f", -2)]
    hand_written = optax.chain(
        optax.scale_by_adam(),
        tg.weight_decay([("embed", 0.01), (tg.ndim >= 2, WARMUP)]),
        optax.scale_by_learning_rate(optax.linear_schedule(0.1, 0.05, STEPS)),
        tg.scale_by_rules([("head", WARMUP), ("embed", 0.5)]),
        tg.layer_decay(0.5, rules=rules, schedule=COSINE),
    )
    hand_written = tg.gradual_unfreeze(hand_written, [("head", 0), ("blocks.1", 2), ("blocks.0", 4)])
    ours = updates_of(treatment.optimizer(optax.scale_by_adam()), model_params)
    reference = updates_of(hand_written, model_params)
    for (a, _), (b, _) in zip(ours, reference, strict=True):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)


def stack(params):
    return eqx.tree_at(lambda m: m.blocks, params, jtu.tree_map(lambda *xs: jnp.stack(xs), *params.blocks))


def test_a_stacked_model_gets_the_same_table_and_updates(model_params):
    treatment, stacked = full_treatment(), full_treatment(stacked={"blocks": 1})
    table = treatment.table(model_params, steps=[0, 2, 4])
    stacked_table = stacked.table(stack(model_params), steps=[0, 2, 4])
    # One row per layer slice, in the same order as the leaves of the unstacked model.
    assert stacked_table.to_dict() == table.to_dict()
    ours = updates_of(stacked.optimizer(optax.scale_by_adam()), stack(model_params))
    reference = updates_of(treatment.optimizer(optax.scale_by_adam()), model_params)
    for (a, _), (b, _) in zip(ours, reference, strict=True):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(stack(b)), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)


def test_table_golden():
    params = {"body": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, "head": jnp.ones((2, 2))}
    treatment = tg.Treatment(
        learning_rate=0.1,
        lr_scale=[("head", optax.linear_schedule(0.0, 1.0, 10))],
        weight_decay=[("*.w", 0.05)],
        unfreeze=[("body", 5)],
        sharding=[("head", P("model"))],
        labels=tg.presets.NANOGPT,
    )
    table = treatment.table(params, steps=[0, 5])
    assert table.format() == "\n".join(
        [
            "path    shape   label       lr@0  lr@5  wd@0  wd@5  sharding",
            "body.b  (2,)    no_decay  frozen   0.1     0     0  P()",
            "body.w  (2, 2)  decay     frozen   0.1  0.05  0.05  P()",
            "head    (2, 2)  decay          0  0.05     0     0  P('model')",
            "",
            "label       lr@0  lr@5  wd@0  wd@5  sharding    leaves  elements  share",
            "no_decay  frozen   0.1     0     0  P()              1         2  20.0%",
            "decay     frozen   0.1  0.05  0.05  P()              1         4  40.0%",
            "decay          0  0.05     0     0  P('model')       1         4  40.0%",
        ]
    )
    assert table.to_dict()["leaves"][0] == {
        "path": "body.b",
        "shape": (2,),
        "size": 2,
        "label": "no_decay",
        "lr": [None, pytest.approx(0.1)],
        "weight_decay": [0.0, 0.0],
        "sharding": "P()",
    }


def test_shardings_come_from_the_same_rules(model_params):
    mesh = jax.make_mesh((1,), ("model",))
    specs = full_treatment().shardings(model_params, mesh)
    assert specs.head.weight.spec == P(None, "model") and specs.head.bias.spec == P()
    with pytest.raises(
        ValueError, match=r"^Treatment.shardings\(\) needs sharding rules: Treatment\(sharding=\[...\]\).$"
    ):
        tg.Treatment().shardings(model_params, mesh)
    # The treatment's own stacked axes and strictness apply.
    specs = full_treatment(stacked={"blocks": 1}).shardings(stack(model_params), mesh)
    assert specs.blocks.mlp.layers[0].weight.spec == P(None, None, "model")
    with pytest.raises(tg.NoMatchError, match=r"glob\('zzz'\) matches no leaf"):
        full_treatment(sharding=[("zzz", P())]).shardings(model_params, mesh)
    specs = full_treatment(sharding=[("zzz", P())], strict=False).shardings(model_params, mesh)
    assert specs.head.weight.spec == P()


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: tg.Treatment(learning_rate="fast"), TypeError, r"learning_rate of Treatment\(\) is 'fast'"),
        (
            lambda: tg.Treatment(layer_decay={"decya": 0.7}),
            TypeError,
            r"a dict with the arguments of .*decay required",
        ),
        (lambda: tg.Treatment(layer_decay=-1), ValueError, r"decay must be a positive number"),
        (lambda: tg.Treatment(unfreeze=[("head", "later")]), TypeError, r"ints from 0, or math.inf"),
        (lambda: tg.Treatment(weight_decay=[("head", None)]), TypeError, r"label of rule 0 is None"),
    ],
)
def test_bad_treatments_fail_when_built(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_a_typo_is_caught_on_the_tree(model_params):
    treatment = tg.Treatment(weight_decay=[("*.wieght", 0.1)])
    with pytest.raises(
        tg.NoMatchError, match=r"glob\('\*.wieght'\) matches no leaf(.|\n)*Close matches in the tree: weight"
    ):
        treatment.table(model_params)
    with pytest.raises(tg.NoMatchError, match=r"glob\('\*.wieght'\)"):
        treatment.optimizer(optax.identity()).init(model_params)
    with pytest.raises(ValueError, match=r"steps must be ints from 0"):
        tg.Treatment().table(model_params, steps=[-1])


def test_table_format_of_a_root_leaf_with_color_and_a_narrow_width():
    table = tg.Treatment(learning_rate=0.1).table(jnp.ones(3), steps=[0])
    summary = ["lr@0  leaves  elements   share", " 0.1       1         3  100.0%"]
    assert table.format() == "\n".join(["path    shape  lr@0", "<root>  (3,)    0.1", "", *summary])
    bold = table.format(color=True).splitlines()[0]
    assert bold == "\x1b[1mpath  \x1b[0m  \x1b[1mshape\x1b[0m  \x1b[1mlr@0\x1b[0m"
    # Too wide for the terminal: each path on its own line, its cells below it.
    long = tg.Treatment(learning_rate=0.1).table(
        {"a_very_long_parameter_name_indeed": {"w": jnp.ones(3)}}, steps=[0]
    )
    assert long.format(width=30).splitlines()[:4] == [
        "path",
        "    shape  lr@0",
        "a_very_long_parameter_name_indeed.w",
        "    (3,)    0.1",
    ]
    # The summary too: its first column on its own line, and bold headers in color.
    assert long.format(width=20).splitlines()[4:] == [
        "",
        "lr@0",
        "    leaves  elements   share",
        "0.1",
        "         1         3  100.0%",
    ]
    assert long.format(color=True).splitlines()[3].startswith("\x1b[1mlr@0\x1b[0m  \x1b[1mleaves\x1b[0m")
    # A Python number has no shape ("-") and no elements: the share is the arrays'.
    scalar = tg.Treatment(learning_rate=0.1).table({"scale": 0.5, "w": jnp.ones(3)}, steps=[0])
    assert scalar.format().splitlines() == [
        "path   shape  lr@0",
        "scale  -       0.1",
        "w      (3,)    0.1",
        "",
        *summary[:1],
        " 0.1       2         3  100.0%",
    ]
    assert scalar.to_dict()["leaves"][0] == {"path": "scale", "shape": None, "size": None, "lr": [0.1]}


def test_a_sharding_that_splits_a_stacked_leaf_is_refused_by_name():
    treatment = tg.Treatment(sharding=[("blocks.0.w", P("model"))], stacked={"blocks": 1})
    model, none = repr(P("model")), repr(P())  # `P('model',)`, or `PartitionSpec('model',)` in older JAX
    message = (
        f"Treatment(): the rules give different labels ({model}, {none}) to the layers of the stacked leaf "
        f"blocks.w (layers 0: {model}; layers 1: {none}). A label tree holds one label per leaf; only numeric "
        "labels on array leaves can differ per layer (they become per-layer arrays). Give all layers of a "
        "stacked leaf the same label, or use numbers (e.g. 0.0 / 1.0 factors, see treeglob.freeze)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        treatment.table({"blocks": {"w": jnp.ones((2, 3, 3))}})
