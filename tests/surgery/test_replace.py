"""Replacing the modules a selector selects (`treeglob.replace_modules`) on Equinox models and dicts,
LoRA as the worked case (with the example's `LoRALinear`)."""

import re
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import treeglob as tg
from conftest import ROOT, Block, Transformer

sys.path.insert(0, str(ROOT / "examples"))
from lora_finetune import LoRALinear, add_adapters, merge_adapters  # noqa: E402
from train_gpt import GPT  # noqa: E402

TOKENS = jnp.arange(8) % 11


def gpt():
    return GPT(vocab=11, dim=16, depth=2, heads=2, context=8, key=jax.random.key(0))


def leaves_equal(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# ----------------------------------------------------------------------------
# LoRA on attn.{query,value}_proj


def test_lora_goes_on_the_query_and_value_projections_only_and_starts_as_the_base_model():
    model = gpt()
    lora = add_adapters(model, rank=2, key=jax.random.key(1))
    wrapped = [p for p in tg.modules(lora, LoRALinear).paths]
    assert wrapped == [f"blocks.{i}.attn.{p}_proj" for i in range(2) for p in ("query", "value")]
    assert isinstance(model.blocks[0].attn.query_proj, eqx.nn.Linear)  # the input is unchanged
    assert lora.blocks[0].attn.query_proj.base is model.blocks[0].attn.query_proj
    np.testing.assert_array_equal(jax.vmap(model)(TOKENS[None]), jax.vmap(lora)(TOKENS[None]))  # B = 0


def test_each_adapter_gets_its_own_key():
    lora = add_adapters(gpt(), rank=2, key=jax.random.key(1))
    firsts = [np.asarray(row.module.lora_a) for row in tg.modules(lora, LoRALinear)]
    assert all(not np.array_equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1 :])
    again = add_adapters(gpt(), rank=2, key=jax.random.key(1))
    assert leaves_equal(eqx.filter(lora, eqx.is_array), eqx.filter(again, eqx.is_array))


def test_merging_gives_plain_linears_whose_weights_are_base_plus_the_adapters():
    lora = add_adapters(gpt(), rank=2, key=jax.random.key(1))
    # trained adapters: B no longer zero
    lora = tg.replace_modules(
        lora,
        LoRALinear,
        lambda m, key: eqx.tree_at(lambda m: m.lora_b, m, jax.random.normal(key, m.lora_b.shape)),
        key=jax.random.key(2),
    )
    merged = merge_adapters(lora)
    assert tg.modules(merged, LoRALinear, strict=False).paths == []
    for path in ("blocks.0.attn.query_proj", "blocks.1.attn.value_proj"):
        (adapted,) = tg.modules(lora, f"^{path}")
        (plain,) = tg.modules(merged, f"^{path}")
        m = adapted.module
        assert type(plain.module) is eqx.nn.Linear
        np.testing.assert_allclose(
            plain.module.weight, m.base.weight + m.scale * m.lora_b @ m.lora_a, rtol=1e-6
        )
        np.testing.assert_array_equal(plain.module.bias, m.base.bias)
    np.testing.assert_allclose(jax.vmap(merged)(TOKENS[None]), jax.vmap(lora)(TOKENS[None]), atol=1e-5)


# ----------------------------------------------------------------------------
# Semantics


def test_fn_gets_the_path_where_it_asks_for_it():
    seen = []

    def record(module, path):
        seen.append((path, type(module).__name__))
        return module

    out = tg.replace_modules(Transformer(key=jax.random.key(0)), "attn.{query,key}_proj", record)
    assert seen == [(f"blocks.{i}.attn.{p}_proj", "Linear") for i in range(2) for p in ("query", "key")]
    assert isinstance(out, Transformer)


@pytest.mark.parametrize(
    "nested, replaced",
    [
        ("outermost", ["blocks.0.mlp", "blocks.1.mlp", "head"]),
        ("innermost", [f"blocks.{i}.mlp.layers.{j}" for i in range(2) for j in range(2)] + ["head"]),
    ],
)
def test_nested_matches_replace_the_outermost_or_the_innermost(nested, replaced):
    model = Transformer(key=jax.random.key(0))
    selector = tg.glob("mlp") | (tg.inside(eqx.nn.Linear) - "attn.**")
    seen = []
    tg.replace_modules(model, selector, lambda m, path: seen.append(path) or m, nested=nested)
    assert seen == replaced


def test_a_dict_subtree_is_extended_beside_its_kernel():
    params = {
        "attn": {"q": {"kernel": np.ones((4, 4))}, "k": {"kernel": np.ones((4, 4))}},
        "head": {"kernel": 1},
    }
    out = tg.replace_modules(
        params,
        "attn.q",
        lambda m, key: {**m, "lora_a": jax.random.normal(key, (4, 2)), "lora_b": np.zeros((2, 4))},
        key=jax.random.key(0),
    )
    assert tg.paths(out) == [
        "attn.k.kernel",
        "attn.q.kernel",
        "attn.q.lora_a",
        "attn.q.lora_b",
        "head.kernel",
    ]
    assert out["attn"]["k"] is params["attn"]["k"] and "lora_a" not in params["attn"]["q"]


def test_a_module_held_twice_is_replaced_once_with_one_key():
    linear = eqx.nn.Linear(2, 2, key=jax.random.key(0))
    calls = []
    out = tg.replace_modules(
        [linear, linear],
        eqx.nn.Linear,
        lambda m, key: calls.append(key) or LoRALinear(m, 1, key=key),
        key=jax.random.key(1),
    )
    assert len(calls) == 1 and out[0] is out[1]


def test_the_root_itself_may_be_replaced():
    assert tg.replace_modules({"w": 1}, "**", lambda m: {"v": 2}) == {"v": 2}


# ----------------------------------------------------------------------------
# Stacked blocks (eqx.filter_vmap): the replacement is built per layer and stays stacked


class Scaled(eqx.Module):
    linear: eqx.nn.Linear
    gain: jax.Array

    def __call__(self, x):
        return self.gain * self.linear(x)


def scaled(linear, key=None):
    # deterministic from the module: the stacked and the list model get the same replacement
    return Scaled(linear, jnp.full(linear.weight.shape[:1], 1.0) + linear.weight[:, 0])


def test_stacked_blocks_are_replaced_per_layer_as_the_list_model_is():
    keys = jax.random.split(jax.random.key(0), 3)
    stacked = eqx.filter_vmap(lambda k: Block(4, key=k))(keys)
    as_list = [Block(4, key=k) for k in keys]
    new_stacked = tg.replace_modules({"blocks": stacked}, "attn.value_proj", scaled, stacked={"blocks": 1})
    new_list = tg.replace_modules({"blocks": as_list}, "attn.value_proj", scaled)
    assert new_stacked["blocks"].attn.value_proj.gain.shape == (3, 4)  # stacked, one gain per layer
    x = jax.random.normal(jax.random.key(1), (5, 4))
    for i in range(3):
        layer = jax.tree.map(lambda a, i=i: a[i] if eqx.is_array(a) else a, new_stacked["blocks"])
        np.testing.assert_allclose(layer(x), new_list["blocks"][i](x), rtol=1e-5, atol=1e-6)


def test_a_stacked_replacement_gets_one_key_per_layer_and_the_path_with_a_star():
    stacked = eqx.filter_vmap(lambda k: Block(4, key=k))(jax.random.split(jax.random.key(0), 3))
    paths = []

    def lora(linear, key, path):
        paths.append(path)
        return LoRALinear(linear, 2, key=key)

    out = tg.replace_modules(
        {"blocks": stacked}, "attn.query_proj", lora, key=jax.random.key(1), stacked={"blocks": 1}
    )
    a = out["blocks"].attn.query_proj.lora_a
    assert a.shape == (3, 2, 4) and not np.array_equal(a[0], a[1])
    assert paths == ["blocks.*.attn.query_proj"]  # traced once, under vmap


def test_replacing_some_layers_of_a_stack_is_an_error():
    stacked = eqx.filter_vmap(lambda k: Block(4, key=k))(jax.random.split(jax.random.key(0), 3))
    with pytest.raises(
        ValueError, match=r"selects 2 of the 3 stacked layers of blocks\.\*\.attn\.query_proj \(layers 0, 1\)"
    ):
        tg.replace_modules({"blocks": stacked}, "blocks.{0,1}.attn.query_proj", scaled, stacked={"blocks": 1})
    # A stack of one layer is replaced whole, as any stack.
    one = eqx.filter_vmap(lambda k: Block(4, key=k))(jax.random.split(jax.random.key(0), 1))
    out = tg.replace_modules({"blocks": one}, "blocks.0.attn.query_proj", scaled, stacked={"blocks": 1})
    assert isinstance(out["blocks"].attn.query_proj, Scaled) and out["blocks"].attn.query_proj.gain.shape == (
        1,
        4,
    )
    # Past 12 layers, the message counts the rest; two stacked axes show index tuples.
    deep = eqx.filter_vmap(lambda k: Block(4, key=k))(jax.random.split(jax.random.key(0), 14))
    with pytest.raises(
        ValueError, match=r"selects 13 of the 14 .*\(layers 0, 1, .*, 11, \.\.\. \(13 of 14\)\)"
    ):
        tg.replace_modules({"blocks": deep}, "blocks.{0..12}.attn.query_proj", scaled, stacked={"blocks": 1})
    grid = eqx.filter_vmap(eqx.filter_vmap(lambda k: Block(4, key=k)))(
        jax.random.split(jax.random.key(0), (2, 2))
    )
    with pytest.raises(ValueError, match=r"selects 2 of the 4 .*\(layers \(0, 1\), \(1, 1\)\)"):
        tg.replace_modules({"blocks": grid}, "blocks.*.1.attn.query_proj", scaled, stacked={"blocks": 2})


# ----------------------------------------------------------------------------
# Bad input


def _returns_none(module):
    return None


@pytest.mark.parametrize(
    "tree, kwargs, fn, error, message",
    [
        (
            None,
            {},
            _returns_none,
            TypeError,
            "_returns_none returned None for the module at 'blocks.0.attn'; it must return the new module. "
            "(Changed it in place? Return it too.)",
        ),
        (
            None,
            {"key": jax.random.key(0)},
            _returns_none,
            TypeError,
            "replace_modules(key=...) passes each module's key as fn(module, key=...), but _returns_none "
            "takes no `key` parameter. Add one (e.g. lambda module, key: ...), or leave out key=.",
        ),
        (
            None,
            {},
            "not a function",
            TypeError,
            "replace_modules() takes a function fn(module) -> new module, got str: 'not a function'.",
        ),
        (
            None,
            {"key": 0},
            lambda m, key: m,
            TypeError,
            "replace_modules(key=...) takes a JAX PRNG key (jax.random.key(0)), got int: 0 (",
        ),
        (None, {"nested": "all"}, lambda m: m, ValueError, "replace_modules(nested='all') is not a choice"),
        (
            "attn",
            {},
            lambda m: m,
            TypeError,
            "replace_modules() got a selector ('attn') where the tree goes. The tree comes first: "
            "treeglob.replace_modules(tree, selector, ...).",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(tree, kwargs, fn, error, message):
    tree = Transformer(key=jax.random.key(0)) if tree is None else tree
    with pytest.raises(error, match="^" + re.escape(message)):
        tg.replace_modules(tree, "attn", fn, **kwargs)


def test_an_error_inside_fn_names_the_module_it_was_replacing():
    def broken(module):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch") as info:
        tg.replace_modules(Transformer(key=jax.random.key(0)), "head", broken)
    assert (
        "treeglob: raised by test_an_error_inside_fn_names_the_module_it_was_replacing.<locals>.broken while replacing the module at 'head'."
        in info.value.__notes__
    )


def test_no_match_is_an_error_with_close_matches():
    with pytest.raises(
        tg.NoMatchError,
        match=r"replace_modules\(\) glob\('attn\.query'\) matches no module(.|\n)*Close matches in the tree: attn\.query_proj, ",
    ):
        tg.replace_modules(Transformer(key=jax.random.key(0)), "attn.query", lambda m: m)
