"""Every rule-taking function passes its options on: `strict`, `stacked`, `types_from`
(and `per_layer` for metrics) each change what it does, checked on each function."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import treeglob as tg

TYPO = "head.weigth"  # a rule that matches nothing


def plain():
    return {"blocks": {"w": jnp.ones((2, 3, 3)), "b": jnp.ones((2, 3))}, "head": {"weight": jnp.ones((3, 3))}}


STACKED = {"blocks": 1}


def run(transform, params):
    """One update of all-ones gradients."""
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = transform.update(grads, transform.init(params), params)
    return updates


# Each: (name, a call with the rule given, applying it to the params).
STRICT_CASES = {
    "labels": lambda rule, **kw: tg.labels(plain(), [(rule, "x")], default="y", **kw),
    "mask": lambda rule, **kw: tg.mask(plain(), rule, **kw),
    "decay_mask": lambda rule, **kw: tg.decay_mask([(rule, "no_decay"), ("**", "decay")], **kw)(plain()),
    "masked": lambda rule, **kw: run(tg.masked(optax.sgd(1.0), rule, **kw), plain()),
    "freeze": lambda rule, **kw: run(tg.freeze(optax.sgd(1.0), rule, **kw), plain()),
    "scale_by_rules": lambda rule, **kw: run(tg.scale_by_rules([(rule, 0.5)], **kw), plain()),
    "weight_decay": lambda rule, **kw: run(tg.weight_decay([(rule, 0.1)], **kw), plain()),
    "gradual_unfreeze": lambda rule, **kw: run(
        tg.gradual_unfreeze(optax.sgd(1.0), [(rule, 5)], **kw), plain()
    ),
    "multi_transform": lambda rule, **kw: run(
        tg.multi_transform({"a": optax.sgd(1.0), "b": optax.sgd(2.0)}, [(rule, "a")], default="b", **kw),
        plain(),
    ),
    "layer_decay": lambda rule, **kw: run(
        tg.layer_decay(0.5, blocks="blocks", rules=[(rule, 0)], stacked=STACKED, **kw), plain()
    ),
    "summarize": lambda rule, **kw: tg.summarize(plain(), [(rule, "x")], default="y", **kw),
    "norm_ratios": lambda rule, **kw: tg.norm_ratios(plain(), plain(), [(rule, "x")], default="y", **kw),
}


@pytest.mark.parametrize("name", STRICT_CASES)
def test_strict_is_passed_on(name):
    call = STRICT_CASES[name]
    with pytest.raises(tg.NoMatchError, match=r"head\.weigth"):
        call(TYPO)
    call(TYPO, strict=False)  # the typo is allowed, and nothing is selected by it


# Each: a call on the stacked params that treats layer 0 of `blocks.w` alone: the values
# (or updates) of its layers 0 and 1 must then differ.
PER_LAYER_CASES = {
    "labels": lambda **kw: tg.labels(plain(), [("blocks.0.w", 0.0)], default=1.0, **kw)["blocks"]["w"],
    "freeze": lambda **kw: run(tg.freeze(optax.sgd(1.0), "blocks.0.w", **kw), plain())["blocks"]["w"],
    "scale_by_rules": lambda **kw: run(tg.scale_by_rules([("blocks.0.w", 0.5)], **kw), plain())["blocks"][
        "w"
    ],
    "weight_decay": lambda **kw: run(tg.weight_decay([("blocks.0.w", 0.1)], **kw), plain())["blocks"]["w"],
    "gradual_unfreeze": lambda **kw: run(
        tg.gradual_unfreeze(optax.sgd(1.0), [("blocks.0.w", 5)], **kw), plain()
    )["blocks"]["w"],
    "layer_decay": lambda **kw: run(tg.layer_decay(0.5, blocks="blocks", **kw), plain())["blocks"]["w"],
}


@pytest.mark.parametrize("name", PER_LAYER_CASES)
def test_stacked_is_passed_on(name):
    call = PER_LAYER_CASES[name]
    per_layer = np.asarray(call(stacked=STACKED))
    assert per_layer.shape[0] == 2 and not np.array_equal(per_layer[0], per_layer[1])
    with pytest.raises((tg.NoMatchError, ValueError)):  # without it, blocks.0.w names no leaf
        call()


# Python-bool masks hold one value per leaf: `blocks.*.w` selects the stacked leaf whole.
BOOL_CASES = {
    "mask": lambda **kw: tg.mask(plain(), "blocks.*.w", **kw)["blocks"]["w"],
    "decay_mask": lambda **kw: tg.decay_mask([("blocks.*.w", "decay"), ("**", "no_decay")], **kw)(plain())[
        "blocks"
    ]["w"],
    "masked": lambda **kw: run(tg.masked(optax.sgd(1.0), "blocks.*.w", **kw), plain())["blocks"]["w"] == -1.0,
}


@pytest.mark.parametrize("name", BOOL_CASES)
def test_stacked_is_passed_on_to_masks(name):
    call = BOOL_CASES[name]
    assert np.all(np.asarray(call(stacked=STACKED)))
    with pytest.raises(tg.NoMatchError):
        call()


def test_per_layer_is_passed_on_to_the_metrics():
    rules = [("blocks.**", "blocks")]
    summary = tg.summarize(plain(), rules, default="rest", stacked=STACKED, per_layer=True)
    assert {"norm/blocks.0", "norm/blocks.1", "norm/rest"} <= set(summary)
    ratios = tg.norm_ratios(plain(), plain(), rules, default="rest", stacked=STACKED, per_layer=True)
    assert {"ratio/blocks.0", "ratio/blocks.1"} <= set(ratios)


class Net(eqx.Module):
    norm: eqx.nn.LayerNorm
    linear: eqx.nn.Linear

    def __init__(self):
        self.norm = eqx.nn.LayerNorm(3)
        self.linear = eqx.nn.Linear(3, 3, key=jax.random.key(0))


@pytest.mark.parametrize(
    "call",
    [
        lambda params, **kw: tg.mask(params, eqx.nn.LayerNorm, **kw),
        lambda params, **kw: tg.labels(params, [(eqx.nn.LayerNorm, "norm")], default="rest", **kw),
        lambda params, **kw: tg.decay_mask([(eqx.nn.LayerNorm, "no_decay"), ("**", "decay")], **kw)(params),
        lambda params, **kw: run(tg.freeze(optax.sgd(1.0), eqx.nn.LayerNorm, **kw), params),
        lambda params, **kw: run(tg.scale_by_rules([(eqx.nn.LayerNorm, 0.5)], **kw), params),
        lambda params, **kw: run(tg.gradual_unfreeze(optax.sgd(1.0), [(eqx.nn.LayerNorm, 5)], **kw), params),
    ],
    ids=["mask", "labels", "decay_mask", "freeze", "scale_by_rules", "gradual_unfreeze"],
)
def test_types_from_is_passed_on_and_strict_under_it(call):
    # A plain dict of the model's arrays holds no module types: they come from types_from=.
    model = Net()
    params = {
        "norm": {"weight": model.norm.weight, "bias": model.norm.bias},
        "linear": {"weight": model.linear.weight, "bias": model.linear.bias},
    }
    with pytest.raises(tg.NoMatchError):
        call(params)
    assert call(params, strict=False) is not None
    leaves = jax.tree.leaves(call(params, types_from=model))
    assert len({str(np.asarray(leaf).tolist()) for leaf in leaves}) > 1  # the norm is told apart


def test_types_from_is_passed_on_by_the_layer_decay_functions():
    # The norm outside the blocks is a type rule's: stem (0) only when its type is known.
    model = {
        "norm": eqx.nn.LayerNorm(3),
        "blocks": [eqx.nn.Linear(3, 3, key=jax.random.key(i)) for i in (0, 1)],
    }
    params = {
        "norm": {"weight": model["norm"].weight, "bias": model["norm"].bias},
        "blocks": [{"weight": linear.weight, "bias": linear.bias} for linear in model["blocks"]],
    }
    rules = [(eqx.nn.LayerNorm, 0)]
    for call in (
        lambda **kw: tg.layer_ids(params, rules=rules, **kw),
        lambda **kw: tg.layer_decay_scales(params, 0.5, rules=rules, **kw),
    ):
        with pytest.raises(tg.NoMatchError, match=r"rule 0 \(label 0\) \(inside\(LayerNorm\)"):
            call()
    block = [{"bias": 1, "weight": 1}, {"bias": 2, "weight": 2}]
    assert tg.layer_ids(params, rules=rules, strict=False) == {
        "blocks": block,
        "norm": {"bias": 3, "weight": 3},
    }
    assert tg.layer_ids(params, rules=rules, types_from=model) == {
        "blocks": block,
        "norm": {"bias": 0, "weight": 0},
    }
    scales = tg.layer_decay_scales(params, 0.5, rules=rules, types_from=model)
    assert scales["norm"] == {"bias": 0.125, "weight": 0.125}
    assert scales["blocks"] == [{"bias": 0.25, "weight": 0.25}, {"bias": 0.5, "weight": 0.5}]
