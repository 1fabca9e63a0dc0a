"""Checkpoint transfer as each framework's users meet it: Flax NNX (State and module, under
nnx.Optimizer, scanned layers), Flax Linen (params dicts, PyTorch-style checkpoints), Haiku
(`mlp/~/linear_0` module names), orbax checkpoint directories, `.npz` files, and the
`load-plan` command on a `file.py:function` factory. Every loaded value is checked bit for bit."""

import functools
import json
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import treeglob as tg
from treeglob._cli.main import main

X = (jnp.arange(8.0).reshape(2, 4) - 3.0) / 7.0  # a batch of two 4-vectors


def bits(x):
    x = np.asarray(x)
    return x.dtype, x.shape, x.tobytes()


def assert_bit_equal(a, b):
    """Same structure, and every leaf the same dtype, shape and bytes."""
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    assert [bits(x) for x in leaves_a] == [bits(y) for y in leaves_b]


def differs(a, b):
    return any(bits(x) != bits(y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def torch_mlp(seed=0, hidden=8, out=3):
    """`nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, out))`'s state dict: (out, in) weights."""
    rng = np.random.default_rng(seed)
    return {
        "layers.0.weight": rng.standard_normal((hidden, 4)).astype(np.float32),
        "layers.0.bias": rng.standard_normal(hidden).astype(np.float32),
        "layers.2.weight": rng.standard_normal((out, hidden)).astype(np.float32),
        "layers.2.bias": rng.standard_normal(out).astype(np.float32),
    }


def torch_forward(sd, x):
    h = np.maximum(np.asarray(x) @ sd["layers.0.weight"].T + sd["layers.0.bias"], 0)
    return h @ sd["layers.2.weight"].T + sd["layers.2.bias"]


# ----------------------------------------------------------------------------
# The models, as each framework's users write them


@functools.cache
def nnx_net():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs, dropout=False):
            self.embed = nnx.Embed(10, 4, rngs=rngs)
            self.fc1 = nnx.Linear(4, 8, rngs=rngs)
            self.norm = nnx.LayerNorm(8, rngs=rngs)
            self.fc2 = nnx.Linear(8, 3, rngs=rngs)
            if dropout:
                self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, tokens):
            return self.fc2(jax.nn.relu(self.norm(self.fc1(self.embed(tokens)))))

    return nnx, Net


TOKENS = jnp.array([1, 2, 3, 9])
NNX_PATHS = ["embed.embedding", "fc1.bias", "fc1.kernel", "fc2.bias", "fc2.kernel", "norm.bias", "norm.scale"]


@functools.cache
def linen_mlp():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(8)(x))  # Dense_0: built first
            return nn.Dense(3)(x)  # Dense_1

    return MLP()


@functools.cache
def haiku_mlp():
    hk = pytest.importorskip("haiku")

    def forward(x):
        return hk.nets.MLP([8, 3], name="mlp")(hk.Linear(4, name="inp")(x))

    return hk.transform(forward)


def haiku_torch_style():
    hk = pytest.importorskip("haiku")

    def forward(x):
        x = jax.nn.relu(hk.Linear(8)(x))  # "linear"
        return hk.Linear(3)(x)  # "linear_1"

    return hk.transform(forward)


# ----------------------------------------------------------------------------
# Flax NNX


def test_nnx_param_state_saves_and_loads_into_a_fresh_model(tmp_path):
    nnx, Net = nnx_net()
    source, model = Net(nnx.Rngs(0)), Net(nnx.Rngs(1))
    params = nnx.state(source, nnx.Param)
    assert tg.save(tmp_path / "net.safetensors", params) == NNX_PATHS == tg.paths(params)
    assert differs(nnx.state(model, nnx.Param), params)  # the fresh model really is different

    state, report = tg.load(nnx.state(model, nnx.Param), tmp_path / "net.safetensors")
    assert isinstance(state, nnx.State)
    assert report.ok and report.counts["loaded"] == {"leaves": 7, "elements": 40 + 40 + 16 + 27}
    assert [(r.path, r.status, r.source) for r in report.rows] == [(p, "loaded", p) for p in NNX_PATHS]
    nnx.update(model, state)
    assert_bit_equal(nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(params))
    assert bits(model(TOKENS)) == bits(source(TOKENS))


def test_nnx_split_and_merge_round_trip(tmp_path):
    nnx, Net = nnx_net()
    source = Net(nnx.Rngs(0))
    tg.save(tmp_path / "net.safetensors", nnx.state(source, nnx.Param))
    graphdef, params, rest = nnx.split(Net(nnx.Rngs(1)), nnx.Param, ...)
    params, _ = tg.load(params, tmp_path / "net.safetensors")
    model = nnx.merge(graphdef, params, rest)
    assert bits(model(TOKENS)) == bits(source(TOKENS))


def test_nnx_module_loads_directly_and_trains_under_nnx_optimizer(tmp_path):
    optax = pytest.importorskip("optax")
    nnx, Net = nnx_net()
    source, fresh = Net(nnx.Rngs(0)), Net(nnx.Rngs(1))
    tg.save(tmp_path / "net.safetensors", nnx.state(source, nnx.Param))
    fresh_before = nnx.to_pure_dict(nnx.state(fresh, nnx.Param))

    model, report = tg.load(fresh, tmp_path / "net.safetensors")
    assert type(model) is Net and report.ok
    assert bits(model(TOKENS)) == bits(source(TOKENS))
    # A functional update, as everywhere in JAX: the module passed in is not changed.
    assert model is not fresh
    assert_bit_equal(nnx.to_pure_dict(nnx.state(fresh, nnx.Param)), fresh_before)

    # One SGD step on the loaded model is the step on the source model, bit for bit.
    @nnx.jit  # one compilation for both models (the same graph), instead of one per operation
    def train_step(m, optimizer):
        optimizer.update(m, nnx.grad(lambda m: jnp.mean(m(TOKENS) ** 2))(m))

    def step(m):
        train_step(m, nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param))
        return nnx.to_pure_dict(nnx.state(m, nnx.Param))

    reference = nnx.clone(source)
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    after = step(model)
    assert differs(after, before)  # the step moved the weights
    assert_bit_equal(after, step(reference))


def test_an_abstract_nnx_model_from_nnx_eval_shape_is_filled(tmp_path):
    """The NNX way to load a large model: build it abstractly, then fill every Param."""
    nnx, Net = nnx_net()
    source = Net(nnx.Rngs(0))
    tg.save(tmp_path / "net.safetensors", nnx.state(source, nnx.Param))
    abstract = nnx.eval_shape(lambda: Net(nnx.Rngs(1)))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    model, report = tg.load(abstract, tmp_path / "net.safetensors")
    assert report.ok
    assert_bit_equal(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(nnx.state(source, nnx.Param))
    )
    assert bits(model(TOKENS)) == bits(source(TOKENS))


def test_nnx_scanned_layers_load_from_a_list_of_blocks_and_back(tmp_path):
    nnx = pytest.importorskip("flax.nnx")

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return jax.nn.relu(self.fc(x))

    class Listed(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([Block(rngs) for _ in range(3)])

        def __call__(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    class Scanned(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)

            self.blocks = make(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            def run(block, x):
                return block(x)

            return run(self.blocks, x)

    scanned = Scanned(nnx.Rngs(0))
    names = tg.save(tmp_path / "s.safetensors", nnx.state(scanned, nnx.Param), stacked={"blocks": 1})
    assert names == [f"blocks.{i}.fc.{w}" for i in range(3) for w in ("bias", "kernel")]
    listed = Listed(nnx.Rngs(1))
    state, report = tg.load(nnx.state(listed, nnx.Param), tmp_path / "s.safetensors")
    assert report.ok
    nnx.update(listed, state)
    for i, block in enumerate(listed.blocks):
        assert_bit_equal(
            nnx.to_pure_dict(nnx.state(block, nnx.Param)),
            jax.tree.map(lambda x, i=i: x[i], nnx.to_pure_dict(nnx.state(scanned.blocks, nnx.Param))),
        )
    # A scan and an unrolled loop may round differently in XLA: the outputs agree to float precision.
    np.testing.assert_allclose(listed(X), scanned(X), rtol=1e-6, atol=1e-6)

    tg.save(tmp_path / "l.safetensors", nnx.state(listed, nnx.Param))
    again = Scanned(nnx.Rngs(2))
    state, report = tg.load(nnx.state(again, nnx.Param), tmp_path / "l.safetensors", stacked={"blocks": 1})
    assert report.counts["loaded"]["leaves"] == 6  # one row per layer
    nnx.update(again, state)
    assert_bit_equal(
        nnx.to_pure_dict(nnx.state(again, nnx.Param)), nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
    )


@pytest.mark.parametrize(
    "rename",
    [
        [("^params", ""), ("Dense_0", "fc0"), ("Dense_1", "fc1")],  # an empty replacement drops the segment
        [(r"re:^params\.", ""), ("Dense_{i}", "fc{i}")],
    ],
    ids=["glob", "regex-then-capture"],
)
def test_linen_params_load_into_an_nnx_module(rename):
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc0 = nnx.Linear(4, 8, rngs=rngs)
            self.fc1 = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc1(jax.nn.relu(self.fc0(x)))

    mlp = linen_mlp()
    params = mlp.init(jax.random.key(0), X)
    model, report = tg.load(Net(nnx.Rngs(1)), params, rename=rename)
    assert report.ok and report.counts["loaded"]["leaves"] == 4
    assert {r.path: r.source for r in report.rows} == {
        "fc0.bias": "params.Dense_0.bias",
        "fc0.kernel": "params.Dense_0.kernel",
        "fc1.bias": "params.Dense_1.bias",
        "fc1.kernel": "params.Dense_1.kernel",
    }
    assert bits(model(X)) == bits(mlp.apply(params, X))


def test_nnx_module_with_dropout_loads_directly(tmp_path):
    nnx, Net = nnx_net()
    source = Net(nnx.Rngs(0), dropout=True)
    tg.save(tmp_path / "net.safetensors", nnx.state(source, nnx.Param))
    model, report = tg.load(Net(nnx.Rngs(1), dropout=True), tmp_path / "net.safetensors")
    assert report.counts["loaded"]["leaves"] == 7
    assert bits(model(TOKENS)) == bits(source(TOKENS))
    # The RNG counter is random state, marked so by NNX (an RngCount): kept, not missing.
    (row,) = [r for r in report.rows if r.path == "drop.rngs.count"]
    assert (row.status, row.note) == ("skipped", "random state (RngState), kept")
    # Where the checkpoint has it, it loads like any leaf.
    tg.save(tmp_path / "all.safetensors", nnx.state(source, nnx.Any(nnx.Param, nnx.RngCount)))
    _, report = tg.load(Net(nnx.Rngs(1), dropout=True), tmp_path / "all.safetensors")
    assert report.counts["loaded"]["leaves"] == 8


def test_a_legacy_prng_key_in_a_plain_tree_is_named_with_the_two_ways_to_mark_it():
    # Nothing tells jax.random.PRNGKey's uint32 pair from data: it stays missing, with a note.
    model = {"w": np.zeros(2, np.float32), "key": jax.random.PRNGKey(0)}
    report = tg.load_plan(model, {"w": np.ones(2, np.float32)})
    (row,) = [r for r in report.rows if r.path == "key"]
    assert (row.status, row.note) == (
        "missing",
        "a jax.random.PRNGKey? skip it, or hold jax.random.key(...), which load leaves alone",
    )
    with pytest.raises(
        tg.LoadError,
        match=r"1 model leaf has no checkpoint tensor:\n  key uint32\(2,\)  \(a jax.random.PRNGKey\? skip it",
    ):
        tg.load(model, {"w": np.ones(2, np.float32)})
    # A typed key is not a parameter: left alone.
    typed = {"w": np.zeros(2, np.float32), "key": jax.random.key(0)}
    loaded, report = tg.load(typed, {"w": np.ones(2, np.float32)})
    assert report.ok and loaded["key"] is typed["key"]


def test_nnx_module_with_dropout_loads_through_its_param_state(tmp_path):
    """The usual way: nnx.state(model, nnx.Param) holds no RNG state."""
    nnx, Net = nnx_net()
    source, model = Net(nnx.Rngs(0), dropout=True), Net(nnx.Rngs(1), dropout=True)
    tg.save(tmp_path / "net.safetensors", nnx.state(source, nnx.Param))
    state, _ = tg.load(nnx.state(model, nnx.Param), tmp_path / "net.safetensors")
    nnx.update(model, state)
    assert bits(model(TOKENS)) == bits(source(TOKENS))


def test_saving_a_state_with_rng_keys_names_the_key_or_leaves_it_out(tmp_path):
    nnx, Net = nnx_net()
    state = nnx.state(Net(nnx.Rngs(0), dropout=True))
    try:
        names = tg.save(tmp_path / "all.safetensors", state)
    except TypeError as exc:
        assert re.search(r"drop\.rngs\.key", str(exc)), str(exc)
    else:
        assert "drop.rngs.key" not in names and set(NNX_PATHS) <= set(names)


# ----------------------------------------------------------------------------
# Flax Linen


def test_linen_params_round_trip(tmp_path):
    mlp = linen_mlp()
    params, fresh = mlp.init(jax.random.key(0), X), mlp.init(jax.random.key(1), X)
    names = tg.save(tmp_path / "p.safetensors", params)
    assert names == [
        "params.Dense_0.bias",
        "params.Dense_0.kernel",
        "params.Dense_1.bias",
        "params.Dense_1.kernel",
    ]
    loaded, report = tg.load(fresh, tmp_path / "p.safetensors")
    assert type(loaded) is type(fresh) and report.ok
    assert_bit_equal(loaded, params)
    assert bits(mlp.apply(loaded, X)) == bits(mlp.apply(params, X))


def test_linen_frozen_dict_params_stay_frozen(tmp_path):
    core = pytest.importorskip("flax.core")
    params = core.freeze(linen_mlp().init(jax.random.key(0), X))
    tg.save(tmp_path / "p.safetensors", params)
    loaded, _ = tg.load(core.freeze(linen_mlp().init(jax.random.key(1), X)), tmp_path / "p.safetensors")
    assert isinstance(loaded, core.FrozenDict)
    assert_bit_equal(loaded, params)


TORCH_TO_LINEN = [("layers.0", "params.Dense_0"), ("layers.2", "params.Dense_1"), ("weight$", "kernel")]


@pytest.mark.parametrize(
    "rules",
    [
        dict(rename=TORCH_TO_LINEN, transform=[("*.kernel", "transpose")]),
        dict(rename=dict(TORCH_TO_LINEN), transform={"kernel": lambda w: w.T}),
        dict(
            rename=[
                (r"re:^layers\.0\.", "params.Dense_0."),
                (r"re:^layers\.2", "params.Dense_1"),
                ("re:weight", "kernel"),
            ],
            transform=[(r"re:.*\.kernel", lambda w: np.transpose(w))],  # a selector regex: the whole path
        ),
        # In order: rule 1 sees what rule 0 made of each name.
        dict(
            rename=[
                ("layers.{i}", "params.L{i}"),
                ("L0", "Dense_0"),
                ("L2", "Dense_1"),
                ("{m}.weight", "{m}.kernel"),
            ],
            transform=[("*.kernel", "transpose")],
        ),
        tg.load_transfer({"rename": dict(TORCH_TO_LINEN), "transform": {"*.kernel": "transpose"}})._asdict(),
    ],
    ids=["glob", "dict-and-function", "regex", "chained-captures", "load_transfer"],
)
def test_pytorch_state_dict_into_linen(tmp_path, rules):
    from safetensors.numpy import save_file

    sd = torch_mlp()
    save_file(sd, str(tmp_path / "torch.safetensors"))
    mlp = linen_mlp()
    params = mlp.init(jax.random.key(1), X)

    plan = tg.load_plan(params, tmp_path / "torch.safetensors", **rules)
    assert [(r.path, r.source, r.transform is not None) for r in plan.rows] == [
        ("params.Dense_0.bias", "layers.0.bias", False),
        ("params.Dense_0.kernel", "layers.0.weight", True),
        ("params.Dense_1.bias", "layers.2.bias", False),
        ("params.Dense_1.kernel", "layers.2.weight", True),
    ]
    assert plan.counts["transformed"] == {"leaves": 2, "elements": 56}

    loaded, report = tg.load(params, tmp_path / "torch.safetensors", **rules)
    assert report == plan
    assert_bit_equal(
        loaded,
        {
            "params": {
                f"Dense_{k}": {"bias": sd[f"layers.{i}.bias"], "kernel": sd[f"layers.{i}.weight"].T}
                for k, i in ((0, 0), (1, 2))
            }
        },
    )
    np.testing.assert_allclose(mlp.apply(loaded, X), torch_forward(sd, X), rtol=1e-5, atol=1e-6)


def test_pytorch_names_without_transpose_are_a_listed_mismatch(tmp_path):
    with pytest.raises(
        tg.LoadError,
        match=r"2 tensors do not fit their model leaf:\n"
        r"  params\.Dense_0\.kernel float32\(4, 8\) <- layers\.0\.weight gives float32\(8, 4\)\n"
        r"  params\.Dense_1\.kernel float32\(8, 3\) <- layers\.2\.weight gives float32\(3, 8\)\n"
        r"Add a transform",
    ):
        tg.load(linen_mlp().init(jax.random.key(0), X), torch_mlp(), rename=TORCH_TO_LINEN)


@pytest.mark.parametrize(
    "argument, pattern, matches",
    [
        ("rename", "re:weight$", True),  # a rename regex replaces its first match (re.search)
        ("transform", "re:kernel$", False),  # a selector regex matches the whole path (re.fullmatch)
        ("transform", r"re:.*\.kernel", True),
        ("skip", "re:kernel", False),
        ("skip", r"re:params\.Dense_0\.kernel", True),
        ("ignore", "re:weight", False),
        ("ignore", r"re:layers\.0\.weight", True),
    ],
)
def test_a_regex_renames_by_search_but_selects_by_fullmatch(argument, pattern, matches):
    params = linen_mlp().init(jax.random.key(0), X)
    rules = dict(rename=TORCH_TO_LINEN, transform=[("*.kernel", "transpose")], allow_unused=True)
    if argument == "rename":
        rules["rename"] = TORCH_TO_LINEN[:2] + [(pattern, "kernel")]
    elif argument == "transform":
        rules["transform"] = [(pattern, "transpose")]
    else:
        rules[argument] = [pattern]
    if matches:
        assert tg.load_plan(params, torch_mlp(), **rules).counts["loaded"]["leaves"] >= 3
    else:
        with pytest.raises(tg.NoMatchError, match=rf"regex\('{re.escape(pattern[3:])}'\) matches no leaf"):
            tg.load_plan(params, torch_mlp(), **rules)


@pytest.mark.parametrize(
    "rules, message",
    [
        (
            dict(skip=["layers.0"]),
            r"The skip list given to load_plan\(\) glob\('layers\.0'\) matches no leaf",
        ),
        (
            dict(ignore=["params.Dense_0"]),
            r"The ignore list given to load_plan\(\) glob\('params\.Dense_0'\) matches no",
        ),
    ],
)
def test_skip_names_model_paths_and_ignore_names_checkpoint_tensors(rules, message):
    params = linen_mlp().init(jax.random.key(0), X)
    kwargs = dict(rename=TORCH_TO_LINEN, transform=[("*.kernel", "transpose")])
    with pytest.raises(tg.NoMatchError, match=message):
        tg.load_plan(params, torch_mlp(), **kwargs, **rules)


def test_a_transform_that_matches_nothing_says_transform():
    params = linen_mlp().init(jax.random.key(0), X)
    with pytest.raises(tg.NoMatchError, match=r"transform.*glob\('\*\.weight'\) matches no leaf") as info:
        tg.load_plan(params, torch_mlp(), rename=TORCH_TO_LINEN, transform=[("*.weight", "transpose")])
    assert "label" not in str(info.value)


def test_the_first_matching_transform_wins():
    model = {"a": {"kernel": jnp.zeros((2, 3))}, "b": {"kernel": jnp.zeros((2, 3))}}
    source = {
        "a.kernel": np.arange(6, dtype=np.float32).reshape(3, 2),
        "b.kernel": np.ones((3, 2), np.float32),
    }
    loaded, report = tg.load(
        model, source, transform=[("a.kernel", lambda x: x.T * 2), ("*.kernel", "transpose")]
    )
    assert [r.transform for r in report.rows] == ["<lambda>", "transpose"]
    assert bits(loaded["a"]["kernel"]) == bits(source["a.kernel"].T * 2)
    assert bits(loaded["b"]["kernel"]) == bits(source["b.kernel"].T)


def test_a_shadowed_transform_warning_speaks_of_transforms():
    model = {"a": {"kernel": jnp.zeros((2, 3))}, "b": {"kernel": jnp.zeros((2, 3))}}
    source = {"a.kernel": np.ones((3, 2), np.float32), "b.kernel": np.ones((3, 2), np.float32)}
    with pytest.warns(tg.ShadowedRuleWarning, match=r"transform") as record:
        tg.load_plan(model, source, transform=[("*.kernel", "transpose"), ("a.kernel", lambda x: x.T * 2)])
    assert not any("label" in str(w.message) for w in record)


def test_a_transform_regex_that_matches_only_by_search_says_fullmatch():
    params = linen_mlp().init(jax.random.key(0), X)
    with pytest.raises(tg.NoMatchError, match=r"fullmatch|whole (dotted )?path|'re:\.\*kernel\$'"):
        tg.load_plan(params, torch_mlp(), rename=TORCH_TO_LINEN, transform=[("re:kernel$", "transpose")])


def test_fused_qkv_fans_out_to_three_linen_dense_layers():
    nn = pytest.importorskip("flax.linen")

    class QKV(nn.Module):
        @nn.compact
        def __call__(self, x):
            return [nn.Dense(4, name=n)(x) for n in ("query", "key", "value")]

    rng = np.random.default_rng(3)
    fused = {"attn.in_proj_weight": rng.standard_normal((12, 4)).astype(np.float32)}
    fused["attn.in_proj_bias"] = rng.standard_normal(12).astype(np.float32)

    def part(k, transpose):
        def take(w):
            w = w[4 * k : 4 * (k + 1)]
            return w.T if transpose else w

        take.__name__ = f"part({k})"
        return take

    rules = dict(
        rename=[
            ("attn.in_proj_{w}", ("params.query.{w}", "params.key.{w}", "params.value.{w}")),
            ("weight", "kernel"),
        ],
        transform=[
            (f"{name}.{w}", part(k, w == "kernel"))
            for k, name in enumerate(("query", "key", "value"))
            for w in ("kernel", "bias")
        ],
    )
    params = QKV().init(jax.random.key(0), X)
    loaded, report = tg.load(params, fused, **rules)
    assert {r.path: (r.source, r.transform) for r in report.rows} == {
        f"params.{n}.{w}": (f"attn.in_proj_{'weight' if w == 'kernel' else 'bias'}", f"part({k})")
        for k, n in enumerate(("query", "key", "value"))
        for w in ("bias", "kernel")
    }
    q, k, v = QKV().apply(loaded, X)
    for out, i in ((q, 0), (k, 1), (v, 2)):
        w, b = fused["attn.in_proj_weight"][4 * i : 4 * i + 4], fused["attn.in_proj_bias"][4 * i : 4 * i + 4]
        np.testing.assert_allclose(out, np.asarray(X) @ w.T + b, rtol=1e-5, atol=1e-6)
    assert bits(loaded["params"]["key"]["kernel"]) == bits(fused["attn.in_proj_weight"][4:8].T)


@pytest.mark.parametrize(
    "model_dtype, source_dtype, transform",
    [
        (jnp.float32, np.float16, "float32"),
        (jnp.bfloat16, np.float32, "bfloat16"),
        (jnp.float16, np.float32, lambda w: w.astype(np.float16)),
    ],
)
def test_dtype_casts(model_dtype, source_dtype, transform):
    params = {"params": {"Dense_0": {"kernel": jnp.zeros((2, 3), model_dtype)}}}
    source = {
        "params.Dense_0.kernel": (np.arange(6, dtype=np.float32).reshape(2, 3) / 3).astype(source_dtype)
    }
    with pytest.raises(
        tg.LoadError, match=rf"<- params\.Dense_0\.kernel gives {np.dtype(source_dtype)}\(2, 3\)"
    ):
        tg.load(params, source)
    loaded, report = tg.load(params, source, transform=[("kernel", transform)])
    assert report.rows[0].source_dtype == str(np.dtype(source_dtype))
    assert bits(loaded["params"]["Dense_0"]["kernel"]) == bits(
        source["params.Dense_0.kernel"].astype(jnp.dtype(model_dtype))
    )


NUMPY_FUNCTION_TRANSFORM = """
import operator, jax.numpy as jnp, numpy as np, treeglob as tg
model = {"a": jnp.zeros((4, 8)), "b": jnp.zeros((2, 3))}
source = {"a": np.ones((8, 4), np.float32), "b": np.ones((3, 2), np.float32)}
fn = FN
loaded, report = tg.load(model, source, transform=[("*", fn)])
assert report.counts["transformed"]["leaves"] == 2, report
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("fn", ["np.transpose", "operator.methodcaller('transpose')"])
def test_numpy_functions_as_transforms_on_two_leaves(fn):
    result = subprocess.run(
        [sys.executable, "-c", NUMPY_FUNCTION_TRANSFORM.replace("FN", fn)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr[-2000:]


# ----------------------------------------------------------------------------
# Haiku


def test_haiku_params_round_trip(tmp_path):
    f = haiku_mlp()
    params, fresh = f.init(jax.random.key(0), X), f.init(jax.random.key(1), X)
    assert list(params) == ["inp", "mlp/~/linear_0", "mlp/~/linear_1"]
    names = tg.save(tmp_path / "h.safetensors", params)
    assert (
        names
        == tg.paths(params)
        == [
            "inp.b",
            "inp.w",
            "mlp.~.linear_0.b",
            "mlp.~.linear_0.w",
            "mlp.~.linear_1.b",
            "mlp.~.linear_1.w",
        ]
    )
    loaded, report = tg.load(fresh, tmp_path / "h.safetensors")
    assert report.ok and list(loaded) == list(params)
    assert_bit_equal(loaded, params)
    assert bits(f.apply(loaded, None, X)) == bits(f.apply(params, None, X))


def haiku_flat(params):
    return {f"{m.replace('/', '.')}.{n}": v for m in params for n, v in params[m].items()}


@pytest.mark.parametrize(
    "skip, skipped",
    [
        ("mlp.~.linear_0", {"mlp.~.linear_0.b", "mlp.~.linear_0.w"}),
        ("linear_0", {"mlp.~.linear_0.b", "mlp.~.linear_0.w"}),
        ("mlp", {"mlp.~.linear_0.b", "mlp.~.linear_0.w", "mlp.~.linear_1.b", "mlp.~.linear_1.w"}),
        ("inp.w", {"inp.w"}),
        (["inp", "*.linear_1.b"], {"inp.b", "inp.w", "mlp.~.linear_1.b"}),
        ("~.*.w", {"mlp.~.linear_0.w", "mlp.~.linear_1.w"}),
    ],
)
def test_haiku_skip_keeps_initial_values(tmp_path, skip, skipped):
    f = haiku_mlp()
    params, fresh = f.init(jax.random.key(0), X), f.init(jax.random.key(1), X)
    tg.save(tmp_path / "h.safetensors", params)
    loaded, report = tg.load(fresh, tmp_path / "h.safetensors", skip=skip)
    assert {r.path for r in report.rows if r.status == "skipped"} == skipped
    want, fresh, params = haiku_flat(loaded), haiku_flat(fresh), haiku_flat(params)
    assert {p: bits(v) for p, v in want.items()} == {
        p: bits(fresh[p] if p in skipped else params[p]) for p in params
    }


def test_haiku_module_renamed(tmp_path):
    """A checkpoint of one Haiku model into another whose MLP is named differently."""
    f = haiku_mlp()
    params = f.init(jax.random.key(0), X)
    np.savez(tmp_path / "h.npz", **{f"{m}/{n}": np.asarray(v) for m in params for n, v in params[m].items()})
    renamed = {m.replace("mlp", "decoder"): v for m, v in params.items()}
    loaded, report = tg.load(
        jax.tree.map(jnp.zeros_like, renamed), tmp_path / "h.npz", rename=[("mlp", "decoder")]
    )
    assert report.ok and "decoder/~/linear_1" in loaded
    assert_bit_equal(loaded, renamed)


def test_haiku_slash_pattern_error_points_to_the_dotted_path():
    params = haiku_mlp().init(jax.random.key(0), X)
    with pytest.raises(tg.NoMatchError, match=r"mlp\.~\.linear_0"):
        tg.load(params, params, skip=["mlp/~/linear_0"])


# ----------------------------------------------------------------------------
# orbax checkpoint directories


def test_orbax_checkpoint_into_linen_params(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    mlp = linen_mlp()
    params = mlp.init(jax.random.key(0), X)
    ocp.PyTreeCheckpointer().save(tmp_path / "ckpt", {"model": params, "step": np.int32(7)})
    fresh = mlp.init(jax.random.key(1), X)
    loaded, report = tg.load(fresh, tmp_path / "ckpt", rename=[("^model", "")], ignore=["step"])
    assert [(r.status, r.source) for r in report.rows if r.path is None] == [("ignored", "step")]
    assert_bit_equal(loaded, params)
    assert bits(mlp.apply(loaded, X)) == bits(mlp.apply(params, X))


def test_orbax_plan_reads_metadata_only_and_load_reads_one_tensor_per_restore(tmp_path, monkeypatch):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = linen_mlp().init(jax.random.key(0), X)
    ocp.PyTreeCheckpointer().save(tmp_path / "ckpt", params)
    restore = ocp.PyTreeCheckpointer.restore
    calls = []

    def no_restore(self, *args, **kwargs):
        raise AssertionError("load_plan read tensor data")

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", no_restore)
    abstract = jax.eval_shape(lambda: params)
    plan = tg.load_plan(abstract, tmp_path / "ckpt")
    assert plan.ok and plan.counts["loaded"] == {"leaves": 4, "elements": 8 + 32 + 3 + 24}
    assert {r.path: (r.source_shape, r.source_dtype) for r in plan.rows}["params.Dense_0.kernel"] == (
        (4, 8),
        "float32",
    )

    def counting(self, *args, **kwargs):
        calls.append(1)
        return restore(self, *args, **kwargs)

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", counting)
    loaded, report = tg.load(abstract, tmp_path / "ckpt")
    assert report == plan and len(calls) == 4
    assert_bit_equal(loaded, params)


def test_orbax_checkpoint_of_an_nnx_state_loads_back_into_it(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    nnx, Net = nnx_net()
    source, model = Net(nnx.Rngs(0)), Net(nnx.Rngs(1))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", nnx.state(source, nnx.Param))
    checkpointer.wait_until_finished()
    state, _ = tg.load(nnx.state(model, nnx.Param), tmp_path / "state")
    nnx.update(model, state)
    assert bits(model(TOKENS)) == bits(source(TOKENS))


@pytest.mark.parametrize("where", ["empty", "manager", "manager/1"])
def test_a_directory_that_is_no_orbax_checkpoint_is_refused(tmp_path, where):
    ocp = pytest.importorskip("orbax.checkpoint")
    (tmp_path / "empty").mkdir()
    params = {"w": np.arange(3, dtype=np.float32)}
    with ocp.CheckpointManager(tmp_path / "manager") as manager:
        manager.save(1, args=ocp.args.StandardSave(params))
        manager.wait_until_finished()
    with pytest.raises(ValueError, match=r"not a readable orbax checkpoint.*(pass STEP/ITEM|FileNotFound)"):
        tg.load_plan(params, tmp_path / where)


def test_orbax_checkpoint_manager_item_directory_loads(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = {"w": np.arange(3, dtype=np.float32), "b": np.asarray(2.5, np.float32)}
    with ocp.CheckpointManager(tmp_path / "manager") as manager:
        manager.save(1, args=ocp.args.StandardSave(params))
        manager.wait_until_finished()
    loaded, report = tg.load(jax.tree.map(np.zeros_like, params), tmp_path / "manager" / "1" / "default")
    assert report.ok
    assert_bit_equal(loaded, params)


# ----------------------------------------------------------------------------
# .npz files


@pytest.mark.parametrize("savez", [np.savez, np.savez_compressed], ids=["savez", "savez_compressed"])
def test_npz_with_slash_names_into_linen_params(tmp_path, savez):
    mlp = linen_mlp()
    params = mlp.init(jax.random.key(0), X)
    flat = {
        f"params/{layer}/{name}": np.asarray(v)
        for layer, d in params["params"].items()
        for name, v in d.items()
    }
    savez(tmp_path / "p.npz", **flat)
    loaded, report = tg.load(mlp.init(jax.random.key(1), X), tmp_path / "p.npz")
    assert [r.source for r in report.rows] == [k.replace("/", ".") for k in sorted(flat)]
    assert_bit_equal(loaded, params)


def test_npz_positional_arrays_need_a_rename(tmp_path):
    np.savez(tmp_path / "a.npz", np.arange(3.0), np.ones(2))
    model = {"w": np.zeros(3), "b": np.zeros(2)}
    with pytest.raises(
        tg.LoadError,
        match=r"2 model leaves have no checkpoint tensor:\n  b float64\(2,\)\n  w float64\(3,\)\n.*\n"
        r"2 checkpoint tensors are used by no model leaf:\n  arr_0 float64\(3,\)\n  arr_1 float64\(2,\)",
    ):
        tg.load(model, tmp_path / "a.npz")
    loaded, _ = tg.load(model, tmp_path / "a.npz", rename=[("arr_0", "w"), ("arr_1", "b")])
    assert bits(loaded["w"]) == bits(np.arange(3.0)) and bits(loaded["b"]) == bits(np.ones(2))


def test_npz_bfloat16_is_raw_bytes_that_a_view_restores(tmp_path):
    """NumPy writes ml_dtypes' bfloat16 as the raw type |V2: a plain load is a mismatch."""
    values = np.array([1.5, -2.25, 3.0], jnp.bfloat16)
    np.savez(tmp_path / "bf.npz", w=values)
    model = {"w": jnp.zeros(3, jnp.bfloat16)}
    with pytest.raises(tg.LoadError, match=r"w bfloat16\(3,\) <- w gives \|V2\(3,\)"):
        tg.load(model, tmp_path / "bf.npz")
    loaded, _ = tg.load(model, tmp_path / "bf.npz", transform=[("w", lambda x: x.view(jnp.bfloat16))])
    assert bits(loaded["w"]) == bits(values)


def test_a_transform_that_fails_when_loading_names_the_tensor(tmp_path):
    np.savez(tmp_path / "bf.npz", w=np.array([1.5, -2.25, 3.0], jnp.bfloat16))
    model = {"w": jnp.zeros(3, jnp.bfloat16)}
    with pytest.raises(ValueError, match=r"'w'.*astype\(bfloat16\)|astype\(bfloat16\).*'w'"):
        tg.load(model, tmp_path / "bf.npz", transform=[("w", "bfloat16")])


# ----------------------------------------------------------------------------
# The load-plan command on a file.py:function factory

NETS = """
import haiku as hk
import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import nnx


class Net(nnx.Module):
    def __init__(self, rngs, dropout=False):
        self.fc1 = nnx.Linear(4, 8, rngs=rngs)
        self.fc2 = nnx.Linear(8, 3, rngs=rngs)
        if dropout:
            self.drop = nnx.Dropout(0.5, rngs=rngs)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8)(x))  # Dense_0: Linen names modules as they are built
        return nn.Dense(3)(x)


def nnx_net():
    return Net(nnx.Rngs(0))


def nnx_dropout():
    return Net(nnx.Rngs(0), dropout=True)


def linen():
    return MLP().init(jax.random.key(0), jnp.zeros((1, 4)))


def haiku():
    def forward(x):
        x = jax.nn.relu(hk.Linear(8)(x))  # "linear": Haiku names modules as they are built
        return hk.Linear(3)(x)  # "linear_1"

    return hk.transform(forward).init(jax.random.key(0), jnp.zeros((1, 4)))


def broken():
    raise RuntimeError("no GPU here")


def nothing():
    return {"depth": 3}
"""

# The same PyTorch state dict into each framework: rules as the TOML file a user writes.
RULES = {
    "nnx_net": """
        ignore = ["num_batches"]
        [rename]
        "layers.0" = "fc1"
        "layers.2" = "fc2"
        "weight$" = "kernel"
        [transform]
        "*.kernel" = "transpose"
    """,
    "linen": """
        ignore = "num_batches"
        [rename]
        "layers.0" = "params.Dense_0"
        "layers.2" = "params.Dense_1"
        "weight$" = "kernel"
        [transform]
        "kernel" = "transpose"
    """,
    "haiku": """
        ignore = ["num_*"]
        rename = [["layers.0", "linear"], ["layers.2", "linear_1"], ["weight", "w"], ["bias", "b"]]
        [transform]
        "*.w" = "transpose"
    """,
}


PYPROJECT = """
[tool.treeglob.transfer]
ignore = ["num_batches"]
rename = [["layers.0", "fc1"], ["layers.2", "fc2"], ["weight$", "kernel"]]
transform = {"*.kernel" = "transpose"}
"""


@pytest.fixture
def files(tmp_path, monkeypatch):
    pytest.importorskip("flax.nnx")
    pytest.importorskip("haiku")
    from safetensors.numpy import save_file

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # importing the factory file prepends tmp_path
    (tmp_path / "nets.py").write_text(NETS)
    save_file({**torch_mlp(), "num_batches": np.array(5, np.int64)}, "torch.safetensors")
    for name, text in RULES.items():
        (tmp_path / f"{name}.toml").write_text(textwrap.dedent(text))
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / "typo.toml").write_text('[renames]\n"layers.0" = "fc1"\n')
    return tmp_path


def cli(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("framework", ["nnx_net", "linen", "haiku"])
def test_load_plan_rules_file_per_framework_and_the_same_rules_load(files, capsys, framework):
    status, out, err = cli(
        capsys, "load-plan", f"nets.py:{framework}", "torch.safetensors", "--rules", f"{framework}.toml"
    )
    assert (status, err) == (0, "")
    assert re.search(r"loaded +4 leaves +67 elements\n", out)
    assert re.search(r"ignored +1 tensor +1 elements?\n", out)
    assert re.search(r"transformed +2 leaves +56 elements", out)

    # The API with the same file: the plan the command printed, and the values exact.
    rules = tg.load_transfer(files / f"{framework}.toml")
    factory = {"nnx_net": None, "linen": linen_mlp, "haiku": haiku_torch_style}[framework]
    if factory is None:
        nnx = pytest.importorskip("flax.nnx")

        class Net(nnx.Module):
            def __init__(self, rngs):
                self.fc1 = nnx.Linear(4, 8, rngs=rngs)
                self.fc2 = nnx.Linear(8, 3, rngs=rngs)

            def __call__(self, x):
                return self.fc2(jax.nn.relu(self.fc1(x)))

        model, apply = Net(nnx.Rngs(1)), lambda m, x: m(x)
    elif framework == "linen":
        model, apply = factory().init(jax.random.key(1), X), factory().apply
    else:
        f = factory()
        model, apply = f.init(jax.random.key(1), X), lambda p, x: f.apply(p, None, x)
    loaded, report = tg.load(model, files / "torch.safetensors", **rules._asdict())
    assert str(report) == out.rstrip("\n")
    sd = torch_mlp()
    kernels = [leaf for leaf in jax.tree.leaves(loaded) if np.ndim(leaf) == 2]
    assert sorted(bits(k) for k in kernels) == sorted(bits(sd[f"layers.{i}.weight"].T) for i in (0, 2))
    np.testing.assert_allclose(apply(loaded, X), torch_forward(sd, X), rtol=1e-5, atol=1e-6)


def test_load_plan_command_line_rules_equal_the_rules_file(files, capsys):
    argv = ["load-plan", "nets.py:nnx_net", "torch.safetensors"]
    flags = ["--rename", "layers.0=fc1", "--rename", "layers.2=fc2", "--rename", "weight$=kernel"]
    flags += ["--transform", "*.kernel=transpose", "--ignore", "num_batches"]
    assert cli(capsys, *argv, *flags) == cli(capsys, *argv, "--rules", "nnx_net.toml")
    assert cli(capsys, *argv, *flags) == cli(
        capsys, *argv, "--rules", "pyproject.toml", "--key", "tool.treeglob.transfer"
    )


RULES_ARGS = ["--rules", "nnx_net.toml"]


@pytest.mark.parametrize(
    "args, status, out, err",
    [
        (
            [],
            1,
            r"fc1\.bias +missing +- +\(8,\) +float32",
            r"treeglob load-plan: load_plan\(\) from torch\.safetensors: "
            r"4 model leaves have no checkpoint tensor:\n  fc1\.bias float32\(8,\)\n.*\n"
            r"5 checkpoint tensors are used by no model leaf:\n  layers\.0\.bias float32\(8,\)",
        ),
        (["--allow-missing", "--allow-unused"], 0, r"missing +4 leaves +67 elements\n", r"^$"),
        (
            RULES_ARGS,
            0,
            r"fc1\.kernel +loaded +<- layers\.0\.weight +\(4, 8\) +float32 +via transpose",
            r"^$",
        ),
        (
            RULES_ARGS + ["--skip", "fc2.bias"],
            0,
            r"fc2\.bias +skipped +<- layers\.2\.bias +\(3,\) +float32 +skip",
            r"^$",
        ),
        (
            [
                "--rename",
                "layers.0=fc1",
                "--rename",
                "layers.2=fc2",
                "--rename",
                "weight$=kernel",
                "--ignore",
                "num_*",
            ],
            1,
            r"fc1\.kernel +mismatch",
            r"2 tensors do not fit their model leaf:\n"
            r"  fc1\.kernel float32\(4, 8\) <- layers\.0\.weight gives float32\(8, 4\)",
        ),
        (
            ["--rename", "layer.0=fc1"],
            1,
            r"^$",
            r"rename rule 0 \('layer\.0' -> 'fc1'\) matches no checkpoint name "
            r"\(5 names, after the rules before it\)\. Close matches: layers\.0",
        ),
        (
            RULES_ARGS + ["--skip", "fc3"],
            1,
            r"^$",
            r"The skip list given to load_plan\(\) glob\('fc3'\) matches no leaf",
        ),
        (RULES_ARGS + ["--skip", "fc3", "--no-strict"], 0, r"loaded +4 leaves", r"^$"),
        (
            RULES_ARGS + ["--transform", "*.bias=float8"],
            2,
            r"^$",
            r"transform\[0\]: unknown transform 'float8'",
        ),
        (["--rename", "layers.0"], 2, r"^$", r"--rename 'layers\.0': write FROM=TO"),
        (["--transform", "*.kernel"], 2, r"^$", r"--transform '\*\.kernel': write PATTERN=NAME"),
        (["--skip", "[fc1"], 2, r"^$", r"Invalid pattern '\[fc1' at position 0: unbalanced '\['"),
        (["--stacked", "blocks"], 2, r"^$", r"--stacked 'blocks': write PATH=AXES"),
        (["--key", "tool"], 2, r"^$", r"--key needs --rules FILE"),
        (["--rules", "typo.toml"], 2, r"^$", r"typo\.toml: unknown key 'renames'\. Did you mean 'rename'\?"),
        (["--rules", "nowhere.toml"], 2, r"^$", r"nowhere\.toml: no such rules file"),
        (
            ["--rules", "pyproject.toml", "--key", "tool.other"],
            2,
            r"^$",
            r"no table 'tool\.other' \(missing 'other'\)",
        ),
    ],
)
def test_load_plan_exit_statuses_and_messages(files, capsys, args, status, out, err):
    got = cli(capsys, "load-plan", "nets.py:nnx_net", "torch.safetensors", *args)
    assert got[0] == status, got
    assert re.search(out, got[1]), got[1]
    assert re.search(err, got[2], re.S), got[2]


@pytest.mark.parametrize(
    "argv, err",
    [
        (
            ["nets.py:broken", "torch.safetensors"],
            r"nets\.py:broken: calling broken\(\) failed: RuntimeError: no GPU here",
        ),
        (["nets.py:absent", "torch.safetensors"], r"nets\.py:absent: nets\.py has no function 'absent'"),
        (
            ["nets.py:nothing", "torch.safetensors"],
            r"nothing\(\) returned dict \{'depth': 3\}, which holds no array",
        ),
        (["none.py:build", "torch.safetensors"], r"none\.py:build: no such file 'none\.py'"),
        (
            ["nets.py", "torch.safetensors"],
            r"nets\.py: not a \.safetensors, \.npz or \.safetensors\.index\.json file, a directory of \.safetensors shards, or an orbax checkpoint",
        ),
        (["nets.py:nnx_net", "none.safetensors"], r"none\.safetensors: no such file or directory"),
        (
            ["nets.py:nnx_net", "nets.py"],
            r"treeglob reads a \.safetensors, \.npz or \.safetensors\.index\.json file, a directory of \.safetensors shards, or an orbax checkpoint directory, not \.py",
        ),
        (
            ["nets.py:nnx_net", "torch.safetensors", "--variables", "Parm"],
            r"'Parm' is not a Flax NNX Variable type",
        ),
    ],
)
def test_load_plan_bad_input_is_status_2(files, capsys, argv, err):
    status, out, got = cli(capsys, "load-plan", *argv)
    assert (status, out) == (2, "")
    assert got.startswith("treeglob load-plan: ") and re.search(err, got), got


def test_load_plan_json(files, capsys):
    status, out, err = cli(
        capsys, "load-plan", "nets.py:nnx_net", "torch.safetensors", "--rules", "nnx_net.toml", "--json"
    )
    assert (status, err) == (0, "")
    data = json.loads(out)
    assert (data["source"], data["model"], data["ok"]) == ("torch.safetensors", "nets.py:nnx_net", True)
    assert data["counts"]["loaded"] == {"leaves": 4, "elements": 67}
    assert data["counts"]["ignored"] == {"leaves": 1, "elements": 1}
    assert data["rows"][1] == {
        "status": "loaded",
        "path": "fc1.kernel",
        "source": "layers.0.weight",
        "shape": [4, 8],
        "dtype": "float32",
        "source_shape": [8, 4],
        "source_dtype": "float32",
        "transform": "transpose",
        "note": "",
    }
    assert data["rows"][-1] == {
        "status": "ignored",
        "path": None,
        "source": "num_batches",
        "shape": None,
        "dtype": None,
        "source_shape": [],
        "source_dtype": "int64",
        "transform": None,
        "note": "",
    }

    # A plan that does not fit: status 1, the JSON says why, nothing on stderr.
    status, out, err = cli(capsys, "load-plan", "nets.py:nnx_net", "torch.safetensors", "--json")
    data = json.loads(out)
    assert (status, err, data["ok"]) == (1, "", False)
    assert [r["status"] for r in data["rows"]] == ["missing"] * 4 + ["unused"] * 5

    # Bad input: status 2, the error as JSON.
    status, out, err = cli(capsys, "load-plan", "nets.py:broken", "torch.safetensors", "--json")
    assert (status, err) == (2, "")
    assert json.loads(out) == {
        "source": "torch.safetensors",
        "error": {
            "kind": "SourceError",
            "message": "nets.py:broken: calling broken() failed: RuntimeError: no GPU here",
        },
    }


def test_load_plan_with_a_checkpoint_as_the_model(files, capsys, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = linen_mlp().init(jax.random.key(0), X)
    ocp.PyTreeCheckpointer().save(tmp_path / "ckpt", params)
    tg.save("linen.safetensors", params)
    status, out, err = cli(capsys, "load-plan", "ckpt", "linen.safetensors")
    assert (status, err) == (0, "")
    assert re.search(r"params\.Dense_1\.kernel +loaded += params\.Dense_1\.kernel +\(8, 3\) +float32", out)
    status, out, _ = cli(capsys, "load-plan", "linen.safetensors", "ckpt", "--json")
    assert status == 0 and json.loads(out)["counts"]["loaded"]["leaves"] == 4


def test_load_plan_all_variables_of_an_nnx_model_with_dropout(files, capsys):
    args = ["--rules", "nnx_net.toml", "--variables", "all"]
    status, out, err = cli(capsys, "load-plan", "nets.py:nnx_dropout", "torch.safetensors", *args)
    assert (status, err) == (0, "")
    assert re.search(r"drop\.rngs\.count +skipped +- +\(\) +uint32 +random state \(RngState\), kept", out)
