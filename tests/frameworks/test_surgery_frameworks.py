"""Module surgery and selector filters on each framework's models, written as its users write them:
Flax NNX (in place, `nnx.LoRA`, `nnx_filter` in `nnx.state` / `nnx.Optimizer` / `nnx.DiffState`),
Flax Linen and Haiku parameter dicts, penzai models (against `pz.select`)."""

import re

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

pytest.importorskip("flax", reason="the framework tests need flax (pip install '.[test]')")
pytest.importorskip("haiku", reason="the framework tests need dm-haiku (pip install '.[test]')")

from flax import nnx  # noqa: E402

import treeglob as tg  # noqa: E402
from framework_models import CONTEXT, NNXGPT, VOCAB, haiku_params, linen_params  # noqa: E402

TOKENS = jnp.arange(CONTEXT) % VOCAB


def lora_of(linear, key):
    return nnx.LoRA(linear.in_features, 2, linear.out_features, base_module=linear, rngs=nnx.Rngs(key))


def merged(lora):
    """The base Linear of an `nnx.LoRA` with its adapters folded into the kernel."""
    base = lora.base_module
    base.kernel[...] = base.kernel[...] + lora.lora_a[...] @ lora.lora_b[...]
    return base


# ----------------------------------------------------------------------------
# Flax NNX: modules change in place


def test_nnx_lora_is_put_in_place_starts_as_the_base_model_and_merges_back():
    model = NNXGPT(rngs=nnx.Rngs(0))
    base_out = model(TOKENS)
    fc = model.blocks[0].fc
    out = tg.replace_modules(model, "blocks.*.{fc,proj}", lora_of, key=jax.random.key(1))
    assert out is model and isinstance(model.blocks[0].fc, nnx.LoRA) and model.blocks[0].fc.base_module is fc
    assert tg.modules(model, nnx.LoRA).paths == [f"blocks.{i}.{n}" for i in range(2) for n in ("fc", "proj")]
    np.testing.assert_array_equal(model(TOKENS), base_out)  # lora_b starts at zero
    for row in tg.modules(model, nnx.LoRA):  # "trained" adapters
        row.module.lora_b[...] = jax.random.normal(jax.random.key(2), row.module.lora_b.shape)
    adapted = model(TOKENS)
    tg.replace_modules(model, nnx.LoRA, merged)
    assert not tg.modules(model, nnx.LoRA, strict=False) and isinstance(model.blocks[1].proj, nnx.Linear)
    np.testing.assert_allclose(model(TOKENS), adapted, atol=1e-5)


def test_an_nnx_list_item_is_replaced_in_place():
    model = NNXGPT(rngs=nnx.Rngs(0))
    blocks = model.blocks
    fresh = NNXGPT(rngs=nnx.Rngs(5)).blocks[1]
    tg.replace_modules(model, "^blocks.1", lambda block: fresh)
    assert model.blocks is blocks and model.blocks[1] is fresh


def test_nnx_modules_are_selected_by_nnx_types_and_innermost_skips_their_variables():
    model = NNXGPT(rngs=nnx.Rngs(0))
    assert tg.modules(model, nnx.LayerNorm).paths == [
        "blocks.0.ln1",
        "blocks.0.ln2",
        "blocks.1.ln1",
        "blocks.1.ln2",
        "ln_f",
    ]
    innermost = tg.modules(model, "blocks.0.**", nested="innermost")
    assert {row.type for row in innermost} == {nnx.LinearGeneral, nnx.LayerNorm, nnx.Linear}


SELECTORS = [
    nnx.LoRAParam,
    tg.inside(nnx.LayerNorm),
    "blocks.1",
    ~tg.glob("blocks.*") - "wpe",
    tg.glob("*.kernel") & tg.inside(nnx.LoRA),
]


@pytest.mark.parametrize("selector", SELECTORS, ids=repr)
def test_the_nnx_filter_selects_in_state_and_optimizer_what_mask_selects(selector):
    model = tg.replace_modules(NNXGPT(rngs=nnx.Rngs(0)), "fc", lora_of, key=jax.random.key(1))
    state = nnx.state(model, nnx.Param)
    hits = jax.tree.leaves(tg.mask(state, selector, types_from=model))
    expected = [p for p, hit in zip(tg.paths(state), hits, strict=True) if hit]
    f = tg.nnx_filter(model, selector)
    assert tg.paths(nnx.state(model, f)) == expected
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.All(nnx.Param, f))
    params = [p for p in expected if not p.startswith("blocks") or "." in p]
    momenta = tg.paths(nnx.state(optimizer, nnx.OptState))
    assert [p.removeprefix("opt_state.0.trace.") for p in momenta if ".trace." in p] == [
        p for p in params if isinstance(_at(state, p), nnx.Param)
    ]


def _at(state, path):
    flat = dict(
        zip(
            tg.paths(state),
            jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)),
            strict=True,
        )
    )
    return flat[path]


def test_nnx_gradient_side_freezing_gives_the_updates_of_optimizer_side_freezing():
    def loss_fn(model):
        return jnp.mean(model(TOKENS) ** 2)

    adapters = tg.inside(nnx.LoRAParam)
    # optimizer side: every Param differentiated, the frozen ones dropped by tg.freeze
    a = tg.replace_modules(NNXGPT(rngs=nnx.Rngs(0)), "fc", lora_of, key=jax.random.key(1))
    opt_a = nnx.Optimizer(a, tg.freeze(optax.adam(1e-2), ~adapters), wrt=nnx.Param)
    # gradient side: only the adapters differentiated, and the optimizer holds them alone
    b = tg.replace_modules(NNXGPT(rngs=nnx.Rngs(0)), "fc", lora_of, key=jax.random.key(1))
    f = tg.nnx_filter(b, adapters)
    opt_b = nnx.Optimizer(b, optax.adam(1e-2), wrt=f)

    @nnx.jit
    def step_a(model, optimizer):
        optimizer.update(model, nnx.grad(loss_fn)(model))

    @nnx.jit
    def step_b(model, optimizer):
        optimizer.update(model, nnx.grad(loss_fn, argnums=nnx.DiffState(0, f))(model))

    for _ in range(3):
        step_a(a, opt_a)
        step_b(b, opt_b)
    sa, sb = nnx.state(a, nnx.Param), nnx.state(b, nnx.Param)
    assert tg.paths(sa) == tg.paths(sb)
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    # the steps, Adam's count, and its mu and nu of the 4 adapter matrices: nothing of the frozen Params
    assert len(jax.tree.leaves(nnx.state(opt_b, nnx.OptState))) == 2 + 2 * 4


def test_nnx_filter_chooses_among_params_unless_told_otherwise():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(2, 2, rngs=rngs)
            self.norm = nnx.BatchNorm(2, rngs=rngs)
            self.dropout = nnx.Dropout(0.1, rngs=rngs)

    net = Net(nnx.Rngs(0))
    assert tg.paths(nnx.state(net, tg.nnx_filter(net, "**"))) == [
        "linear.bias",
        "linear.kernel",
        "norm.bias",
        "norm.scale",
    ]
    stats = tg.nnx_filter(net, "norm", variables=nnx.BatchStat)
    assert tg.paths(nnx.state(net, stats)) == ["norm.mean", "norm.var"]
    grads = nnx.grad(
        lambda m: m.linear(jnp.ones(2)).sum(), argnums=nnx.DiffState(0, tg.nnx_filter(net, "**"))
    )(net)
    assert tg.paths(grads) == ["linear.bias", "linear.kernel", "norm.bias", "norm.scale"]


def test_a_module_shared_by_two_attributes_is_replaced_once_and_stays_shared():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(2, 2, rngs=rngs), nnx.Linear(2, 2, rngs=rngs)])
            self.tied = self.layers[0]

    net, calls = Net(nnx.Rngs(0)), []
    tg.replace_modules(
        net, nnx.Linear, lambda m, key: calls.append(key) or lora_of(m, key), key=jax.random.key(0)
    )
    assert len(calls) == 2 and net.tied is net.layers[0] and isinstance(net.tied, nnx.LoRA)


def test_nnx_filter_refuses_what_is_not_an_nnx_module():
    message = (
        "nnx_filter() takes a Flax NNX module, got dict. For an Equinox model use "
        "treeglob.partition(model, selector); for any other tree, treeglob.mask."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        tg.nnx_filter({"w": 1}, "w")


def test_nnx_filter_is_strict_unless_told_and_shows_its_selection():
    model = NNXGPT(rngs=nnx.Rngs(0))
    with pytest.raises(
        tg.NoMatchError,
        match=r"^The selector given to nnx_filter\(\) glob\('lnf'\) matches no leaf(.|\n)*ln_f",
    ):
        tg.nnx_filter(model, "lnf")
    nothing = tg.nnx_filter(model, "lnf", strict=False)
    assert repr(nothing) == "treeglob.nnx_filter('lnf', 0 variables)"
    assert tg.paths(nnx.state(model, nothing)) == []
    norm = tg.nnx_filter(model, "ln_f")
    assert repr(norm) == "treeglob.nnx_filter('ln_f', 2 variables)"
    assert tg.paths(nnx.state(model, norm)) == ["ln_f.bias", "ln_f.scale"]


def test_a_stacked_nnx_layer_cannot_be_rebuilt_and_says_so():
    class Stack(nnx.Module):
        def __init__(self):
            self.blocks = nnx.vmap(lambda key: nnx.Linear(4, 4, rngs=nnx.Rngs(key)))(
                jax.random.split(jax.random.key(0), 3)
            )

    message = (
        "replace_modules() cannot replace blocks.*: it lies in the layers of a stacked Flax NNX module, "
        "which is changed in place and cannot be rebuilt layer by layer. Replace the module before "
        "stacking it (e.g. inside the function nnx.vmap builds it with)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        tg.replace_modules(Stack(), "blocks.*", lambda m: m, stacked={"blocks": 1})


# ----------------------------------------------------------------------------
# Flax Linen and Haiku: parameter dicts, rebuilt


def test_linen_lora_factors_are_added_beside_the_kernel():
    params = linen_params()

    def add_lora(dense, key):
        d_in, d_out = dense["kernel"].shape
        return {**dense, "lora_a": jax.random.normal(key, (d_in, 2)), "lora_b": jnp.zeros((2, d_out))}

    out = tg.replace_modules(params, "attn.c_attn", add_lora, key=jax.random.key(0))
    added = sorted(set(tg.paths(out)) - set(tg.paths(params)))
    assert added == [f"h_{i}.attn.c_attn.lora_{x}" for i in range(2) for x in "ab"]
    assert out["h_0"]["mlp"] is params["h_0"]["mlp"] and "lora_a" not in params["h_0"]["attn"]["c_attn"]


def test_haiku_layer_stack_modules_are_replaced_per_layer():
    import haiku as hk

    def forward(x):
        def layer(x):
            return jax.nn.relu(hk.Linear(4, name="dense")(x))

        return hk.layer_stack(3)(layer)(x)

    params = hk.transform(forward).init(jax.random.key(0), jnp.ones((1, 4)))
    stacked = tg.stacked_layers(params)
    (stack,) = stacked
    assert tg.modules(params, "dense", stacked=stacked).paths == [f"{stack}.{i}.dense" for i in range(3)]

    def add_lora(dense, key):
        return {**dense, "lora_a": jax.random.normal(key, (dense["w"].shape[0], 2))}

    out = tg.replace_modules(params, "dense", add_lora, key=jax.random.key(1), stacked=stacked)
    (entry,) = [k for k in out if k.endswith("dense")]
    assert out[entry]["lora_a"].shape == (3, 4, 2)  # one factor per layer, still stacked


def test_haiku_modules_are_the_entries_of_the_params_dict_under_their_slash_names():
    params = haiku_params()
    selected = tg.modules(params, "multi_head_attention.{query,value}")
    assert selected.paths == [
        f"{block}.multi_head_attention.{p}"
        for block in ("haiku_block", "haiku_block_1")
        for p in ("query", "value")
    ]
    out = tg.replace_modules(
        params, "multi_head_attention.{query,value}", lambda m: {**m, "lora_b": jnp.zeros(2)}
    )
    assert set(out) == set(params)  # the same module names, each entry rebuilt in place
    assert (
        "lora_b" in out["haiku_block_1/multi_head_attention/value"]
        and "lora_b" not in out["haiku_block/multi_head_attention/key"]
    )


# ----------------------------------------------------------------------------
# penzai: the same as penzai's own selection


def test_penzai_replacement_equals_pz_select_apply():
    pz = pytest.importorskip("penzai.pz")
    from penzai.models import simple_mlp

    mlp = simple_mlp.MLP.from_config(name="mlp", init_base_rng=jax.random.key(0), feature_sizes=[4, 8, 4])

    def wrap(linear):
        return pz.nn.Sequential([linear, pz.nn.Identity()])

    ours = tg.replace_modules(mlp, pz.nn.Linear, wrap)
    theirs = pz.select(mlp).at_instances_of(pz.nn.Linear).apply(wrap)
    assert jtu.tree_structure(ours) == jtu.tree_structure(theirs)
    assert all(a is b for a, b in zip(jtu.tree_leaves(ours), jtu.tree_leaves(theirs), strict=True))
    assert [row.type for row in tg.modules(ours, "^sublayers.*.sublayers.0")] == [pz.nn.Sequential] * 2
