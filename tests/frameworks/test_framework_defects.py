"""Regression tests for framework defects 3-11, written the way each framework's users write
their models (Flax Linen big_vision ViT, Haiku, penzai, Flax NNX). Each test names its defect.

The models are tiny (dims 4-8); nothing is downloaded.
"""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import treeglob as tg
from conftest import ROOT

D = 4  # model width of the Linen / Haiku / NNX models


# ----------------------------------------------------------------------------
# Helpers


def by_path(tree, values):
    """{path: value} for a tree and a same-structure tree of per-leaf values (ids, mask bools)."""
    paths = tg.paths(tree)
    leaves = jax.tree.leaves(values)
    assert len(paths) == len(leaves), (paths, values)
    return dict(zip(paths, leaves, strict=True))


def per_label(param_values, tree):
    """{label: value} for a tuple of penzai ParameterValues and a mask / update tree over it.

    Each entry of ``tree`` is a bool (a prefix mask) or a ParameterValue-shaped subtree with one
    leaf; either way it is the value for that parameter.
    """
    assert isinstance(tree, tuple) and len(tree) == len(param_values), tree
    out = {}
    for param, entry in zip(param_values, tree, strict=True):
        leaves = jax.tree.leaves(entry)
        assert len(leaves) == 1, (param.label, entry)
        out[param.label] = leaves[0]
    return out


def is_false_everywhere(value):
    return not np.any(np.asarray(value))


# --- Flax Linen: a ViT with big_vision's parameter names ----------------------


def linen_vit(depth, token="cls", token_count=1):
    """big_vision's ViT layout: embedding (patch conv), pos_embedding, a learned token,
    Transformer.{encoderblock_i, encoder_norm}, head."""
    nn = pytest.importorskip("flax.linen")

    class MlpBlock(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(D)(nn.gelu(nn.Dense(2 * D)(x)))

    class Encoder1DBlock(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.LayerNorm()(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=1)(y, y)
            return x + MlpBlock(name="MlpBlock_0")(nn.LayerNorm()(x))

    class Encoder(nn.Module):
        depth: int

        @nn.compact
        def __call__(self, x):
            for i in range(self.depth):
                x = Encoder1DBlock(name=f"encoderblock_{i}")(x)
            return nn.LayerNorm(name="encoder_norm")(x)

    class ViT(nn.Module):
        depth: int

        @nn.compact
        def __call__(self, img):
            x = nn.Conv(D, (2, 2), strides=(2, 2), padding="VALID", name="embedding")(img)
            n, h, w, c = x.shape
            x = x.reshape(n, h * w, c)
            x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w, c))
            tok = self.param(token, nn.initializers.zeros, (1, token_count, c))
            x = jnp.concatenate([jnp.tile(tok, [n, 1, 1]), x], axis=1)
            x = Encoder(self.depth, name="Transformer")(x)
            return nn.Dense(3, name="head")(x[:, 0])

    return ViT(depth).init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))["params"]


# --- penzai: small GPT-NeoX language models -------------------------------------


def penzai_lm(num_blocks=2, use_layer_stack=False):
    """penzai's own GPT-NeoX (biases, LayerNorm scale/shift, an embedding table, a head)."""
    pytest.importorskip("penzai")
    from penzai.models.transformer.variants import gpt_neox

    config = gpt_neox.GPTNeoXTransformerConfig(
        num_attention_heads=2,
        embedding_dim=8,
        projection_dim=4,
        mlp_hidden_dim=8,
        num_decoder_blocks=num_blocks,
        vocab_size=11,
        activation_fn="gelu_approx",
        rope_subset_size=2,
        rope_wavelength=10_000.0,
        layernorm_epsilon=1e-5,
        parameter_dtype=jnp.float32,
        activation_dtype=jnp.float32,
        use_layer_stack=use_layer_stack,
    )
    return gpt_neox.build_gpt_neox_transformer(config, init_base_rng=jax.random.key(0), name="transformer")


def penzai_lora_lm():
    """The GPT-NeoX with LoRA adapters on the Linears of its attention (not its MLP)."""
    from penzai import pz
    from penzai.toolshed import lora

    model = penzai_lm()
    return lora.loraify_linears_in_selection(
        pz.select(model).at_instances_of(pz.nn.Attention), rank=2, init_base_rng=jax.random.key(1)
    )


def optax_tree(model):
    """What optax receives in penzai training: StatefulTrainer.build calls
    ``optimizer_def.init(pz.freeze_params(pz.unbind_params(model)[1]))`` and ``update`` gets the
    same tuple of ParameterValues (label static, the NamedArray value the child)."""
    from penzai import pz

    _, params = pz.unbind_params(model)
    return pz.freeze_params(params)


def numbered_grads(values):
    """Gradients of the optax tree's structure, leaf i filled with 1 + i."""
    leaves, treedef = jax.tree.flatten(values)
    return jax.tree.unflatten(treedef, [jnp.full(x.shape, 1.0 + i, x.dtype) for i, x in enumerate(leaves)])


NEOX_BLOCK = [
    "pre_attention_norm.scale.weights",
    "pre_attention_norm.shift.bias",
    "attention.query.Linear.weights",
    "attention.query.AddBias.bias",
    "attention.key.Linear.weights",
    "attention.key.AddBias.bias",
    "attention.value.Linear.weights",
    "attention.value.AddBias.bias",
    "attention.output.Linear.weights",
    "attention.output.AddBias.bias",
    "pre_ffw_norm.scale.weights",
    "pre_ffw_norm.shift.bias",
    "mlp.in.Linear.weights",
    "mlp.in.AddBias.bias",
    "mlp.out.Linear.weights",
    "mlp.out.AddBias.bias",
]


def neox_paths(num_blocks):
    return [
        "transformer.embedder.embeddings",
        *[f"transformer.block_{i}.{p}" for i in range(num_blocks) for p in NEOX_BLOCK],
        "transformer.final_norm.scale.weights",
        "transformer.final_norm.shift.bias",
        "transformer.lm_head.weights",
    ]


def neox_decay(path):
    """The DEFAULT preset's label for a GPT-NeoX path: only the Linear weights and the head decay."""
    return path.endswith("Linear.weights") or path.endswith("lm_head.weights")


# --- Flax NNX: a model with LoRA adapters under nnx.Optimizer --------------------


def nnx_lora_model():
    """embed, a learned token (a Param subclass), two blocks of nnx.LoRA, a head."""
    nnx = pytest.importorskip("flax.nnx")

    class Token(nnx.Param):
        pass

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.LoRA(D, 2, D, base_module=nnx.Linear(D, D, rngs=rngs), rngs=rngs)
            # lora_b starts at zero; a nonzero one gives lora_a a nonzero gradient.
            self.fc.lora_b[...] = jax.random.normal(rngs.params(), (2, D))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(6, D, rngs=rngs)
            self.cls = Token(jnp.ones((1, D)))
            self.blocks = nnx.List([Block(rngs) for _ in range(2)])
            self.head = nnx.Linear(D, 2, rngs=rngs)

        def __call__(self, tokens):
            x = self.embed(tokens) + self.cls
            for block in self.blocks:
                x = jnp.tanh(block.fc(x))
            return self.head(x)

    return Net(nnx.Rngs(0)), Token


def nnx_step(model, tx):
    """One ``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads)``:
    the parameters before, the gradients and the parameters after, by path."""
    from flax import nnx

    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.arange(3)) ** 2))(model)
    before = {
        p: np.array(x) for p, x in by_path(nnx.state(model, nnx.Param), nnx.state(model, nnx.Param)).items()
    }
    optimizer.update(model, grads)
    after = {
        p: np.array(x) for p, x in by_path(nnx.state(model, nnx.Param), nnx.state(model, nnx.Param)).items()
    }
    grads = {p: np.array(x) for p, x in by_path(grads, grads).items()}
    assert set(before) == set(after) == set(grads)
    return before, grads, after


def assert_sgd_step(before, grads, after, scale_of):
    """SGD with learning rate 1: each parameter moved by -scale * gradient."""
    for path in before:
        expected = before[path] - scale_of(path) * grads[path]
        np.testing.assert_allclose(after[path], expected, rtol=1e-6, atol=1e-7, err_msg=path)


# ----------------------------------------------------------------------------
# Defect 2: rename matches checkpoint names as segments, as selectors do


def test_defect2_a_glob_that_selects_a_quoted_key_also_renames_it(tmp_path):
    """Defect 2: `params.*.kernel` selects `params."conv.1".kernel` in tg.mask; renaming with
    the same glob matches it too, and the capture keeps the dotted key inside its segment."""
    source = {"params": {"conv.1": {"kernel": np.arange(4.0)}}}
    assert jax.tree.leaves(tg.mask(source, "params.*.kernel")) == [True]
    tg.save(tmp_path / "src.safetensors", source)
    target = {"net": {"conv.1": {"kernel": np.zeros(4)}}}
    model, report = tg.load(
        target, tmp_path / "src.safetensors", rename=[("params.{k}.kernel", "net.{k}.kernel")]
    )
    assert report.ok
    np.testing.assert_array_equal(model["net"]["conv.1"]["kernel"], np.arange(4.0))
    # A glob without a capture matches as well (the replacement is then literal).
    plan = tg.load_plan(
        target, tmp_path / "src.safetensors", rename=[("params.*.kernel", "net.x")], strict=False
    )
    assert [(r.source, r.status) for r in plan.rows if r.source] == [('params."conv.1".kernel', "unused")]


@pytest.mark.parametrize(
    ("rule", "name", "expected"),
    [
        (("h.{i}.attn", "blocks.{i}.attn"), "transformer.h.3.attn.w", "transformer.blocks.3.attn.w"),
        (("h", "blocks"), "h.0.h.w", "blocks.0.h.w"),  # the leftmost match
        (("^h", "blocks"), "x.h.w", None),  # anchored at the root
        (("a.**.w", "W"), "x.a.b.c.w.w", "x.W"),  # ** takes as much as it can
        (("attn.{q,v}_proj", "attn.qv"), "attn.v_proj.w", "attn.qv.w"),  # braces as in selectors
        (("layer_{n}", "block{n}"), "layer_10.w", "block10.w"),  # part of a segment
        (("^params", ""), "params.w", "w"),  # an empty replacement drops the segment
        (('"a.b".{x}', "c.{x}"), '"a.b".d', "c.d"),  # a quoted key in the pattern
    ],
)
def test_defect2_rename_rules_as_a_table(rule, name, expected):
    from treeglob._checkpoints.rename import parse_renames

    (parsed,) = parse_renames([rule])
    got = parsed.apply(name)
    assert got == (None if expected is None else [expected])


# ----------------------------------------------------------------------------
# Defect 3: layer ids of numbered blocks follow string order


@pytest.fixture(scope="module")
def big_vision_vit():
    return linen_vit(depth=12)


def test_defect3_linen_encoderblocks_are_numbered_by_value(big_vision_vit):
    """Defect 3: encoderblock_10 is layer 11, not 3 (string order put it after encoderblock_1)."""
    params = big_vision_vit
    ids = tg.layer_ids(
        params,
        blocks="Transformer.encoderblock_*",
        rules=[("^{embedding,cls,pos_embedding}", 0), ("Transformer.encoder_norm", tg.JOIN_PREVIOUS)],
    )
    got = by_path(params, ids)
    for path, layer in got.items():
        if path.startswith("Transformer.encoderblock_"):
            block = int(path.split(".")[1].removeprefix("encoderblock_"))
            assert layer == block + 1, (path, layer)
    assert got["Transformer.encoderblock_2.MlpBlock_0.Dense_0.kernel"] == 3
    assert got["Transformer.encoderblock_10.MlpBlock_0.Dense_0.kernel"] == 11
    assert got["Transformer.encoderblock_11.LayerNorm_1.scale"] == 12
    # the final norm joins the last block (encoderblock_11), the head is the top
    assert got["Transformer.encoder_norm.scale"] == got["Transformer.encoder_norm.bias"] == 12
    assert got["head.kernel"] == got["head.bias"] == 13
    for stem in ("embedding.kernel", "embedding.bias", "cls", "pos_embedding"):
        assert got[stem] == 0, stem
    # big_vision's names as a preset give the same layers, and the same scales.
    assert tg.layer_ids(params, rules=tg.presets.BIG_VISION_VIT_LAYERS) == ids
    assert tg.layer_decay_scales(params, 0.5, rules=tg.presets.BIG_VISION_VIT_LAYERS)["cls"] == 0.5**13


def test_defect3_haiku_blocks_are_numbered_by_value():
    """Defect 3: a function-style Haiku model, modules block_0 ... block_11 ("model/block_10/linear")."""
    hk = pytest.importorskip("haiku")

    class Block(hk.Module):
        def __call__(self, x):
            return x + hk.Linear(D, name="linear")(x)

    class Model(hk.Module):
        def __call__(self, x):
            for i in range(12):
                x = Block(name=f"block_{i}")(x)
            x = hk.LayerNorm(-1, create_scale=True, create_offset=True, name="final_norm")(x)
            return hk.Linear(3, name="head")(x)

    forward = hk.transform(lambda x: Model(name="model")(x))
    params = forward.init(jax.random.key(0), jnp.zeros((1, D)))
    assert "model/block_10/linear" in params
    ids = tg.layer_ids(params, blocks="model.block_*", rules=[("final_norm", tg.JOIN_PREVIOUS)])
    expected = {f"model.block_{i}.linear.{p}": i + 1 for i in range(12) for p in ("b", "w")}
    expected |= {
        "model.final_norm.offset": 12,
        "model.final_norm.scale": 12,
        "model.head.b": 13,
        "model.head.w": 13,
    }
    assert by_path(params, ids) == expected


@pytest.mark.parametrize(
    ("tree", "blocks"),
    [
        (
            {
                "block1": {"w": np.zeros((2, 2))},
                "block2": {"w": np.zeros((2, 2))},
                "final": {"w": np.zeros((2, 2))},
            },
            "*",
        ),
        (
            {
                "Transformer": {
                    "encoderblock_0": {"w": np.zeros((2, 2))},
                    "encoderblock_1": {"w": np.zeros((2, 2))},
                    "encoder_norm": {"scale": np.zeros(2)},
                }
            },
            "Transformer.*",
        ),
    ],
    ids=["block1-block2-final", "big_vision-Transformer.*"],
)
def test_defect3_blocks_of_ambiguous_order_are_an_error(tree, blocks):
    """Defect 3: sibling blocks where some keys carry a number and some do not have no order."""
    with pytest.raises(ValueError, match=r"block1|final|encoder_norm|order"):
        tg.layer_ids(tree, blocks=blocks, rules=[])


# ----------------------------------------------------------------------------
# Defect 4: Haiku modules with their own parameters beside submodules


@pytest.fixture(scope="module")
def haiku_vit_params():
    hk = pytest.importorskip("haiku")

    class Block(hk.Module):
        def __call__(self, x):
            return hk.Linear(D, name="fc1")(x)

    class ViT(hk.Module):
        def __call__(self, img):
            x = hk.Conv2D(D, kernel_shape=2, stride=2, name="patch_embed")(img)
            x = x.reshape(x.shape[0], -1, D)
            cls = hk.get_parameter("cls_token", (1, 1, D), init=jnp.zeros)
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, D)), x], axis=1)
            return Block(name="block_0")(x)

    forward = hk.transform(lambda img: ViT(name="vit")(img))
    params = forward.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
    # The real Haiku dict: the module's own parameter under "vit", its submodules beside it.
    assert jax.tree.map(jnp.shape, params) == {
        "vit": {"cls_token": (1, 1, D)},
        "vit/block_0/fc1": {"b": (D,), "w": (D, D)},
        "vit/patch_embed": {"b": (D,), "w": (2, 2, 3, D)},
    }
    return params


def test_defect4_haiku_paths_split_module_names_beside_own_params(haiku_vit_params):
    """Defect 4: "vit/patch_embed" beside "vit" is split, not kept as a quoted segment."""
    assert tg.paths(haiku_vit_params) == [
        "vit.cls_token",
        "vit.block_0.fc1.b",
        "vit.block_0.fc1.w",
        "vit.patch_embed.b",
        "vit.patch_embed.w",
    ]


def test_defect4_haiku_decay_mask_decays_the_patch_embed_kernel(haiku_vit_params):
    """Defect 4: the 4-D patch_embed conv kernel and the fc1 weight decay; biases and the token do not."""
    mask = tg.decay_mask()(haiku_vit_params)
    assert by_path(haiku_vit_params, mask) == {
        "vit.cls_token": False,
        "vit.block_0.fc1.b": False,
        "vit.block_0.fc1.w": True,
        "vit.patch_embed.b": False,
        "vit.patch_embed.w": True,
    }


def test_defect4_haiku_layer_ids_find_blocks_beside_own_params(haiku_vit_params):
    """Defect 4: blocks="vit.block_*" finds "vit/block_0/fc1" (one block; the rest is the top)."""
    ids = tg.layer_ids(haiku_vit_params, blocks="vit.block_*", rules=[])
    assert by_path(haiku_vit_params, ids) == {
        "vit.cls_token": 2,
        "vit.block_0.fc1.b": 1,
        "vit.block_0.fc1.w": 1,
        "vit.patch_embed.b": 2,
        "vit.patch_embed.w": 2,
    }


# ----------------------------------------------------------------------------
# Defect 5: penzai parameter labels that are not grouped (LoRA labels)


@pytest.fixture(scope="module")
def lora_values():
    pytest.importorskip("penzai")
    return optax_tree(penzai_lora_lm())


def lora_labels(values):
    return [p.label for p in values if "LoRA_" in p.label]


def test_defect5_penzai_lora_paths_are_dotted_labels(lora_values):
    """Defect 5: LoRA labels ("LoRA:TransformerLM.body/Sequential.sublayers[2]/.../LoRA_A.weights")
    must not turn every path into a quoted tuple repr."""
    paths = tg.paths(lora_values)
    assert len(paths) == len(lora_values)
    for path in paths:
        assert "(" not in path and "'" not in path, path
    by_label = dict(zip((p.label for p in lora_values), paths, strict=True))
    # The pretrained parameters keep their label paths ...
    plain = [path for label, path in by_label.items() if "LoRA_" not in label]
    assert plain == neox_paths(2)
    # ... and the 16 adapters (A and B on 4 attention Linears in 2 blocks) end in their own names.
    adapters = [by_label[label] for label in lora_labels(lora_values)]
    assert len(adapters) == 16
    for label in lora_labels(lora_values):
        assert by_label[label].endswith(label.rsplit("/", 1)[1]), (label, by_label[label])
        assert by_label[label].endswith(("LoRA_A.weights", "LoRA_B.weights"))


def test_defect5_penzai_lora_decay_mask(lora_values):
    """Defect 5: no decay for the embedding table, the biases and the norm scales/shifts."""
    mask = per_label(lora_values, tg.decay_mask()(lora_values))
    for label, decays in mask.items():
        if "LoRA_" in label:
            continue
        assert decays == neox_decay(label.replace("/", ".")), label
    assert not mask["transformer/embedder.embeddings"]
    assert not mask["transformer/block_0/pre_attention_norm/scale.weights"]
    assert not mask["transformer/block_0/attention/query/AddBias.bias"]  # a 2-D bias (heads, projection)
    assert mask["transformer/block_0/attention/query/Linear.weights"]


def test_defect5_penzai_freeze_all_but_lora(lora_values):
    """Defect 5: freeze everything but LoRA_A / LoRA_B (penzai's segment names): StatefulTrainer.build
    initialises the optimizer without NoMatchError, and only the adapters move."""
    from penzai.toolshed import basic_training

    tx = tg.freeze(optax.adam(1e-3), ~tg.glob("LoRA_{A,B}"))
    # What a user writes: build() calls tx.init on the trainer's parameter-value tuple.
    basic_training.StatefulTrainer.build(
        root_rng=jax.random.key(0),
        model=penzai_lora_lm(),
        optimizer_def=tx,
        loss_fn=lambda model, state, rng, **kw: (0.0, state, {}),
    )
    state = tx.init(lora_values)
    grads = numbered_grads(lora_values)
    updates, _ = jax.jit(tx.update)(grads, state, lora_values)
    moved = {label: float(np.max(np.abs(u))) for label, u in per_label(lora_values, updates).items()}
    for label, size in moved.items():
        if "LoRA_" in label:
            assert size == pytest.approx(1e-3, rel=1e-3), label
        else:
            assert size == 0.0, label


# ----------------------------------------------------------------------------
# Defect 6: layer_decay and scale_by_rules on a penzai parameter-value tree


def test_defect6_penzai_scale_by_rules(lora_values):
    """Defect 6: scale_by_rules on the tuple of ParameterValues optax receives (no pytree structure
    error); the mlp parameters scaled by 0.5 and the LoRA_B adapters by 2, under jit."""
    tx = optax.chain(optax.sgd(1.0), tg.scale_by_rules([("mlp", 0.5), ("LoRA_B", 2.0)]))
    state = tx.init(lora_values)
    grads = numbered_grads(lora_values)
    updates, _ = jax.jit(tx.update)(grads, state, lora_values)
    assert jax.tree.structure(updates) == jax.tree.structure(grads)

    def scale(label):
        return 0.5 if "/mlp/" in label else 2.0 if "/LoRA_B" in label else 1.0

    assert {scale(p.label) for p in lora_values} == {0.5, 1.0, 2.0}
    for param, grad, update in zip(lora_values, grads, updates, strict=True):
        np.testing.assert_allclose(
            np.asarray(update.value.data_array),
            -scale(param.label) * np.asarray(grad.value.data_array),
            err_msg=param.label,
        )


def test_defect6_penzai_layer_decay():
    """Defect 6: layer_decay on the penzai parameter-value tuple: embedder layer 0 (0.125),
    block_0 (0.25), block_1 (0.5), final_norm and lm_head the top (1.0)."""
    values = optax_tree(penzai_lm())
    tx = optax.chain(
        optax.sgd(1.0),
        tg.layer_decay(0.5, blocks="transformer.block_*", rules=[("transformer.embedder", 0)]),
    )
    state = tx.init(values)
    grads = numbered_grads(values)
    updates, _ = jax.jit(tx.update)(grads, state, values)
    assert jax.tree.structure(updates) == jax.tree.structure(grads)

    def scale(label):
        if label.startswith("transformer/embedder"):
            return 0.125
        if label.startswith("transformer/block_0/"):
            return 0.25
        if label.startswith("transformer/block_1/"):
            return 0.5
        return 1.0

    for param, grad, update in zip(values, grads, updates, strict=True):
        np.testing.assert_allclose(
            np.asarray(update.value.data_array),
            -scale(param.label) * np.asarray(grad.value.data_array),
            err_msg=param.label,
        )


# ----------------------------------------------------------------------------
# Defect 7: the command line on a penzai model factory

PENZAI_FACTORY = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp
    from penzai.models.transformer.variants import gpt_neox


    def lm():
        config = gpt_neox.GPTNeoXTransformerConfig(
            num_attention_heads=2, embedding_dim=8, projection_dim=4, mlp_hidden_dim=8,
            num_decoder_blocks=1, vocab_size=11, activation_fn="gelu_approx", rope_subset_size=2,
            rope_wavelength=10_000.0, layernorm_epsilon=1e-5, parameter_dtype=jnp.float32,
            activation_dtype=jnp.float32,
        )
        return gpt_neox.build_gpt_neox_transformer(config, init_base_rng=jax.random.key(0), name="transformer")
    """
)


@pytest.mark.slow
def test_defect7_cli_explains_a_penzai_factory_by_its_parameters(tmp_path):
    """Defect 7: `treeglob explain f.py:lm --preset default` lists the parameters by label path,
    not the model's scalar constants (ConstantRescale.by, masked_out_value, epsilon)."""
    pytest.importorskip("penzai")
    (tmp_path / "f.py").write_text(PENZAI_FACTORY)
    argv = [sys.executable, "-m", "treeglob", "explain", "f.py:lm", "--preset", "default"]
    result = subprocess.run(argv + ["--json"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(result.stdout)["leaves"]
    got = {row["path"]: row["label"] for row in rows}
    assert got == {p: "decay" if neox_decay(p) else "no_decay" for p in neox_paths(1)}
    # The plain table too.
    table = subprocess.run(
        argv + ["--width", "200"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert table.returncode == 0, table.stdout + table.stderr
    assert "transformer.block_0.attention.query.Linear.weights" in table.stdout
    for constant in ("masked_out_value", "epsilon", ".by "):
        assert constant not in table.stdout


# ----------------------------------------------------------------------------
# Defect 8: the DEFAULT preset on big_vision ViT names


def test_defect8_big_vision_patch_embedding_kernel_decays():
    """Defect 8: `embedding` is big_vision's 4-D patch conv: its kernel decays like any conv;
    its bias, pos_embedding and the cls token do not."""
    params = linen_vit(depth=1)
    assert params["embedding"]["kernel"].ndim == 4
    mask = by_path(params, tg.decay_mask()(params))
    assert mask["embedding.kernel"] is True
    assert mask["embedding.bias"] is False
    assert mask["pos_embedding"] is False
    assert mask["cls"] is False
    assert mask["head.kernel"] is True
    assert mask["Transformer.encoderblock_0.MlpBlock_0.Dense_0.kernel"] is True


@pytest.mark.parametrize(
    ("token", "count"),
    [("cls", 1), ("cls_token", 1), ("reg", 2), ("reg_tokens", 2), ("dist_token", 1)],
)
def test_defect8_learned_tokens_are_not_decayed(token, count):
    """Defect 8: a learned token of shape (1, n, D) is not decayed, whatever its usual name."""
    params = linen_vit(depth=1, token=token, token_count=count)
    assert params[token].shape == (1, count, D)
    mask = by_path(params, tg.decay_mask()(params))
    assert mask[token] is False
    assert mask["embedding.kernel"] is True


# ----------------------------------------------------------------------------
# Defect 9: a type selector on a Flax NNX State without types_from=


def test_defect9_nnx_state_type_selector_asks_for_types_from():
    """Defect 9: module types live on the model, not the State: the error says to pass types_from=."""
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(D, D, rngs=rngs)
            self.norm = nnx.LayerNorm(D, rngs=rngs)

    model = Net(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    with pytest.raises(tg.NoMatchError, match=r"types_from"):
        tg.mask(state, nnx.LayerNorm)
    mask = tg.mask(state, nnx.LayerNorm, types_from=model)
    assert by_path(state, mask) == {
        "fc.bias": False,
        "fc.kernel": False,
        "norm.bias": True,
        "norm.scale": True,
    }


# ----------------------------------------------------------------------------
# Defect 10: a stacked penzai model (LayerStack) without stacked=


def assert_stacked_norms_not_decayed(values, stacked, norm_labels, matrix_labels):
    mask = per_label(values, tg.decay_mask(stacked=stacked)(values))
    for label in norm_labels:
        assert is_false_everywhere(mask[label]), label
    for label in matrix_labels:
        assert np.all(np.asarray(mask[label])), label


def test_defect10_penzai_layer_stack_norm_scales_are_not_decayed():
    """Defect 10: penzai's GPT-NeoX with use_layer_stack: the norm scales (blocks, embedding) carry
    the stack axis (named "blocks", leading in the data array). The unbound parameters no longer
    say so; the model does, and stacked_layers reads it, so the norms are not decayed."""
    model = penzai_lm(num_blocks=3, use_layer_stack=True)
    values = optax_tree(model)
    norm = "transformer/blocks/pre_attention_norm/scale.weights"
    (scale,) = [p for p in values if p.label == norm]
    assert dict(scale.value.named_shape) == {"blocks": 3, "embedding": 8}
    assert scale.value.data_array.shape == (3, 8)
    stacked = tg.stacked_layers(model)
    assert stacked == {"transformer.blocks": 1}  # the stack's subtree, as a scanned model's
    assert_stacked_norms_not_decayed(
        values,
        stacked,
        norm_labels=[
            norm,
            "transformer/blocks/pre_ffw_norm/scale.weights",
            "transformer/final_norm/scale.weights",
        ],
        matrix_labels=["transformer/blocks/mlp/in/Linear.weights", "transformer/lm_head.weights"],
    )
    # One path per layer, as for any stacked leaf, and layer decay finds the blocks.
    assert "transformer.blocks.2.pre_attention_norm.scale.weights" in tg.paths(values, stacked=stacked)
    ids = by_path(
        values, tg.layer_ids(values, blocks="transformer.blocks", rules=[("embedder", 0)], stacked=stacked)
    )
    assert ids["transformer.embedder.embeddings"] == 0
    assert np.asarray(ids["transformer.blocks.mlp.in.Linear.weights"]).ravel().tolist() == [1, 2, 3]


def test_defect10_the_model_itself_is_refused_without_stacked():
    """Defect 10: the bound model marks its LayerStack; resolving rules on it says where to go."""
    model = penzai_lm(num_blocks=2, use_layer_stack=True)
    with pytest.raises(ValueError, match=r"LayerStack.*stacked=treeglob\.stacked_layers\(model\)"):
        tg.decay_mask()(model)
    assert tg.stacked_layers(penzai_lm(num_blocks=2)) == {}  # no LayerStack, nothing declared


def stack_of_blocks():
    from penzai import pz

    def block(name, init_base_rng):
        return pz.nn.Sequential(
            [
                pz.nn.LayerNorm.from_config(
                    name=f"{name}/pre", init_base_rng=init_base_rng, across_axes={"embedding": 8}
                ),
                pz.nn.Affine.from_config(
                    name=f"{name}/proj",
                    init_base_rng=init_base_rng,
                    input_axes={"embedding": 8},
                    output_axes={"embedding": 8},
                ),
            ]
        )

    stack = pz.nn.LayerStack.from_sublayer_builder(
        builder=block,
        stack_axis="layers",
        stack_axis_size=3,
        init_base_rng=jax.random.key(0),
        builder_kwargs={"name": "stack"},
    )
    return block, stack


def test_defect10_handwritten_layer_stack_norm_scale_is_not_decayed():
    """Defect 10: a LayerStack.from_sublayer_builder of (LayerNorm "pre", Affine "proj"): the norm's
    name does not say "norm", so only the stack axis tells its scale from a matrix."""
    pytest.importorskip("penzai")
    block, stack = stack_of_blocks()
    values = optax_tree(stack)
    assert [p.label for p in values] == [
        "stack/pre/scale.weights",
        "stack/pre/shift.bias",
        "stack/proj/Linear.weights",
        "stack/proj/AddBias.bias",
    ]
    assert values[0].value.data_array.shape == (3, 8)  # the layer axis leads
    # Unstacked, the same block's scale is 1-D and not decayed:
    one = optax_tree(block("one", jax.random.key(0)))
    assert not per_label(one, tg.decay_mask()(one))["one/pre/scale.weights"]
    assert_stacked_norms_not_decayed(
        values,
        tg.stacked_layers(stack),
        norm_labels=["stack/pre/scale.weights"],
        matrix_labels=["stack/proj/Linear.weights"],
    )


def test_defect10_a_stack_axis_that_does_not_lead_is_refused():
    """Defect 10: where the layer axis is not the leading one, refuse rather than slice the wrong axis."""
    pytest.importorskip("penzai")
    from penzai import pz

    _, stack = stack_of_blocks()
    turned = (
        pz.select(stack)
        .at_instances_of(pz.Parameter)
        .apply(
            lambda p: pz.Parameter(value=p.value.order_as(*reversed(list(p.value.named_axes))), label=p.label)
        )
    )
    with pytest.raises(ValueError, match=r"stack/pre/scale\.weights|stack\.pre\.scale\.weights"):
        tg.stacked_layers(turned)


def test_defect10_the_command_line_reads_the_stacked_layers_of_a_penzai_factory(tmp_path, capsys):
    """Defect 10: `treeglob explain f.py:lm` on a layer-stacked penzai model finds the stack itself."""
    pytest.importorskip("penzai")
    from treeglob._cli.main import main

    (tmp_path / "f.py").write_text(
        PENZAI_FACTORY.replace(
            "activation_dtype=jnp.float32,", "activation_dtype=jnp.float32, use_layer_stack=True,"
        )
    )
    assert main(["explain", f"{tmp_path / 'f.py'}:lm", "--preset", "default", "--json"]) == 0
    rows = {row["path"]: row["label"] for row in json.loads(capsys.readouterr().out)["leaves"]}
    assert rows["transformer.blocks.0.pre_attention_norm.scale.weights"] == "no_decay"
    assert rows["transformer.blocks.0.mlp.in.Linear.weights"] == "decay"


def haiku_layer_stack_params():
    hk = pytest.importorskip("haiku")

    def forward(x):
        def block(x):
            x = hk.LayerNorm(-1, True, True, name="pre")(x)  # a name no preset knows as a norm
            return jax.nn.gelu(hk.Linear(D, name="fc")(x))

        x = hk.Linear(D, name="proj_in")(x)
        x = hk.layer_stack(3)(block)(x)
        return hk.Linear(2, name="head")(x)

    return hk.transform(forward).init(jax.random.key(0), jnp.ones((1, D)))


def test_defect10_haiku_layer_stack_is_declared_by_its_module_name(tmp_path, capsys):
    """Defect 10: hk.layer_stack keeps its layers under `__layer_stack_no_per_layer`, with a leading
    layer axis: refused without stacked=, which stacked_layers reads from the names; then the
    stacked norm scale (3, D) is not decayed and the stacked matrices are."""
    params = haiku_layer_stack_params()
    assert params["__layer_stack_no_per_layer/pre"]["scale"].shape == (3, D)
    with pytest.raises(ValueError, match=r"hk\.layer_stack.*stacked=\{'__layer_stack_no_per_layer': 1\}"):
        tg.decay_mask()(params)
    stacked = tg.stacked_layers(params)
    assert stacked == {"__layer_stack_no_per_layer": 1}
    mask = by_path(params, tg.decay_mask(stacked=stacked)(params))
    assert mask == {
        "__layer_stack_no_per_layer.fc.b": False,
        "__layer_stack_no_per_layer.fc.w": True,
        "__layer_stack_no_per_layer.pre.offset": False,
        "__layer_stack_no_per_layer.pre.scale": False,
        "head.b": False,
        "head.w": True,
        "proj_in.b": False,
        "proj_in.w": True,
    }
    # Its checkpoint, on the command line: the stack is read from the tensor names.
    from treeglob._cli.main import main

    tg.save(tmp_path / "h.safetensors", params)
    assert main(["explain", str(tmp_path / "h.safetensors"), "--preset", "default", "--json"]) == 0
    rows = {row["path"]: row["label"] for row in json.loads(capsys.readouterr().out)["leaves"]}
    assert rows["__layer_stack_no_per_layer.2.pre.scale"] == "no_decay"
    assert rows["__layer_stack_no_per_layer.2.fc.w"] == "decay"


def test_a_penzai_model_is_not_saved_or_loaded_as_if_it_held_no_parameters(tmp_path):
    """A penzai model keeps its parameters in Parameter objects: save() would write only its
    constants and load() would fill nothing. Both say where the parameters are instead."""
    model = penzai_lm()
    for call in (
        lambda: tg.save(tmp_path / "m.safetensors", model),
        lambda: tg.load(model, {"w": np.zeros(2)}),
        lambda: tg.load_plan(model, {"w": np.zeros(2)}),
    ):
        with pytest.raises(ValueError, match=r"keeps its parameters in Parameter objects.*pz\.freeze_params"):
            call()
    assert not list(tmp_path.iterdir())
    # Its parameter values save and load back.
    values = optax_tree(model)
    names = tg.save(tmp_path / "v.safetensors", values)
    assert names == neox_paths(2)
    _, report = tg.load(values, tmp_path / "v.safetensors")
    assert report.ok


def test_load_plan_moves_whole_tensors_of_a_haiku_layer_stack(tmp_path, capsys):
    """The command line's load-plan splits tensors by layer only where --stacked says so, as
    tg.load_plan does: a checkpoint saved from the same params loads whole."""
    from treeglob._cli.main import main

    params = haiku_layer_stack_params()
    tg.save(tmp_path / "h.safetensors", params)
    shapes = {key: {name: tuple(v.shape) for name, v in module.items()} for key, module in params.items()}
    (tmp_path / "f.py").write_text(
        "import numpy as np\n"
        f"SHAPES = {shapes!r}\n"
        "def params():\n"
        "    return {k: {n: np.zeros(s, np.float32) for n, s in d.items()} for k, d in SHAPES.items()}\n"
    )
    assert main(["load-plan", f"{tmp_path / 'f.py'}:params", str(tmp_path / "h.safetensors"), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)["counts"]
    assert counts["loaded"]["leaves"] == 8 and counts["missing"]["leaves"] == 0


# ----------------------------------------------------------------------------
# Defect 1: every wrapper resolves at init, remembers NNX Variable types, and scales leaf by leaf


def test_defect1_nnx_scale_by_rules_with_lora_param():
    """Defect 1: scale_by_rules([(nnx.LoRAParam, 2.0)]) under nnx.Optimizer: LoRA params get
    twice the SGD step, the rest one."""
    nnx = pytest.importorskip("flax.nnx")
    model, _ = nnx_lora_model()
    tx = optax.chain(optax.sgd(1.0), tg.scale_by_rules([(nnx.LoRAParam, 2.0)], default=1.0))
    before, grads, after = nnx_step(model, tx)
    assert any(np.any(grads[p]) for p in grads if p.endswith("lora_a"))
    assert_sgd_step(before, grads, after, lambda p: 2.0 if p.endswith(("lora_a", "lora_b")) else 1.0)


def test_defect1_nnx_freeze_all_but_lora_param():
    """Defect 1: freeze(sgd, ~inside(nnx.LoRAParam)) under nnx.Optimizer trains the adapters alone."""
    nnx = pytest.importorskip("flax.nnx")
    model, _ = nnx_lora_model()
    tx = tg.freeze(optax.sgd(1.0), ~tg.inside(nnx.LoRAParam))
    before, grads, after = nnx_step(model, tx)
    assert_sgd_step(before, grads, after, lambda p: 1.0 if p.endswith(("lora_a", "lora_b")) else 0.0)


@pytest.mark.parametrize("module_type_rule", [False, True], ids=["embed-by-name", "nnx.Embed-types_from"])
def test_defect1_nnx_layer_decay_with_type_rules(module_type_rule):
    """Defect 1: layer_decay(0.5) with a Variable-type rule (the Token Param subclass) under
    nnx.Optimizer: stem 0.125, blocks.0 0.25, blocks.1 0.5, head 1. A module-type rule (nnx.Embed)
    needs the model as types_from= (module types are not on the State), as the README says."""
    nnx = pytest.importorskip("flax.nnx")
    model, token = nnx_lora_model()
    if module_type_rule:
        decay = tg.layer_decay(0.5, blocks="blocks", rules=[(nnx.Embed, 0), (token, 0)], types_from=model)
    else:
        decay = tg.layer_decay(0.5, blocks="blocks", rules=[("embed", 0), (token, 0)])
    before, grads, after = nnx_step(model, optax.chain(optax.sgd(1.0), decay))

    def scale(path):
        if path in ("embed.embedding", "cls"):
            return 0.125
        if path.startswith("blocks.0."):
            return 0.25
        if path.startswith("blocks.1."):
            return 0.5
        assert path.startswith("head."), path
        return 1.0

    assert_sgd_step(before, grads, after, scale)


# Each wrapper with a selection S, and what it does to a gradient g of a parameter p.
WRAPPERS = {
    "masked": (lambda S, kw: tg.masked(optax.scale(2.0), S, **kw), lambda g, p, s: 2 * g if s else g),
    "multi_transform": (
        lambda S, kw: tg.multi_transform(
            {"s": optax.scale(2.0), "o": optax.identity()}, [(S, "s")], default="o", **kw
        ),
        lambda g, p, s: 2 * g if s else g,
    ),
    "decay_mask": (
        lambda S, kw: optax.add_decayed_weights(
            1.0, mask=tg.decay_mask([(S, "decay"), ("**", "keep")], **kw)
        ),
        lambda g, p, s: g + p if s else g,
    ),
    "freeze": (lambda S, kw: tg.freeze(optax.identity(), S, **kw), lambda g, p, s: 0 * g if s else g),
    "scale_by_rules": (lambda S, kw: tg.scale_by_rules([(S, 2.0)], **kw), lambda g, p, s: 2 * g if s else g),
}


def equinox_tree():
    import equinox as eqx

    return eqx.filter(eqx.nn.MLP(3, 2, 4, 2, key=jax.random.key(0)), eqx.is_array), "layers.1", {}


def penzai_tree():
    pytest.importorskip("penzai")
    return optax_tree(penzai_lora_lm()), "LoRA_{A,B}", {}


def stacked_tree():
    tree = {"blocks": {"w": jnp.ones((3, 2, 2)), "b": jnp.ones((3, 2))}, "head": {"w": jnp.ones((2, 2))}}
    return tree, "blocks.*.w", {"stacked": {"blocks": 1}}


@pytest.mark.parametrize(
    "tree_of", [equinox_tree, penzai_tree, stacked_tree], ids=["equinox", "penzai", "stacked"]
)
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_defect1_every_wrapper_on_every_tree(wrapper, tree_of):
    """Defect 1: one wrapper factory, so every wrapper gives the hand-written update under jit
    on an Equinox model, a penzai parameter-value tree (ParameterValue nodes in the updates) and
    a stacked model."""
    params, selection, kw = tree_of()
    build, reference = WRAPPERS[wrapper]
    tx = build(selection, kw)
    grads = numbered_grads(params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    selected = jax.tree.leaves(tg.mask(params, selection, **kw))
    assert any(selected) and not all(selected)
    for u, g, p, s in zip(*map(jax.tree.leaves, (updates, grads, params)), selected, strict=True):
        np.testing.assert_allclose(u, reference(g, p, s), rtol=1e-6)


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_defect1_every_wrapper_under_nnx_optimizer_with_a_variable_type_rule(wrapper):
    """Defect 1: the same wrappers under nnx.Optimizer, selecting by a Variable type (LoRAParam):
    decided at init, where the Variables are, and kept for the updates."""
    nnx = pytest.importorskip("flax.nnx")
    model, _ = nnx_lora_model()
    build, reference = WRAPPERS[wrapper]
    before, grads, after = nnx_step(model, optax.chain(build(nnx.LoRAParam, {}), optax.sgd(1.0)))
    for path in before:
        lora = path.endswith(("lora_a", "lora_b"))
        expected = before[path] - reference(grads[path], before[path], lora)
        np.testing.assert_allclose(after[path], expected, rtol=1e-6, atol=1e-7, err_msg=path)


# ----------------------------------------------------------------------------
# Defect 11: the documentation's sharding snippet


def test_defect11_the_docs_make_their_meshes_with_auto_axis_types():
    """Defect 11: with current JAX a mesh of default (explicit) axis types makes a Megatron-style
    step fail inside JAX; every `make_mesh` the README and the documentation show says
    axis_types=, as the example does (but in the error catalogue, whose meshes only
    show messages: no step runs on them)."""

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    pages.remove(ROOT / "docs" / "errors.md")
    calls = [line for page in pages for line in page.read_text().splitlines() if "make_mesh(" in line]
    assert calls and all("axis_types=" in line for line in calls), calls
