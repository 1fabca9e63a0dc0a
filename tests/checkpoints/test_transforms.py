"""Transforms written as data (`"split(3, 0, axis=1)"`, `"reshape(4, -1)"`, ...) and several
checkpoint tensors combined into one leaf (`concat`, `stack`)."""

import jax.numpy as jnp
import numpy as np
import pytest

import treeglob as tg
from conftest import load_plan_command
from treeglob._checkpoints.transforms import Impossible, output_meta, parse_transforms

X = np.arange(24, dtype=np.float32).reshape(2, 3, 4)

CASES = [
    ("transpose", X.T),
    ("transpose(1, 0, 2)", X.transpose(1, 0, 2)),
    ("reshape(4, -1)", X.reshape(4, -1)),
    ("reshape(2, 12)", X.reshape(2, 12)),
    ("split(2, 1, axis=2)", X[:, :, 2:]),
    ("split(3, 0, axis=1)", X[:, :1]),
    ("split(2, 0)", X[:1]),
    ("squeeze(0)", X[:1].squeeze(0)),
    ("expand(1)", X[:, None]),
    ("reshape(-1)", X.reshape(-1)),
    ("astype(bfloat16)", X.astype(jnp.bfloat16)),
    ("astype(int32)", X.astype(np.int32)),
    ("float16", X.astype(np.float16)),
]


@pytest.mark.parametrize("text, expected", CASES, ids=[c[0] for c in CASES])
def test_each_transform_written_as_data_knows_its_output_without_the_data(text, expected):
    ((_, fn),) = parse_transforms([("w", text)])
    source = X[:1] if text.startswith("squeeze") else X
    out = fn(source)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
    assert out.dtype == expected.dtype
    shape, dtype = output_meta(fn, source.shape, source.dtype)
    assert (shape, dtype) == (expected.shape, jnp.dtype(expected.dtype))
    assert all(type(n) is int for n in shape)  # as plans print them: 6, not 6.0
    # Its name in plans and reports: as written, defaults and the cast of a dtype name spelled out.
    assert fn.__name__ == {"split(2, 0)": "split(2, 0, axis=0)", "float16": "astype(float16)"}.get(text, text)


@pytest.mark.parametrize(
    "text, shapes, expected",
    [
        # Of one tensor (a rule that renames one tensor onto the leaf).
        ("concat", (2, 4), ((2, 4), jnp.float32)),
        ("stack(axis=1)", (2, 4), ((2, 1, 4), jnp.float32)),
        # Of several.
        ("concat(axis=1)", [(2, 4), (2, 3)], ((2, 7), jnp.float32)),
        ("concat(sizes=(2, 4))", [(2, 4), (4, 4)], ((6, 4), jnp.float32)),
        ("stack(axis=-1)", [(2, 4), (2, 4)], ((2, 4, 2), jnp.float32)),
        ("stack", [(2, 4), (2, 5)], "stack(axis=0): the tensors have different shapes [(2, 4), (2, 5)]"),
        ("stack(axis=3)", [(2, 4), (2, 4)], "stack(axis=3): axis 3 is out of range for 3 dimensions"),
        ("concat(axis=2)", [(2, 4), (2, 4)], "concat(axis=2): axis 2 is out of range for 2 dimensions"),
        (
            "concat(sizes=(2, 3))",
            [(2, 4), (2, 4)],
            "concat(axis=0, sizes=(2, 3)): the tensors' sizes along axis 0 are (2, 2)",
        ),
    ],
)
def test_what_a_combining_transform_gives_without_the_data(text, shapes, expected):
    ((_, fn),) = parse_transforms([("w", text)])
    dtypes = [np.float32] * len(shapes) if isinstance(shapes, list) else np.float32
    assert output_meta(fn, shapes, dtypes) == expected


def test_squeeze_takes_its_axis_only_and_reshape_one_unknown_dimension():
    ((_, squeeze),) = parse_transforms([("w", "squeeze(0)")])
    assert squeeze(np.zeros((1, 1, 2))).shape == (1, 2)
    ((_, reshape),) = parse_transforms([("w", "reshape(-1, -1)")])
    assert (
        output_meta(reshape, (2, 3), np.float32)
        == "reshape(-1, -1): 6 elements do not fit the shape (-1, -1)"
    )


@pytest.mark.parametrize(
    "text, shape, why",
    [
        ("split(3, 0)", (2, 6), "split(3, 0, axis=0): axis 0 of size 2 does not split into 3 equal parts"),
        ("reshape(5, -1)", (2, 6), r"reshape(5, -1): 12 elements do not fit the shape (5, -1)"),
        ("squeeze(1)", (2, 6), "squeeze(1): axis 1 has size 6, not 1"),
        ("transpose(0, 0)", (2, 6), "transpose(0, 0): the axes are not a permutation of the 2 dimensions"),
        ("expand(5)", (2, 6), "expand(5): axis 5 is out of range for 3 dimensions"),
    ],
)
def test_a_transform_that_cannot_apply_is_a_mismatch_in_the_plan_not_a_surprise_in_the_load(text, shape, why):
    ((_, fn),) = parse_transforms([("w", text)])
    got = output_meta(fn, shape, np.float32)
    assert isinstance(got, Impossible) and got == why
    report = tg.load_plan(
        {"w": np.zeros((1, 6), np.float32)}, {"w": np.zeros(shape, np.float32)}, transform=[("w", text)]
    )
    (row,) = report.rows
    assert (row.status, row.note) == ("mismatch", why) and not report.ok
    with pytest.raises(tg.LoadError, match="does not fit its model leaf"):
        tg.load(
            {"w": np.zeros((1, 6), np.float32)}, {"w": np.zeros(shape, np.float32)}, transform=[("w", text)]
        )


@pytest.mark.parametrize(
    "text, message",
    [
        ("split(3)", r"the transform 'split\(3\)' is malformed \(.*\); write one of transpose, "),
        (
            "split(3, 3)",
            r"the transform 'split\(3, 3\)' is malformed \(split\(3, 3, axis=0\): the part taken must be in 0\.\.2\)",
        ),
        ("reshape(2.5)", r"the transform 'reshape\(2\.5\)' is malformed \(takes integers\)"),
        ("transpos", r"unknown transform 'transpos'; a named transform is one of transpose"),
        (
            "astype(object)",
            r"the transform 'astype\(object\)' is malformed \(object is not a dtype of numbers\)",
        ),
        (
            "concat(sizes=())",
            r"is malformed \(concat\(axis=0, sizes=\(\)\): sizes are for concat, one positive size per tensor\)",
        ),
        ("concat(sizes=(2, 0))", r"\(concat\(axis=0, sizes=\(2, 0\)\): sizes are for concat"),
    ],
)
def test_a_malformed_transform_is_refused_before_anything_is_read(text, message):
    with pytest.raises(ValueError, match=message):
        tg.load_plan({"w": np.zeros(2)}, {"w": np.zeros(2)}, transform=[("w", text)])


# ----------------------------------------------------------------------------
# Several tensors into one leaf


Q, K, V = (np.full((2, 4), v, np.float32) for v in (1, 2, 3))
SEPARATE = {
    "h.0.q_proj": Q,
    "h.0.k_proj": K,
    "h.0.v_proj": V,
    "h.1.q_proj": Q + 10,
    "h.1.k_proj": K + 10,
    "h.1.v_proj": V + 10,
}
FUSED = {"blocks": [{"qkv": np.zeros((6, 4), np.float32)}, {"qkv": np.zeros((6, 4), np.float32)}]}
ONE_RULE_EACH = [
    ("h.{i}.q_proj", "blocks.{i}.qkv"),
    ("h.{i}.k_proj", "blocks.{i}.qkv"),
    ("h.{i}.v_proj", "blocks.{i}.qkv"),
]


def test_separate_projections_concatenate_into_a_fused_leaf_in_the_order_of_their_rules():
    model, report = tg.load(FUSED, SEPARATE, rename=ONE_RULE_EACH, transform=[("*.qkv", "concat(0)")])
    np.testing.assert_array_equal(model["blocks"][0]["qkv"], np.concatenate([Q, K, V]))
    np.testing.assert_array_equal(model["blocks"][1]["qkv"], np.concatenate([Q, K, V]) + 10)
    rows = {r.path: (r.source, r.transform) for r in report.rows}
    assert rows["blocks.0.qkv"] == ("h.0.q_proj + h.0.k_proj + h.0.v_proj", "concat(axis=0)")
    # the rules' order decides, not the names': v, q, k
    reordered = [ONE_RULE_EACH[2], ONE_RULE_EACH[0], ONE_RULE_EACH[1]]
    model, _ = tg.load(FUSED, SEPARATE, rename=reordered, transform=[("*.qkv", "concat(0)")])
    np.testing.assert_array_equal(model["blocks"][0]["qkv"], np.concatenate([V, Q, K]))


def test_experts_stack_into_one_leaf_and_the_plan_knows_its_shape():
    experts = {f"moe.experts.{e}.w": np.full((3, 2), e, np.float32) for e in range(4)}
    rename = [(f"moe.experts.{e}.w", "moe.w") for e in range(4)]
    target = {"moe": {"w": np.zeros((4, 3, 2), np.float32)}}
    model, _ = tg.load(target, experts, rename=rename, transform=[("moe.w", "stack(0)")])
    np.testing.assert_array_equal(model["moe"]["w"][:, 0, 0], [0, 1, 2, 3])
    wrong = {"moe": {"w": np.zeros((5, 3, 2), np.float32)}}
    (row,) = tg.load_plan(wrong, experts, rename=rename, transform=[("moe.w", "stack(0)")]).rows
    assert (row.status, row.note) == ("mismatch", "gives float32(4, 3, 2) after stack(axis=0)")


def test_combined_tensors_may_be_transformed_after_and_cast():
    transform = [("*.qkv", ("concat(0)", "transpose", "bfloat16"))]
    target = {"blocks": [{"qkv": jnp.zeros((4, 6), jnp.bfloat16)}] * 2}
    model, report = tg.load(target, SEPARATE, rename=ONE_RULE_EACH, transform=transform)
    np.testing.assert_array_equal(
        np.asarray(model["blocks"][0]["qkv"], np.float32), np.concatenate([Q, K, V]).T
    )
    assert report.rows[0].transform == "concat(axis=0) then transpose then astype(bfloat16)"


def test_tensors_one_rule_brings_together_have_no_order_and_are_refused():
    with pytest.raises(
        tg.LoadError,
        match=r"(?s)take several tensors that the same rename rules brought, in no order:\n    blocks\.0\.qkv <- 'h\.0\.k_proj', 'h\.0\.q_proj', 'h\.0\.v_proj'.*write one rule per tensor",
    ):
        tg.load_plan(
            FUSED, SEPARATE, rename=[("h.{i}.{x}_proj", "blocks.{i}.qkv")], transform=[("*.qkv", "concat(0)")]
        )


def test_shapes_that_do_not_concatenate_are_a_mismatch():
    bad = dict(SEPARATE, **{"h.0.v_proj": np.zeros((2, 5), np.float32)})
    rows = {
        r.path: r
        for r in tg.load_plan(FUSED, bad, rename=ONE_RULE_EACH, transform=[("*.qkv", "concat(0)")]).rows
    }
    assert rows["blocks.0.qkv"].status == "mismatch"
    assert (
        rows["blocks.0.qkv"].note
        == "concat(axis=0): the tensors' shapes [(2, 4), (2, 4), (2, 5)] differ off axis 0"
    )


def test_transforms_as_data_from_a_rules_file(tmp_path):
    (tmp_path / "rules.toml").write_text(
        "rename = [\n"
        '  ["h.{i}.q_proj", "blocks.{i}.qkv"], ["h.{i}.k_proj", "blocks.{i}.qkv"], ["h.{i}.v_proj", "blocks.{i}.qkv"],\n'
        "]\n"
        'transform = {"*.qkv" = ["concat(0)", "transpose"]}\n'
    )
    rules = tg.load_transfer(tmp_path / "rules.toml")
    target = {"blocks": [{"qkv": np.zeros((4, 6), np.float32)}] * 2}
    model, _ = tg.load(target, SEPARATE, **rules._asdict())
    np.testing.assert_array_equal(model["blocks"][1]["qkv"], (np.concatenate([Q, K, V]) + 10).T)


def test_a_function_that_fails_is_a_load_error_naming_the_leaf_the_tensor_and_the_file(tmp_path):
    tg.save(tmp_path / "m.safetensors", {"w": np.ones((2, 6), np.float32)})
    third = [("w", lambda w: np.split(w, 3, axis=0)[0])]
    (row,) = tg.load_plan(
        {"w": np.zeros((1, 6), np.float32)}, tmp_path / "m.safetensors", transform=third
    ).rows
    assert row.status == "loaded" and row.note.startswith(
        "unchecked: fails without data (ValueError: array split"
    )
    with pytest.raises(
        tg.LoadError,
        match=r"the transform <lambda> for 'w' \(from 'w' in .*m\.safetensors\) failed: ValueError: array split",
    ):
        tg.load({"w": np.zeros((1, 6), np.float32)}, tmp_path / "m.safetensors", transform=third)
    # written as data, the same split is a mismatch in the plan already
    (row,) = tg.load_plan(
        {"w": np.zeros((1, 6), np.float32)}, tmp_path / "m.safetensors", transform=[("w", "split(3, 0)")]
    ).rows
    assert row.status == "mismatch"


def test_edge_cases_of_transforms_written_as_data(tmp_path, capsys):
    # a scalar has no axis 0
    ((_, squeeze),) = parse_transforms([("w", "squeeze(0)")])
    assert output_meta(squeeze, (), np.float32) == "squeeze(0): axis 0 is out of range for 0 dimensions"
    # concat promotes as the plan predicts (JAX's rules): int32 + float32 is float32
    mixed = {"a": np.ones(2, np.int32), "b": np.ones(2, np.float32)}
    model, _ = tg.load(
        {"w": np.zeros(4, np.float32)}, mixed, rename=[("a", "w"), ("b", "w")], transform=[("w", "concat(0)")]
    )
    assert model["w"].dtype == np.float32
    # 64-bit tensors stay 64-bit, bit for bit, whether JAX's x64 mode is on or not
    wide = {"a": np.array([1 / 3, 2 / 3]), "b": np.array([np.pi])}
    for how, leaf in (("concat(0)", np.zeros(3)), ("stack(0)", None)):
        if leaf is None:
            wide, leaf = {"a": wide["a"], "b": wide["a"][::-1].copy()}, np.zeros((2, 2))
        rules = dict(rename=[("a", "w"), ("b", "w")], transform=[("w", how)])
        model, _ = tg.load({"w": leaf}, wide, **rules)
        joined = (
            np.concatenate(list(wide.values())) if how.startswith("concat") else np.stack(list(wide.values()))
        )
        assert model["w"].dtype == np.float64 and np.array_equal(model["w"], joined)
    # the dtype policy after a combining chain
    halves = {"a": np.ones(2, np.float16), "b": np.ones(2, np.float16)}
    model, _ = tg.load(
        {"w": np.zeros(4, np.float32)},
        halves,
        rename=[("a", "w"), ("b", "w")],
        transform=[("w", ("concat(0)",))],
        cast=True,
    )
    assert model["w"].dtype == np.float32
    with pytest.raises(
        ValueError,
        match=r"transform\[0\]: concat and stack take the tensors renamed onto a leaf, so they come first",
    ):
        parse_transforms([("w", ("transpose", "stack(0)"))])
    with pytest.raises(ValueError, match=r"unknown transform 'O'"):
        parse_transforms([("w", "O")])
    # on the command line, a transform's own "=" (axis=1) is not the pattern's
    tg.save(tmp_path / "m.safetensors", {"w": np.ones((2, 6), np.float32)})
    np.savez(tmp_path / "model.npz", w=np.zeros((2, 2), np.float32))
    assert (
        load_plan_command(
            tmp_path / "model.npz", tmp_path / "m.safetensors", "--transform", "w=split(3, 0, axis=1)"
        )
        == 0
    )
    assert "via split(3, 0, axis=1)" in capsys.readouterr().out


def test_a_combining_transform_first_in_a_nested_tuple_still_combines():
    transform = [("*.qkv", (("concat(0)", "transpose"),))]
    target = {"blocks": [{"qkv": np.zeros((4, 6), np.float32)}] * 2}
    model, _ = tg.load(target, SEPARATE, rename=ONE_RULE_EACH, transform=transform)
    np.testing.assert_array_equal(model["blocks"][0]["qkv"], np.concatenate([Q, K, V]).T)


def test_a_function_of_jax_arrays_only_is_checked_by_tracing_it():
    # NumPy arrays have no `.at`: the NumPy stand-in fails, JAX's abstract trace gives the shape.
    def set_first(w):
        return w.at[0].set(1)

    assert output_meta(set_first, (2, 3), np.float32) == ((2, 3), jnp.dtype(np.float32))
    # A 64-bit tensor is not traced without x64 (JAX would narrow it): NumPy's failure stays.
    assert "AttributeError" in output_meta(set_first, (2, 3), np.float64)
