"""Every framework's trees select as Equinox's do: Flax NNX (under nnx.Optimizer), Flax
Linen, Haiku and flat checkpoint dicts; presets decide leaf by leaf as each framework's
own conventions do."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax", reason="the framework tests need flax (pip install '.[test]')")
pytest.importorskip("haiku", reason="the framework tests need dm-haiku (pip install '.[test]')")

from flax import nnx, traverse_util  # noqa: E402

import treeglob as tg  # noqa: E402
from conftest import ROOT  # noqa: E402
from framework_models import DEPTH, NNXGPT, NNXBlock, haiku_params, linen_params  # noqa: E402

# ----------------------------------------------------------------------------
# References, written from each convention's own code


def hf_flax_decay_mask(flat, bias="bias"):
    """`decay_mask_fn` of Hugging Face's Flax examples (run_clm_flax.py), on flatten_dict keys.
    Haiku spells the bias `b`: the same convention with its name."""
    layer_norm_candidates = ["layernorm", "layer_norm", "ln"]
    layer_norm_named_params = {
        layer[-2:]
        for layer_norm_name in layer_norm_candidates
        for layer in flat
        if layer_norm_name in "".join(layer).lower()
    }
    return {path: (path[-1] != bias and path[-2:] not in layer_norm_named_params) for path in flat}


def nanogpt_decay(flat):
    """nanoGPT's configure_optimizers: decay every parameter with dim >= 2."""
    return {path: x.ndim >= 2 for path, x in flat.items()}


def timm_decay(flat):
    """timm's param_groups_weight_decay: no decay for ndim <= 1 or names ending in .bias."""
    return {path: not (x.ndim <= 1 or ".".join(path).endswith(".bias")) for path, x in flat.items()}


def flat_of(params):
    """{tuple path: leaf} as flatten_dict gives it (Haiku's module names split on '/')."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params)
    return {tuple(p for part in path for p in str(part).split("/")): x for path, x in flat.items()}


def decisions(params, preset):
    return dict(zip(tg.paths(params), jax.tree.leaves(tg.decay_mask(preset)(params)), strict=True))


def nnx_params():
    return nnx.state(NNXGPT(rngs=nnx.Rngs(0)), nnx.Param)


FRAMEWORKS = {"nnx": nnx_params, "linen": linen_params, "haiku": haiku_params}

#: What the usual exclusions leave to decay: the matrices of attention, MLP and head.
DEFAULT_DECAYED = {
    "nnx": {
        f"blocks.{i}.{m}.kernel"
        for i in range(DEPTH)
        for m in ("attn.query", "attn.key", "attn.value", "attn.out", "fc", "proj")
    }
    | {"head.kernel"},
    "linen": {
        f"h_{i}.{m}.kernel"
        for i in range(DEPTH)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    | {"lm_head.kernel"},
    "haiku": {
        f"haiku_block{s}.{m}.w"
        for s in ("", "_1")
        for m in ("multi_head_attention.query", "multi_head_attention.key", "multi_head_attention.value")
        + ("multi_head_attention.linear", "linear", "linear_1")
    }
    | {"linear.w"},
}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_presets_decide_as_each_frameworks_conventions(framework):
    params = FRAMEWORKS[framework]()
    flat = flat_of(params)
    assert sorted(".".join(p) for p in flat) == sorted(tg.paths(params))  # one path convention

    def by_path(reference):
        return {".".join(path): decay for path, decay in reference.items()}

    bias = "b" if framework == "haiku" else "bias"
    assert decisions(params, tg.presets.HF) == by_path(hf_flax_decay_mask(flat, bias))
    assert decisions(params, tg.presets.NANOGPT) == by_path(nanogpt_decay(flat))
    assert decisions(params, tg.presets.TIMM) == by_path(timm_decay(flat))
    assert {p for p, decay in decisions(params, tg.presets.DEFAULT).items() if decay} == DEFAULT_DECAYED[
        framework
    ]


@pytest.mark.parametrize(
    ("path", "decays"),
    [
        # Norms and embeddings by their own name...
        ("wte.weight", False),
        ("embed_tokens.weight", False),
        ("pos_embed", False),
        ("ln_f.scale", False),
        ("encoder.layer_norm.bias", False),
        ("model.layers.0.input_layernorm.weight", False),
        ("transformer.h.0.ln_1.scale", False),
        ("LayerNorm_0.scale", False),
        ("embeddings.word_embeddings.weight", False),
        # ... never a layer inside a subtree whose name mentions one.
        ("time_embedding.linear_1.weight", True),
        ("normal_head.weight", True),
        ("denormalizer.proj.weight", True),
        ("embeddings.projection.weight", True),
        ("patch_embed.proj.weight", True),
    ],
)
def test_default_preset_names_apply_to_the_parameters_own_module(path, decays):
    tree = {path: np.zeros((4, 4)), "other.weight": np.zeros((4, 4))}  # a flat checkpoint dict
    assert tg.labels(tree, tg.presets.DEFAULT)[path] == ("decay" if decays else "no_decay")


# ----------------------------------------------------------------------------
# One path whichever way the tree arrives


def test_a_checkpoints_flat_dict_has_the_nested_trees_paths():
    layer = {"q": np.zeros((2, 2)), "norm": np.zeros(2)}
    nested = {"model": {"layers": {"0": layer, "1": layer}}, "head": np.zeros((2, 3))}
    flat_tuples = traverse_util.flatten_dict(nested)  # ('model', 'layers', '0', 'q'): ...
    flat_dotted = {".".join(k): v for k, v in flat_tuples.items()}  # safetensors.flax.load_file
    flat_slashes = traverse_util.flatten_dict(nested, sep="/")
    expected = sorted(tg.paths(nested))
    for tree in (flat_tuples, flat_dotted, flat_slashes):
        assert sorted(tg.paths(tree)) == expected
        selected = jax.tree.leaves(tg.mask(tree, "layers.{0..0}.q"))
        assert [p for p, m in zip(tg.paths(tree), selected, strict=True) if m] == ["model.layers.0.q"]
    # A close match is a pattern that works.
    with pytest.raises(
        tg.NoMatchError, match=r"Close matches in the tree: model\.layers\.1\.q, model\.layers\.0\.q\."
    ):
        tg.mask(flat_dotted, "layer.*.q")


def test_haiku_module_names_are_segments():
    params = haiku_params()
    assert jax.tree.leaves(tg.mask(params, "haiku_block_1.linear_1.w"))  # no error: it matches
    hit = [
        p for p, m in zip(tg.paths(params), jax.tree.leaves(tg.mask(params, "linear_1.w")), strict=True) if m
    ]
    assert hit == ["haiku_block.linear_1.w", "haiku_block_1.linear_1.w"]


# ----------------------------------------------------------------------------
# Flax NNX under nnx.Optimizer


def _spy(log):
    def init(params):
        log.append(("init", tg.paths(params)))
        return optax.EmptyState()

    def update(updates, state, params=None):
        log.append(("update", tg.paths(updates)))
        return updates, state

    return optax.GradientTransformation(init, update)


def _grads(model):
    tokens = jnp.arange(6) % 11
    return nnx.grad(lambda m: jnp.mean(m(tokens) ** 2))(model)


def test_init_and_update_see_the_same_paths():
    model, log = NNXGPT(rngs=nnx.Rngs(0)), []
    optimizer = nnx.Optimizer(model, _spy(log), wrt=nnx.Param)
    optimizer.update(model, _grads(model))
    (_, at_init), (_, at_update) = log
    assert at_init == at_update == tg.paths(nnx.state(model, nnx.Param))
    assert "head.kernel" in at_init and not any(p.endswith(".value") for p in at_init)


def test_freezing_by_variable_type_holds_at_every_step():
    model = NNXGPT(rngs=nnx.Rngs(0), lora_rank=2)
    before = jax.tree.leaves(nnx.state(model, nnx.Param))  # the arrays: the State's Variables change in place
    optimizer = nnx.Optimizer(model, tg.freeze(optax.adam(1e-2), ~tg.inside(nnx.LoRAParam)), wrt=nnx.Param)
    for _ in range(2):
        optimizer.update(model, _grads(model))
    after = nnx.state(model, nnx.Param)
    moved = {
        p
        for p, a, b in zip(tg.paths(after), jax.tree.leaves(after), before, strict=True)
        if not np.array_equal(a, b)
    }
    assert moved == {f"blocks.{i}.fc.lora_{ab}" for i in range(DEPTH) for ab in "ab"}


def test_static_masks_and_labels_have_the_structure_optax_sees():
    model = NNXGPT(rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    mask = tg.mask(params, tg.ndim >= 2)
    assert not any(
        isinstance(x, nnx.Variable)
        for x in jax.tree.leaves(mask, is_leaf=lambda x: isinstance(x, nnx.Variable))
    )
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.5, mask=mask), wrt=nnx.Param)
    optimizer.update(model, _grads(model))
    labels = tg.labels(params, tg.presets.DEFAULT)
    optimizer = nnx.Optimizer(
        model,
        optax.partition({"decay": optax.adamw(1e-2), "no_decay": optax.adam(1e-2)}, labels),
        wrt=nnx.Param,
    )
    optimizer.update(model, _grads(model))


def test_module_types_select_from_the_model():
    model = NNXGPT(rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    norms = tg.mask(params, nnx.LayerNorm, types_from=model)
    selected = {p for p, m in zip(tg.paths(params), jax.tree.leaves(norms), strict=True) if m}
    assert selected == {
        f"blocks.{i}.ln{k}.{w}" for i in range(DEPTH) for k in (1, 2) for w in ("scale", "bias")
    } | {"ln_f.scale", "ln_f.bias"}
    with pytest.raises(
        tg.NoMatchError, match=r"The selector given to mask\(\) inside\(LayerNorm\) matches no leaf"
    ):
        tg.mask(params, nnx.LayerNorm)  # a State holds no module types
    no_decay = tg.any_of(nnx.LayerNorm, nnx.Embed, "*.bias", "wpe")
    tx = optax.adamw(
        1e-2,
        weight_decay=0.1,
        mask=tg.decay_mask([(no_decay, "no_decay"), ("**", "decay")], types_from=model),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    optimizer.update(model, _grads(model))
    with pytest.raises(
        ValueError,
        match=r"mask\(\): 1 leaves of the tree have no leaf of the same path in the tree the types come from",
    ):
        tg.mask({"other": np.zeros(2)}, "other", types_from=model)


def test_multi_transform_and_layer_decay_under_nnx_optimizer():
    model = NNXGPT(rngs=nnx.Rngs(0), depth=3)
    before = jax.tree.leaves(nnx.state(model, nnx.Param))
    tx = optax.chain(
        tg.multi_transform(
            {"frozen": optax.set_to_zero(), "train": optax.sgd(1.0)},
            [(nnx.Embed, "frozen")],
            default="train",
            types_from=model,  # module types live on the model, not on its State
        ),
        tg.layer_decay(0.5, rules=[("{wte,wpe}", 0), ("ln_f", -2)]),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = _grads(model)
    optimizer.update(model, grads)
    after = nnx.state(model, nnx.Param)
    step = {
        p: np.asarray(b) - np.asarray(a)
        for p, a, b in zip(tg.paths(after), jax.tree.leaves(after), before, strict=True)
    }
    g = dict(zip(tg.paths(grads), jax.tree.leaves(grads), strict=True))
    np.testing.assert_allclose(step["wte.embedding"], 0.0)
    np.testing.assert_allclose(
        step["blocks.0.fc.kernel"], 0.5**3 * np.asarray(g["blocks.0.fc.kernel"]), atol=1e-6
    )
    np.testing.assert_allclose(step["head.kernel"], np.asarray(g["head.kernel"]), atol=1e-6)


def test_stacked_layers_built_with_nnx_vmap():
    @nnx.vmap(in_axes=0, out_axes=0)
    def make_blocks(key):
        return NNXBlock(8, 2, rngs=nnx.Rngs(key))

    blocks = make_blocks(jax.random.split(jax.random.key(0), 4))
    params = nnx.state(blocks, nnx.Param)
    assert tg.paths(params, stacked={"": 1})[:2] == ["0.attn.key.bias", "0.attn.key.kernel"]
    mask = tg.mask(params, tg.ndim >= 2, stacked={"": 1})
    assert mask["attn"]["query"]["kernel"] is True and mask["ln1"]["scale"] is False
    scales = tg.labels(params, [("{0..1}", 0.0)], default=1.0, stacked={"": 1})
    assert scales["fc"]["kernel"].ravel().tolist() == [0.0, 0.0, 1.0, 1.0]


# ----------------------------------------------------------------------------
# The command line: factories of every framework, and checkpoints of their params


FACTORIES = """
import sys
sys.path.insert(0, {tests!r})
from flax import nnx
import framework_models as frameworks


class WithStats(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)


def nnx_stats():
    return WithStats(nnx.Rngs(0))


def nnx_gpt():
    return frameworks.NNXGPT(rngs=nnx.Rngs(0))


def linen_gpt():
    return frameworks.linen_params()


def haiku_gpt():
    return frameworks.haiku_params()
"""


@pytest.fixture
def factories(tmp_path):

    path = tmp_path / "factories.py"
    path.write_text(FACTORIES.format(tests=str(ROOT / "tests")))
    return path


def _cli_json(capsys, *argv):
    import json

    from treeglob._cli.main import main

    status = main([*map(str, argv), "--json"])
    return status, json.loads(capsys.readouterr().out)


def test_an_nnx_factory_lists_its_parameters(capsys, factories):
    status, out = _cli_json(capsys, "paths", f"{factories}:nnx_stats")
    assert status == 0 and [r["path"] for r in out["leaves"]] == [
        "bn.bias",
        "bn.scale",
        "lin.bias",
        "lin.kernel",
    ]
    status, out = _cli_json(capsys, "paths", f"{factories}:nnx_stats", "--variables", "Param,BatchStat")
    assert [r["path"] for r in out["leaves"]] == [
        "bn.bias",
        "bn.mean",
        "bn.scale",
        "bn.var",
        "lin.bias",
        "lin.kernel",
    ]
    status, out = _cli_json(capsys, "paths", f"{factories}:nnx_stats", "--variables", "all")
    assert "drop.rngs.count" in [r["path"] for r in out["leaves"]]
    status, out = _cli_json(capsys, "paths", f"{factories}:nnx_stats", "--variables", "Parm")
    assert status == 2 and "'Parm' is not a Flax NNX Variable type" in out["error"]["message"]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_command_line_selects_what_training_selects(capsys, factories, tmp_path, framework):
    from safetensors.numpy import save_file

    params = FRAMEWORKS[framework]()
    expected = dict(
        zip(tg.paths(params), jax.tree.leaves(tg.labels(params, tg.presets.DEFAULT)), strict=True)
    )
    # The factory, built abstractly ...
    status, out = _cli_json(capsys, "explain", f"{factories}:{framework}_gpt", "--preset", "default")
    assert status == 0 and {r["path"]: r["label"] for r in out["leaves"]} == expected
    # ... and a checkpoint of the same params, under flatten_dict names.
    flat = {"/".join(map(str, k)): np.asarray(v) for k, v in flat_of(params).items()}
    save_file(flat, str(tmp_path / "ckpt.safetensors"))
    status, out = _cli_json(capsys, "explain", tmp_path / "ckpt.safetensors", "--preset", "default")
    assert status == 0 and {r["path"]: r["label"] for r in out["leaves"]} == expected


# ----------------------------------------------------------------------------
# penzai: a StatefulTrainer hands optax a tuple of parameter values


def test_penzai_parameters_are_named_by_their_labels():
    pytest.importorskip("penzai")
    from penzai import pz
    from penzai.models import simple_mlp
    from penzai.toolshed import basic_training

    mlp = simple_mlp.MLP.from_config(name="mlp", init_base_rng=jax.random.key(0), feature_sizes=[4, 8, 4])
    seen = []

    def spy(params):
        seen.append(tg.paths(params))
        return optax.EmptyState()

    def loss_fn(model, state, rng, x):
        return jnp.sum(model(x).unwrap("batch", "features") ** 2), state, {}

    decay = tg.decay_mask()
    tx = optax.chain(
        optax.GradientTransformation(spy, lambda u, s, p=None: (u, s)), optax.adamw(1e-2, mask=decay)
    )
    trainer = basic_training.StatefulTrainer.build(
        root_rng=jax.random.key(1), model=mlp, optimizer_def=tx, loss_fn=loss_fn
    )
    trainer.step(x=pz.nx.wrap(jnp.ones((2, 4))).tag("batch", "features"))
    labels = [
        "mlp.Affine_0.Linear.weights",
        "mlp.Affine_0.AddBias.bias",
        "mlp.Affine_1.Linear.weights",
        "mlp.Affine_1.AddBias.bias",
    ]
    assert seen == [labels]
    _, params = pz.unbind_params(mlp)
    values = tuple(p.freeze() for p in params)
    assert decay(values) == (True, False, True, False)
    assert tg.mask(values, "Affine_1") == (False, False, True, True)
