"""Checkpoint transfer: rename rules, load / load_plan / save, the report, strictness."""

import json
import os
import re
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import treeglob as tg
from conftest import ROOT, load_plan_command

sys.path.insert(0, str(ROOT / "examples"))
import finetune_from_checkpoint  # noqa: E402
from finetune_from_checkpoint import RULES, TWO_HEAD_RULES  # noqa: E402
from scanned_gpt import ScannedGPT  # noqa: E402
from train_gpt import GPT  # noqa: E402

# ----------------------------------------------------------------------------
# Models and checkpoints


def gpt(seed=0, depth=2):
    return GPT(vocab=40, dim=16, depth=depth, heads=2, context=8, key=jax.random.key(seed))


def scanned(seed=0, depth=2):
    return ScannedGPT(vocab=40, dim=16, depth=depth, heads=2, context=8, key=jax.random.key(seed))


def arrays(model):
    return jax.tree.leaves(eqx.filter(model, eqx.is_array))


def flat(model):
    """A model's arrays by path: what `save` writes."""
    return {
        p: np.asarray(x)
        for p, x in zip(tg.paths(model), jax.tree.leaves(model), strict=True)
        if eqx.is_array(x)
    }


def assert_same_arrays(a, b):
    la, lb = arrays(a), arrays(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


STACKED = {"blocks": 1}


def test_save_then_load_is_exact(tmp_path):
    source, target = gpt(0), gpt(1)
    names = tg.save(tmp_path / "m.safetensors", source)
    assert names == list(flat(source))
    loaded, report = tg.load(target, tmp_path / "m.safetensors")
    assert_same_arrays(loaded, source)
    assert report.ok and report.counts["loaded"]["leaves"] == len(names)
    tokens = jnp.arange(8) % 40
    np.testing.assert_array_equal(jax.jit(loaded.__call__)(tokens), jax.jit(source.__call__)(tokens))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8", "uint32", "bool", "float64"])
def test_every_dtype_round_trips_bit_for_bit(tmp_path, dtype):
    rng = np.random.default_rng(0)
    value = rng.standard_normal((3, 5)) * 100
    tree = {
        "a": {"x": np.asarray(value).astype(jnp.dtype(dtype)), "s": np.asarray(value[0, 0]).astype(dtype)}
    }
    tg.save(tmp_path / "t.safetensors", tree)
    zeros = jax.tree.map(np.zeros_like, tree)
    loaded, _ = tg.load(zeros, tmp_path / "t.safetensors")  # NumPy leaves stay NumPy: float64 intact
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree), strict=True):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    if dtype != "float64":  # into JAX arrays
        loaded, _ = tg.load(jax.tree.map(jnp.asarray, zeros), tmp_path / "t.safetensors")
        for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree), strict=True):
            assert isinstance(got, jax.Array) and np.asarray(got).tobytes() == want.tobytes()


def test_safetensors_written_by_treeglob_read_by_the_safetensors_package(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    model = gpt()
    tg.save(tmp_path / "m.safetensors", model)
    loaded = safetensors_numpy.load_file(tmp_path / "m.safetensors")
    arrays_by_path = flat(model)
    assert set(loaded) == set(arrays_by_path)  # (older readers list the names sorted)
    for name, value in loaded.items():
        np.testing.assert_array_equal(value, arrays_by_path[name])


def test_files_from_the_safetensors_package_load(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {"b.w": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(2, jnp.bfloat16)}
    safetensors_numpy.save_file(tensors, tmp_path / "x.safetensors")
    loaded, _ = tg.load(
        {"a": jnp.zeros(2, jnp.bfloat16), "b": {"w": jnp.zeros((2, 3))}}, tmp_path / "x.safetensors"
    )
    np.testing.assert_array_equal(loaded["b"]["w"], tensors["b.w"])
    assert loaded["a"].dtype == jnp.bfloat16


def test_a_scanned_model_loads_per_layer_tensors_and_saves_them_back(tmp_path):
    source = gpt(0, depth=3)
    tg.save(tmp_path / "list.safetensors", source)
    model, report = tg.load(scanned(1, depth=3), tmp_path / "list.safetensors", stacked=STACKED)
    assert report.ok
    # Each layer of a stacked leaf is the list model's block.
    for k in range(3):
        np.testing.assert_array_equal(model.blocks.fc.weight[k], source.blocks[k].fc.weight)
    tokens = jnp.arange(8) % 40
    np.testing.assert_allclose(jax.jit(model.__call__)(tokens), jax.jit(source.__call__)(tokens), atol=1e-5)
    # Saving the stacked model gives the list model's checkpoint, byte for byte.
    names = tg.save(tmp_path / "scan.safetensors", model, stacked=STACKED)
    assert names == tg.save(tmp_path / "again.safetensors", source)
    assert (tmp_path / "scan.safetensors").read_bytes() == (tmp_path / "list.safetensors").read_bytes()
    back, _ = tg.load(scanned(2, depth=3), tmp_path / "scan.safetensors", stacked=STACKED)
    assert_same_arrays(back, model)


def test_skipped_layers_of_a_stacked_leaf_keep_their_values(tmp_path):
    tg.save(tmp_path / "list.safetensors", gpt(0, depth=3))
    init = scanned(1, depth=3)
    model, report = tg.load(init, tmp_path / "list.safetensors", stacked=STACKED, skip=["blocks.0"])
    np.testing.assert_array_equal(model.blocks.fc.weight[0], init.blocks.fc.weight[0])
    np.testing.assert_array_equal(model.blocks.fc.weight[1], gpt(0, depth=3).blocks[1].fc.weight)
    assert report.counts["skipped"]["leaves"] == 16  # one block's leaves
    abstract = eqx.filter_eval_shape(lambda: scanned(1, depth=3))
    with pytest.raises(
        tg.LoadError,
        match=r"16 leaves are skipped or missing, but the model holds no values for them .*: blocks.0.ln1.weight, ",
    ):
        tg.load(abstract, tmp_path / "list.safetensors", stacked=STACKED, skip=["blocks.0"])


def test_an_abstract_model_is_filled_without_initialising(tmp_path):
    source = gpt(0)
    tg.save(tmp_path / "m.safetensors", source)
    abstract = eqx.filter_eval_shape(lambda: gpt(5))
    model, _ = tg.load(abstract, tmp_path / "m.safetensors")
    assert_same_arrays(model, source)


@pytest.mark.parametrize("kind", ["tree", "npz", "npz_compressed"])
def test_other_sources(tmp_path, kind):
    source = gpt(0)
    if kind == "tree":
        src = source
    else:
        src = tmp_path / "m.npz"
        (np.savez if kind == "npz" else np.savez_compressed)(
            src, **{p.replace(".", "/"): v for p, v in flat(source).items()}
        )
    model, report = tg.load(gpt(1), src)
    assert report.ok
    assert_same_arrays(model, source)


def test_orbax_checkpoint_directory(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    source = eqx.filter(gpt(0), eqx.is_array)
    ocp.PyTreeCheckpointer().save(tmp_path / "ckpt", {"params": source})
    model, report = tg.load(gpt(1), tmp_path / "ckpt", rename=[("^params", "")])
    assert report.ok
    assert_same_arrays(model, source)


# ----------------------------------------------------------------------------
# Rules: rename, skip, ignore, transform


def to_hugging_face(params) -> dict[str, np.ndarray]:
    """The reference: the Quick start GPT under GPT-2's names and layouts, written out by hand
    as a converter would, with the causal-mask buffers old GPT-2 files carry."""
    out = {"transformer.wte.weight": params.embed.weight, "transformer.wpe.weight": params.pos_embed}
    for i, b in enumerate(params.blocks):
        h, a = f"transformer.h.{i}", b.attn
        out |= {
            f"{h}.ln_1.weight": b.ln1.weight,
            f"{h}.ln_1.bias": b.ln1.bias,
            f"{h}.attn.c_attn.weight": jnp.concatenate(
                [a.query_proj.weight.T, a.key_proj.weight.T, a.value_proj.weight.T], 1
            ),
            f"{h}.attn.c_attn.bias": jnp.concatenate([a.query_proj.bias, a.key_proj.bias, a.value_proj.bias]),
            f"{h}.attn.c_proj.weight": a.output_proj.weight.T,
            f"{h}.attn.c_proj.bias": a.output_proj.bias,
            f"{h}.attn.bias": jnp.tril(jnp.ones((8, 8))),  # a causal-mask buffer, not a parameter
            f"{h}.ln_2.weight": b.ln2.weight,
            f"{h}.ln_2.bias": b.ln2.bias,
            f"{h}.mlp.c_fc.weight": b.fc.weight.T,
            f"{h}.mlp.c_fc.bias": b.fc.bias,
            f"{h}.mlp.c_proj.weight": b.proj.weight.T,
            f"{h}.mlp.c_proj.bias": b.proj.bias,
        }
    out |= {
        "transformer.ln_f.weight": params.ln_f.weight,
        "transformer.ln_f.bias": params.ln_f.bias,
        "lm_head.weight": params.head.weight,
        "lm_head.bias": params.head.bias,
    }
    return {name: np.asarray(value) for name, value in out.items()}


HF_RULES = dict(RULES._asdict(), ignore=["*.attn.bias$"], skip=["head.bias"])


def test_hugging_face_names_load_into_a_scanned_model(tmp_path):
    source = gpt(0, depth=3)
    tg.save(tmp_path / "hf.safetensors", to_hugging_face(source))
    init = scanned(1, depth=3)
    model, report = tg.load(init, tmp_path / "hf.safetensors", stacked=STACKED, **HF_RULES)
    source_arrays = eqx.filter(source, eqx.is_array)
    for k in range(3):
        for get in (
            lambda b: b.attn.query_proj.weight,
            lambda b: b.attn.value_proj.weight,
            lambda b: b.attn.key_proj.bias,
            lambda b: b.fc.weight,
        ):
            np.testing.assert_array_equal(get(model.blocks)[k], get(source_arrays.blocks[k]))
    np.testing.assert_array_equal(model.head.bias, init.head.bias)  # skipped
    np.testing.assert_array_equal(model.head.weight, source.head.weight)
    counts = {s: c["leaves"] for s, c in report.counts.items()}
    # 16 leaves per block, all loaded, 9 of them transformed (3 weights and 3 biases split
    # from c_attn, 3 weights transposed).
    assert counts == {
        "loaded": 3 * 16 + 5,
        "skipped": 1,
        "missing": 0,
        "mismatch": 0,
        "unused": 0,
        "ignored": 3,
        "transformed": 3 * 9,
    }
    tokens = jnp.arange(8) % 40
    want = jax.jit(source.__call__)(tokens) - source.head.bias + init.head.bias
    np.testing.assert_allclose(jax.jit(model.__call__)(tokens), want, atol=1e-5)


def test_the_export_under_gpt2_names_is_the_hand_written_converter_s_bit_for_bit(tmp_path):
    source = gpt(0, depth=3)
    names = tg.save(tmp_path / "hf.safetensors", source, **RULES._asdict())
    written = load_file(tmp_path / "hf.safetensors")
    reference = {k: v for k, v in to_hugging_face(source).items() if not k.endswith(".attn.bias")}
    assert sorted(names) == sorted(reference) == sorted(written)
    for name, value in reference.items():
        assert written[name].dtype == value.dtype, name
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    # The scanned model, under `stacked`, writes the same file.
    stacked_model, _ = tg.load(
        scanned(5, depth=3), tmp_path / "hf.safetensors", stacked=STACKED, **RULES._asdict()
    )
    tg.save(tmp_path / "again.safetensors", stacked_model, stacked=STACKED, **RULES._asdict())
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "hf.safetensors").read_bytes()


def test_the_example_fine_tunes_from_gpt2_names_and_exports_back_sharded_bit_for_bit(tmp_path):
    _, _, finetuned = finetune_from_checkpoint.main(pretrain_steps=2, steps=2, out_dir=str(tmp_path))
    for name in ("pretrained", "finetuned"):
        files = sorted(p.name for p in (tmp_path / name).iterdir())
        assert files[-1] == "model.safetensors.index.json" and len(files) > 2, files
    fresh = finetune_from_checkpoint.build_model(seed=7)
    loaded, report = tg.load(fresh, tmp_path / "finetuned", stacked=STACKED, **TWO_HEAD_RULES)
    assert report.ok
    finetuned, loaded, fresh = (eqx.filter(m, eqx.is_array) for m in (finetuned, loaded, fresh))
    np.testing.assert_array_equal(loaded.space_head.weight, fresh.space_head.weight)  # not GPT-2's
    for got, want in zip(
        arrays(eqx.tree_at(lambda m: m.space_head, loaded, None)),
        arrays(eqx.tree_at(lambda m: m.space_head, finetuned, None)),
        strict=True,
    ):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_the_plan_is_what_load_does(tmp_path):
    tg.save(tmp_path / "hf.safetensors", to_hugging_face(gpt(0)))
    abstract = eqx.filter_eval_shape(lambda: scanned(1))
    plan = tg.load_plan(abstract, tmp_path / "hf.safetensors", stacked=STACKED, **HF_RULES)
    _, report = tg.load(scanned(1), tmp_path / "hf.safetensors", stacked=STACKED, **HF_RULES)
    assert plan == report


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(skip=["hed"]),
            r"The skip list given to load\(\) glob\('hed'\) matches no leaf .*\nClose matches in the tree: head",
        ),
        (
            dict(ignore=["*.attn.bais"]),
            r"The ignore list given to load\(\) glob\('\*.attn.bais'\) matches no leaf",
        ),
        (
            dict(rename=[("^transfomer.h", "blocks")]),
            r"rename rule 0 \('\^transfomer.h' -> 'blocks'\) matches no checkpoint name",
        ),
        (dict(transform=[("*.c_fc.weight", "transpose")]), r"matches no leaf"),
    ],
)
def test_rules_that_match_nothing(tmp_path, kwargs, message):
    tg.save(tmp_path / "m.safetensors", gpt(0))
    with pytest.raises(tg.NoMatchError, match=message):
        tg.load(gpt(1), tmp_path / "m.safetensors", **kwargs)
    tg.load(gpt(1), tmp_path / "m.safetensors", **kwargs, strict=False)


def test_every_problem_is_listed_at_once(tmp_path):
    tensors = flat(gpt(0))
    tensors["extra.weight"] = np.ones(3, np.float32)
    tensors["head.weight"] = tensors["head.weight"].T  # Conv1D layout
    del tensors["ln_f.bias"]
    tg.save(tmp_path / "m.safetensors", tensors)
    with pytest.raises(tg.LoadError) as info:
        tg.load(gpt(1), tmp_path / "m.safetensors")
    message = str(info.value)
    assert re.search(r"1 model leaf has no checkpoint tensor:\n  ln_f.bias float32\(16,\)", message)
    assert re.search(r"head.weight float32\(40, 16\) <- head.weight gives float32\(16, 40\)", message)
    assert re.search(r"1 checkpoint tensor is used by no model leaf:\n  extra.weight float32\(3,\)", message)
    assert info.value.report.problems() == ["missing", "mismatch", "unused"]
    # Allowed per call; the mismatch is fixed by a transform.
    model, report = tg.load(
        gpt(1),
        tmp_path / "m.safetensors",
        allow_missing=True,
        allow_unused=True,
        transform=[("head.weight", "transpose")],
    )
    np.testing.assert_array_equal(model.head.weight, gpt(0).head.weight)
    np.testing.assert_array_equal(model.ln_f.bias, gpt(1).ln_f.bias)
    assert report.ok and report.problems() == []


def test_missing_leaves_suggest_close_renamed_names(tmp_path):
    tg.save(tmp_path / "m.safetensors", gpt(0))
    with pytest.raises(tg.LoadError, match=r"ln_f.weight float32\(16,\)  \(close: lnf.weight\)"):
        tg.load(gpt(1), tmp_path / "m.safetensors", rename=[("ln_f", "lnf")])


def test_several_tensors_for_one_path_list_every_collision(tmp_path):
    tree = {
        "a": {"w": np.ones(2), "v": np.ones(2)},
        "b": {"w": np.ones(2), "v": np.ones(2)},
        "z": {"w": np.ones(2)},
    }
    tg.save(tmp_path / "m.safetensors", tree)
    model = {"c": {"w": np.zeros(2), "v": np.zeros(2)}}
    with pytest.raises(tg.LoadError) as info:
        tg.load(model, tmp_path / "m.safetensors", rename=[("{x}.{n}", "c.{n}")])
    assert str(info.value).splitlines() == [
        "load(): 2 model paths would each take several checkpoint tensors:",
        "    c.v <- 'a.v', 'b.v'",
        "    c.w <- 'a.w', 'b.w', 'z.w'",
        "A leaf takes one tensor: rename all but one of them elsewhere, or ignore=[...] them; or combine "
        "them with a 'concat(axis)' or 'stack(axis)' transform on the leaf.",
    ]
    assert info.value.report is None


def test_a_rename_typo_gets_close_matches_among_runs_of_segments():
    ckpt = {"h.0.mlp.c_fc.weight": np.zeros(2), "h.0.attn.bias": np.zeros(2)}
    model = {"blocks": [{"fc": {"weight": np.zeros(2)}}]}
    with pytest.raises(
        tg.NoMatchError,
        match=r"rename rule 1 \('mlp\.c_fcc' -> 'fc'\) matches no checkpoint name .* Close matches: mlp\.c_fc\.",
    ):
        tg.load_plan(model, ckpt, rename=[("h", "blocks"), ("mlp.c_fcc", "fc")])
    with pytest.raises(tg.NoMatchError, match=r"Close matches: h\.0\.mlp\.c_fc\.weight\."):
        tg.load_plan(model, ckpt, rename=[("h.{i}.mlp.c_fcc.weight", "blocks.{i}.fc.weight")])
    with pytest.raises(
        tg.NoMatchError,
        match=r"glob\('\*\.attn\.biass\$'\) matches no leaf(.|\n)*Close matches in the tree: h\.0\.attn\.bias",
    ):
        tg.load_plan(model, ckpt, ignore=["*.attn.biass$"])


def test_transforms(tmp_path):
    tg.save(
        tmp_path / "m.safetensors",
        {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)},
    )
    target = {"w": jnp.zeros((3, 2), jnp.bfloat16), "b": jnp.zeros(3, jnp.bfloat16)}
    model, report = tg.load(
        target,
        tmp_path / "m.safetensors",
        transform=[("w", lambda w: w.T.astype(jnp.bfloat16)), ("b", "bfloat16")],
    )
    np.testing.assert_array_equal(model["w"], np.arange(6).reshape(2, 3).T)
    assert model["w"].dtype == model["b"].dtype == jnp.bfloat16
    assert {r.path: r.transform for r in report.rows} == {"b": "astype(bfloat16)", "w": "<lambda>"}
    with pytest.raises(
        ValueError, match=r"unknown transform 'tranpose'; a named transform is one of transpose,"
    ):
        tg.load(target, tmp_path / "m.safetensors", transform=[("w", "tranpose")])
    with pytest.raises(TypeError, match=r"transform\[0\]: 3 is not callable"):
        tg.load(target, tmp_path / "m.safetensors", transform=[("w", 3)])


def test_named_transforms_compose_in_order_from_python_a_rules_file_and_the_command_line(tmp_path, capsys):
    weights = {"w": np.arange(6, dtype=np.float16).reshape(2, 3)}
    tg.save(tmp_path / "m.safetensors", weights)
    target = {"w": np.zeros((3, 2), np.float32)}
    model, report = tg.load(target, tmp_path / "m.safetensors", transform=[("w", ("transpose", "float32"))])
    np.testing.assert_array_equal(model["w"], weights["w"].T.astype(np.float32))
    assert report.rows[0].transform == "transpose then astype(float32)"
    (tmp_path / "rules.toml").write_text('transform = [["w", ["transpose", "float32"]]]\n')
    rules = tg.load_transfer(tmp_path / "rules.toml")
    assert rules.transform == [("w", ("transpose", "float32"))]
    assert tg.load_plan(target, tmp_path / "m.safetensors", **rules._asdict()).ok
    np.savez(tmp_path / "target.npz", w=np.zeros((3, 2), np.float32))
    status = load_plan_command(
        tmp_path / "target.npz", tmp_path / "m.safetensors", "--transform", "w=transpose,float32"
    )
    assert status == 0 and "via transpose then astype(float32)" in capsys.readouterr().out
    np.savez(tmp_path / "half.npz", w=np.zeros((1, 3), np.float32))
    status = load_plan_command(
        tmp_path / "half.npz", tmp_path / "m.safetensors", "--transform", "w=split(2, 0),float32"
    )
    assert status == 0 and "via split(2, 0, axis=0) then astype(float32)" in capsys.readouterr().out
    with pytest.raises(
        TypeError, match=r"transform\[0\]\[1\]: 3 is not callable; .* or a tuple of these applied in order"
    ):
        tg.load_plan(target, tmp_path / "m.safetensors", transform=[("w", ("transpose", 3))])
    with pytest.raises(ValueError, match=r"transform\[0\]: an empty tuple of transforms"):
        tg.load_plan(target, tmp_path / "m.safetensors", transform=[("w", ())])


def test_a_function_that_fails_without_data_is_flagged_in_the_plan_and_checked_when_loaded(tmp_path):
    tg.save(tmp_path / "m.safetensors", {"w": np.ones((2, 3), np.float32)})

    def in_place(w):  # writes into its input: fails on the read-only stand-in, not on the data
        w[0] = 0.0
        return w

    report = tg.load_plan({"w": jnp.zeros((2, 3))}, tmp_path / "m.safetensors", transform=[("w", in_place)])
    (row,) = report.rows
    assert report.ok and (row.status, row.note) == (
        "loaded",
        "unchecked: fails without data (ValueError: assignment destination is read-only)",
    )
    assert report.counts["unchecked"] == {"leaves": 1, "elements": 6}
    assert (
        "unchecked         1 leaf                   6 elements  <- their transform failed without data"
        in str(report)
    )
    model, _ = tg.load({"w": jnp.zeros((2, 3))}, tmp_path / "m.safetensors", transform=[("w", in_place)])
    np.testing.assert_array_equal(model["w"], [[0, 0, 0], [1, 1, 1]])


def test_a_function_that_gives_another_shape_on_data_is_checked_when_loaded(tmp_path):
    tg.save(tmp_path / "m.safetensors", {"w": np.ones((2, 3), np.float32)})

    def two_faced(w):
        return w if w.strides[0] == 0 else w[:1]  # the stand-in's shape is right, the data's is not

    assert tg.load_plan({"w": jnp.zeros((2, 3))}, tmp_path / "m.safetensors", transform=[("w", two_faced)]).ok
    with pytest.raises(
        tg.LoadError,
        match=r"the transform two_faced for 'w' \(from 'w' in .*m\.safetensors\) gives float32\(1, 3\), "
        r"which is float32\(2, 3\)",
    ):
        tg.load({"w": jnp.zeros((2, 3))}, tmp_path / "m.safetensors", transform=[("w", two_faced)])


# ----------------------------------------------------------------------------
# The report


def test_report_table_and_data(tmp_path):
    tg.save(
        tmp_path / "m.safetensors",
        {"h": [{"w": np.ones((2, 2), np.float32)}], "extra": np.ones(1, np.float32)},
    )
    model = {"blocks": [{"w": jnp.zeros((2, 2))}], "head": jnp.zeros(3)}
    report = tg.load_plan(
        model, tmp_path / "m.safetensors", rename=[("h", "blocks")], skip="head", ignore="extra"
    )
    assert str(report) == textwrap.dedent(
        """\
        path        status   source    shape   dtype    note
        blocks.0.w  loaded   <- h.0.w  (2, 2)  float32
        head        skipped  -         (3,)    float32  skip
        -           ignored  extra     (1,)    float32

        loaded            1 leaf                   4 elements
        skipped           1 leaf                   3 elements
        missing           0 leaves                 0 elements
        unused            0 tensors                0 elements
        ignored           1 tensor                 1 element"""
    )
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is True and data["counts"]["loaded"] == {"leaves": 1, "elements": 4}
    assert data["rows"][0] == {
        "status": "loaded",
        "path": "blocks.0.w",
        "source": "h.0.w",
        "shape": [2, 2],
        "dtype": "float32",
        "source_shape": [2, 2],
        "source_dtype": "float32",
        "transform": None,
        "note": "",
    }


# ----------------------------------------------------------------------------
# Saving


def test_save_a_selection(tmp_path):
    model = gpt()
    assert tg.save(tmp_path / "h.safetensors", model, select="head") == ["head.weight", "head.bias"]
    with pytest.raises(
        tg.NoMatchError, match=r"The selector given to save\(\) glob\('hed'\) matches no leaf"
    ):
        tg.save(tmp_path / "x.safetensors", model, select="hed")
    assert not (tmp_path / "x.safetensors").exists()


def test_save_refuses_dtypes_the_format_cannot_store(tmp_path):
    with pytest.raises(
        TypeError, match=r"tensor 'z' has the dtype complex64, which .safetensors cannot store"
    ):
        tg.save(tmp_path / "c.safetensors", {"z": np.ones(2, np.complex64)})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------
# Bad sources


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "none.safetensors", r"none.safetensors: no such file or directory"),
        (
            lambda p: (p / "d.safetensors").mkdir() or p / "d.safetensors",
            r"is a directory, not a .safetensors file",
        ),
        (
            lambda p: (p / "x.pt").write_bytes(b"x") and p / "x.pt",
            r"treeglob reads a .safetensors, .npz or .safetensors.index.json file",
        ),
        (
            lambda p: (p / "weights").write_bytes(b"x") and p / "weights",
            r"weights: treeglob reads a \.safetensors, \.npz or \.safetensors\.index\.json file, a directory of "
            r"\.safetensors shards, or an orbax checkpoint directory, not a file without a suffix\.$",
        ),
        (
            lambda p: (p / "b.safetensors").write_bytes(b"\x01") and p / "b.safetensors",
            r"shorter than its 8-byte",
        ),
    ],
)
def test_bad_sources(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        tg.load({"a": np.zeros(1)}, make(tmp_path))


def test_save_writes_only_the_formats_it_knows_by_their_suffix(tmp_path):
    message = "save(): 'x.pt' does not end in .safetensors or .npz, the formats save() writes (chosen by the suffix)."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        tg.save("x.pt", {"a": np.zeros(1)})


# ----------------------------------------------------------------------------
# Sharding and memory, in fresh processes


def run_python(code: str, env_extra: dict | None = None) -> str:
    env = {**os.environ, **(env_extra or {})}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_sharded_load_reads_each_devices_slice(tmp_path):
    code = f"""
import jax, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
import treeglob as tg
from treeglob._checkpoints.safetensors import SafetensorsCheckpoint

reads, slices = [], []
original_read, original_slice = SafetensorsCheckpoint.read, SafetensorsCheckpoint.read_slice
SafetensorsCheckpoint.read = lambda self, name: reads.append(name) or original_read(self, name)
def read_slice(self, name, index):
    out = original_slice(self, name, index)
    slices.append((name, out.shape))
    return out
SafetensorsCheckpoint.read_slice = read_slice

rng = np.random.default_rng(0)
tensors = {{"w": rng.standard_normal((16, 8)).astype(np.float32), "b": rng.standard_normal(8).astype(np.float32),
            "t": rng.standard_normal((8, 16)).astype(np.float32)}}
tg.save({str(tmp_path / "m.safetensors")!r}, tensors)
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
model = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tensors)
shardings = tg.shardings(model, [("w", P("data", "model")), ("t", P(None, "model"))], mesh)
loaded, report = tg.load(model, {str(tmp_path / "m.safetensors")!r}, shardings=shardings, transform=[("t", lambda t: t * 2)])
for name in tensors:
    assert loaded[name].sharding == shardings[name], name
    want = tensors[name] * (2 if name == "t" else 1)
    np.testing.assert_array_equal(np.asarray(loaded[name]), want)
w_shards = sorted(s.data.shape for s in loaded["w"].addressable_shards)
print(sorted(set(slices)), len(slices), reads, w_shards)
"""
    out = run_python(code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
    # w: each of the 8 devices read its own (8, 2) slice; b: replicated, so read whole once
    # for all 8 devices; t: transformed, so read whole once.
    assert (
        out.strip()
        == "[('w', (8, 2))] 8 ['b', 't'] [(8, 2), (8, 2), (8, 2), (8, 2), (8, 2), (8, 2), (8, 2), (8, 2)]"
    )


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="measures resident memory on Linux"
)
@pytest.mark.slow
def test_loading_holds_one_tensor_at_a_time(tmp_path):
    """A 256 MiB checkpoint of 16 tensors of 16 MiB loads into an abstract model with about
    one tensor of host memory beyond the loaded model itself: traced (tracemalloc) and
    resident (peak RSS), in a fresh process that only loads."""
    n, shape = 16, (2048, 2048)
    tg.save(tmp_path / "big.safetensors", {f"layers.{k}.w": np.full(shape, k, np.float32) for k in range(n)})
    code = f"""
import tracemalloc, jax, numpy as np
import treeglob as tg

def status(field):  # kB, from Linux's /proc
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

path = {str(tmp_path / "big.safetensors")!r}
model = {{"layers": [{{"w": jax.ShapeDtypeStruct({shape}, np.float32)}} for _ in range({n})]}}
tg.load_plan(model, path)  # imports and caches warm
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident size starts again from here
before = status("VmRSS:")
tracemalloc.start()
loaded, _ = tg.load(model, path)
retained, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
after = status("VmHWM:")
assert all(float(loaded["layers"][k]["w"][0, 0]) == k for k in range({n}))
print((peak - retained) / 2**20, (after - before) / 2**10)
"""
    extra_mib, rss_growth_mib = map(float, run_python(code, {"JAX_PLATFORMS": "cpu"}).split())
    tensor_mib, model_mib = 16, 256
    # Host buffers beyond what the loaded model keeps (a CPU array may alias the buffer it
    # was made from): one tensor at a time.
    assert extra_mib < 1.5 * tensor_mib, extra_mib
    # The loaded model is resident, and little more.
    assert model_mib * 0.9 < rss_growth_mib < model_mib + 3 * tensor_mib, rss_growth_mib


# ----------------------------------------------------------------------------
# Edge cases: keys that need quoting, several stack axes, 64-bit casts, abstract trees


def test_keys_that_need_quoting_round_trip(tmp_path):
    model = {"params": {"conv.1": {"kernel": np.arange(2.0)}, "a b": np.ones(1), "re:x": np.zeros(3)}}
    zeros = jax.tree.map(np.zeros_like, model)
    loaded, report = tg.load(zeros, model)  # from the tree itself
    assert report.ok and [r.path for r in report.rows] == tg.paths(model)
    np.testing.assert_array_equal(loaded["params"]["conv.1"]["kernel"], [0.0, 1.0])
    names = tg.save(tmp_path / "q.safetensors", model)
    assert names == tg.paths(model) == ['params."a b"', 'params."conv.1".kernel', 'params."re:x"']
    loaded, report = tg.load(zeros, tmp_path / "q.safetensors")
    assert report.ok
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(model), strict=True):
        np.testing.assert_array_equal(got, want)


def test_two_stacked_axes_follow_the_layer_order_of_nested_lists(tmp_path):
    rng = np.random.default_rng(0)
    nested = {"blocks": [[{"w": rng.standard_normal(3)} for _ in range(3)] for _ in range(2)]}
    tg.save(tmp_path / "n.safetensors", nested)
    stacked = {"blocks": {"w": np.zeros((2, 3, 3))}}
    loaded, report = tg.load(stacked, tmp_path / "n.safetensors", stacked={"blocks": 2})
    assert report.ok
    for i in range(2):
        for j in range(3):
            np.testing.assert_array_equal(loaded["blocks"]["w"][i, j], nested["blocks"][i][j]["w"])
    tg.save(tmp_path / "s.safetensors", loaded, stacked={"blocks": 2})
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "n.safetensors").read_bytes()


@pytest.mark.parametrize(
    "transform, gives",
    [("float64", np.float64), (lambda w: w.astype(float), np.float64), (lambda w: w * 2.0, np.float32)],
)
def test_a_plan_with_64_bit_outputs_is_what_load_does(tmp_path, transform, gives):
    """NumPy's dtype rules, which a transform meets when loading, also when planning (JAX
    without x64 would narrow float64 to float32)."""
    tg.save(tmp_path / "f.safetensors", {"w": np.arange(3, dtype=np.float32)})
    for dtype in (np.float64, np.float32):
        model = {"w": np.zeros(3, dtype)}
        plan = tg.load_plan(model, tmp_path / "f.safetensors", transform=[("w", transform)])
        assert plan.ok == (dtype == gives)
        if dtype == gives:
            loaded, _ = tg.load(model, tmp_path / "f.safetensors", transform=[("w", transform)])
            assert loaded["w"].dtype == dtype
        else:
            message = rf"w {np.dtype(dtype)}\(3,\) <- w gives {np.dtype(gives)}\(3,\)"
            with pytest.raises(tg.LoadError, match=message):
                tg.load(model, tmp_path / "f.safetensors", transform=[("w", transform)])


def test_an_abstract_source_tree_is_refused_before_reading():
    source = {"a": jax.ShapeDtypeStruct((2,), np.float32), "b": np.ones(2, np.float32)}
    target = {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}
    assert tg.load_plan(target, source).ok
    with pytest.raises(tg.LoadError, match=r"1 leaves of the source tree hold no values .*: a\."):
        tg.load(target, source)
    loaded, _ = tg.load(target, source, skip=["a"])
    np.testing.assert_array_equal(loaded["b"], 1.0)


def test_a_big_endian_array_is_saved_little_endian(tmp_path):
    tg.save(tmp_path / "b.safetensors", {"w": np.arange(4, dtype=">f4")})
    loaded, _ = tg.load({"w": np.zeros(4, np.float32)}, tmp_path / "b.safetensors")
    np.testing.assert_array_equal(loaded["w"], [0, 1, 2, 3])


@pytest.mark.parametrize(
    "name, error, message",
    [
        ("m.bin", ValueError, r"save\(\): '.*m.bin' does not end in .safetensors or .npz"),
        ("nodir/m.safetensors", FileNotFoundError, r"save\(\): the directory '.*nodir' of .* does not exist"),
    ],
)
def test_save_refuses_paths_load_cannot_read(tmp_path, name, error, message):
    with pytest.raises(error, match=message):
        tg.save(tmp_path / name, {"w": np.zeros(1)})


@pytest.mark.slow
def test_sharded_load_from_npz_from_abstract_shardings_and_bad_specs(tmp_path):
    code = f"""
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import treeglob as tg

mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
w = np.arange(64, dtype=np.float32).reshape(8, 8)
np.savez({str(tmp_path / "m.npz")!r}, w=w)
sharding = NamedSharding(mesh, P("data", "model"))
# A ShapeDtypeStruct with a sharding (jax.eval_shape of a sharded init): the loaded leaf keeps it.
abstract = {{"w": jax.ShapeDtypeStruct((8, 8), np.float32, sharding=sharding)}}
loaded, _ = tg.load(abstract, {str(tmp_path / "m.npz")!r})
assert loaded["w"].sharding == sharding, loaded["w"].sharding
np.testing.assert_array_equal(np.asarray(loaded["w"]), w)
# A spec that does not fit the leaf is named, not a JAX traceback.
bad = {{"w": NamedSharding(mesh, P(None, None, "model"))}}
try:
    tg.load(abstract, {str(tmp_path / "m.npz")!r}, shardings=bad)
except ValueError as exc:
    print(exc)
"""
    out = run_python(code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
    assert re.match(r"load\(\): shardings at 'w' \(.*\) does not fit its shape \(8, 8\)", out), out


def test_the_dtype_policy_casts_floating_tensors_to_the_model_dtype_on_request(tmp_path, capsys):
    weights = {
        "w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3),
        "b": jnp.ones(3, jnp.bfloat16),
        "i": np.arange(3, dtype=np.int32),
    }
    tg.save(tmp_path / "m.safetensors", weights)
    model = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32), "i": np.zeros(3, np.int32)}
    strict = tg.load_plan(model, tmp_path / "m.safetensors", transform=[("w", "transpose")])
    assert [r.path for r in strict.rows if r.status == "mismatch"] == ["b", "w"]  # strict by default
    loaded, report = tg.load(model, tmp_path / "m.safetensors", transform=[("w", "transpose")], cast=True)
    assert loaded["w"].dtype == loaded["b"].dtype == np.float32 and loaded["i"].dtype == np.int32
    np.testing.assert_array_equal(loaded["w"], np.asarray(weights["w"], np.float32).T)
    notes = {r.path: (r.source_dtype, r.note) for r in report.rows}
    assert notes == {
        "b": ("bfloat16", "cast from bfloat16"),
        "i": ("int32", ""),
        "w": ("bfloat16", "cast from bfloat16 after transpose"),
    }
    ints = {"i": np.zeros(3, np.int64), "w": model["w"], "b": model["b"]}
    plan = tg.load_plan(ints, tmp_path / "m.safetensors", transform=[("w", "transpose")], cast=True)
    assert [r.path for r in plan.rows if r.status == "mismatch"] == ["i"]  # other kinds must agree
    np.savez(tmp_path / "model.npz", **model)
    assert (
        load_plan_command(
            tmp_path / "model.npz", tmp_path / "m.safetensors", "--transform", "w=transpose", "--cast"
        )
        == 0
    )
    assert "cast from bfloat16 after transpose" in capsys.readouterr().out


def test_an_npz_object_array_is_a_mismatch_in_the_plan_not_numpys_error_in_the_load(tmp_path):
    np.savez(tmp_path / "obj.npz", w=np.array([1, "a"], dtype=object), b=np.zeros(2, np.float32))
    model = {"w": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}
    plan = tg.load_plan(model, tmp_path / "obj.npz", transform=[("**", "float32")])
    assert {r.path: r.status for r in plan.rows} == {"b": "loaded", "w": "mismatch"} and not plan.ok
    with pytest.raises(
        tg.LoadError,
        match=r"w float32\(2,\) <- w an object array: pickled Python objects, which treeglob does not load",
    ):
        tg.load(model, tmp_path / "obj.npz", transform=[("**", "float32")])


def test_an_error_while_reading_is_a_load_error_naming_the_leaf_the_tensor_and_the_file(
    tmp_path, monkeypatch
):
    from treeglob._checkpoints import safetensors as safetensors_format

    tg.save(tmp_path / "m.safetensors", {"blocks": [{"w": np.ones(3, np.float32)}]})

    def disk_error(self, info, name):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(safetensors_format.SafetensorsCheckpoint, "read_tensor", disk_error)
    with pytest.raises(
        tg.LoadError,
        match=r"load\(\): loading 'layers.0.w' \(from 'blocks.0.w'\) from .*m\.safetensors failed: "
        r"OSError: \[Errno 5\] Input/output error",
    ) as caught:
        tg.load(
            {"layers": [{"w": np.zeros(3, np.float32)}]},
            tmp_path / "m.safetensors",
            rename=[("blocks", "layers")],
        )
    assert caught.value.report.ok  # the plan was fine: the failure is the read's


def test_abstract_leaves_load_as_jax_arrays_on_the_default_device():
    checkpoint = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    target = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32), "b": np.zeros(3, np.float32)}
    model, _ = tg.load(target, checkpoint)
    assert isinstance(model["w"], jax.Array) and model["w"].devices() == {jax.devices()[0]}
    assert isinstance(model["b"], np.ndarray)  # a NumPy leaf stays one
    np.testing.assert_array_equal(model["w"], checkpoint["w"])


def test_the_load_error_for_abstract_leaves_carries_the_report():
    target = {"w": jax.ShapeDtypeStruct((2,), jnp.float32), "head": jax.ShapeDtypeStruct((3,), jnp.float32)}
    with pytest.raises(
        tg.LoadError, match=r"1 leaves are skipped or missing, but the model holds no"
    ) as caught:
        tg.load(target, {"w": np.ones(2, np.float32)}, skip=["head"])
    report = caught.value.report
    assert {row.path: row.status for row in report.rows} == {"w": "loaded", "head": "skipped"}


def test_the_whole_report_of_missing_and_unused_tensors():
    model = {"blocks": {"attn_w": np.zeros(2), "attn_b": np.zeros(2)}}
    ckpt = {"h": {"attn_w1": np.ones(2), "attn_w2": np.ones(2)}, "x": np.ones(3)}
    message = "\n".join(
        [
            "load() from the source tree: 2 model leaves have no checkpoint tensor:",
            "  blocks.attn_b float64(2,)",
            "  blocks.attn_w float64(2,)  (close: layers.attn_w2, layers.attn_w1)",  # best first; ties by name
            "Rename a tensor to them, skip=[...] them to keep their initial values, or pass allow_missing=True.",
            "3 checkpoint tensors are used by no model leaf:",
            "  h.attn_w1 (renamed layers.attn_w1) float64(2,)",
            "  h.attn_w2 (renamed layers.attn_w2) float64(2,)",
            "  x float64(3,)",
            "Rename them to model paths, ignore=[...] them, or pass allow_unused=True.",
        ]
    )
    with pytest.raises(tg.LoadError, match=f"^{re.escape(message)}$"):
        tg.load(model, ckpt, rename=[("^h", "layers")])
    assert tg.load_plan(model, ckpt).to_dict()["source"] == "the source tree"
    # A tensor no rule renamed is suggested by its own name.
    with pytest.raises(tg.LoadError, match=re.escape("  w float64(2,)  (close: ww)\n")):
        tg.load({"w": np.zeros(2)}, {"ww": np.ones(2)})


def test_malformed_skip_and_ignore_patterns_are_refused_before_anything_is_read():
    from treeglob._checkpoints.rules import check_rules

    for argument in ("skip", "ignore"):
        with pytest.raises(ValueError, match=r"Invalid pattern 'a\{'"):
            check_rules(**{argument: ["a{"]})


def test_a_long_list_of_missing_leaves_is_cut_at_20_with_a_count():
    with pytest.raises(tg.LoadError) as info:
        tg.load({f"w{i:02d}": np.zeros(1) for i in range(30)}, {"w00": np.zeros(1)})
    lines = str(info.value).splitlines()
    assert lines[1:3] == ["  w01 float64(1,)", "  w02 float64(1,)"]
    assert lines[20:23] == [
        "  w20 float64(1,)",
        "  ... and 9 more",
        "Rename a tensor to them, skip=[...] them to keep their initial values, or pass allow_missing=True.",
    ]


def test_a_plan_raises_its_problems_as_load_would():
    plan = tg.load_plan({"w": np.zeros(1)}, {"x": np.zeros(1)})
    with pytest.raises(
        tg.LoadError, match=r"^load\(\) from the source tree: 1 model leaf has no checkpoint tensor:\n"
    ):
        plan.check()
