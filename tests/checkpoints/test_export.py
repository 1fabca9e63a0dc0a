"""Export under a checkpoint's names: `save` with the load rules, undone."""

import gc
import re
import weakref
from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import treeglob as tg
from treeglob._checkpoints import transfer
from treeglob._checkpoints.rename import most_renamed, parse_renames, undo_renames

GPT2_RENAMES = [
    ("^transformer.h", "blocks"),
    ("^transformer.wte", "embed"),
    ("blocks.{i}.ln_{n}", "blocks.{i}.ln{n}"),
    ("mlp.c_fc", "fc"),
    ("attn.c_attn", ("attn.q", "attn.k", "attn.v")),
]


@pytest.mark.parametrize(
    "rules, path, names",
    [
        # Each rule undone, the last first; a name that a rule would rename is written as its source.
        (GPT2_RENAMES, "blocks.0.ln1.weight", ["transformer.h.0.ln_1.weight"]),
        (GPT2_RENAMES, "blocks.11.fc.bias", ["transformer.h.11.mlp.c_fc.bias"]),
        (GPT2_RENAMES, "embed.weight", ["transformer.wte.weight"]),
        # One of a fan-out's replacements.
        (GPT2_RENAMES, "blocks.2.attn.k.weight", ["transformer.h.2.attn.c_attn.weight"]),
        # No rule writes it: the path itself.
        (GPT2_RENAMES, "head.weight", ["head.weight"]),
        # Anchored at the start only: `^transformer.h` cannot have written a later `blocks`.
        (GPT2_RENAMES, "x.blocks.0.w", ["x.blocks.0.w"]),
        # An empty replacement: the dropped prefix is written back.
        ([("^model", "")], "layers.0.w", ["model.layers.0.w"]),
        # A capture inside a segment.
        ([("layer{n}", "blocks.{n}")], "enc.blocks.3.w", ["enc.layer3.w"]),
        # Several rules onto one path (concat/stack's tensors), each undone.
        (
            [("q_proj", "qkv"), ("k_proj", "qkv")],
            "h.0.qkv",
            ["h.0.q_proj", "h.0.k_proj"],
        ),
        # A quoted segment stays one segment.
        ([("^a", "b")], 'b."c.d"', ['a."c.d"']),
        # Anchored at the end: the `$` is no part of the name written back.
        ([("ln_{n}$", "ln{n}")], "blocks.0.ln1", ["blocks.0.ln_1"]),
        ([("ln_{n}$", "ln{n}")], "ln1.w", ["ln1.w"]),
        ([("^h.{i}$", "b{i}")], "b3", ["h.3"]),
        ([("^h.{i}$", "b{i}")], "x.b3", ["x.b3"]),
        # Found but not verified: `a.a.c` would become `b.a.c` (the leftmost `a`), and
        # `a.b.c` itself would be renamed. No name of the checkpoint can become `a.b.c`.
        ([("a.{x}", "b.{x}")], "a.b.c", []),
    ],
)
def test_rename_rules_undone(rules, path, names):
    assert list(most_renamed(undo_renames(path, parse_renames(rules)))) == names


@pytest.mark.parametrize(
    "rule, message",
    [
        (("re:^h\\.", "blocks."), "a regex has no inverse; write it as a glob with {name} captures"),
        (
            ("h.*.ln", "norm"),
            re.escape(
                "its pattern 'h.*.ln' has wildcards, braces or escapes, so the names it stands for are not "
                "known; write the segments out, capturing what varies with {name}"
            ),
        ),
        (("h.{0..3}", "early"), "has wildcards, braces or escapes"),
        (
            ("h.{i}.w", "w"),
            "the replacement 'w' does not use each capture of the pattern exactly once, so what it "
            "matched cannot be written back \\(for 2: blocks.0.w, w\\)",
        ),
    ],
)
def test_a_rule_that_cannot_be_undone_says_why(tmp_path, rule, message):
    tree = {"blocks": [{"w": np.ones(2)}], "early": np.ones(1), "norm": np.ones(1), "w": np.ones(1)}
    with pytest.raises(ValueError, match=r"cannot be undone[\s\S]*" + message):
        tg.save(tmp_path / "x.safetensors", tree, rename=[rule], strict=False)
    assert not list(tmp_path.iterdir())  # nothing written


def test_fused_projections_are_joined_and_transposed_back(tmp_path):
    q, k, v = (np.arange(6, dtype=np.float32).reshape(2, 3) + 10 * i for i in range(3))
    model = {"attn": {"q": q, "k": k, "v": v}}
    rules = dict(
        rename=[("c_attn", ("attn.q", "attn.k", "attn.v"))],
        transform=[(f"attn.{n}", (f"split(3, {i}, axis=-1)", "transpose")) for i, n in enumerate("qkv")],
    )
    assert tg.save(tmp_path / "x.safetensors", model, **rules) == ["c_attn"]
    np.testing.assert_array_equal(
        load_file(tmp_path / "x.safetensors")["c_attn"], np.concatenate([q.T, k.T, v.T], 1)
    )
    back, report = tg.load(
        {"attn": {n: np.zeros((2, 3), np.float32) for n in "qkv"}}, tmp_path / "x.safetensors", **rules
    )
    for n, want in zip("qkv", (q, k, v), strict=True):
        np.testing.assert_array_equal(back["attn"][n], want)


@pytest.mark.parametrize(
    "transform, leaf, tensors",
    [
        # concat with its sizes: unequal parts (grouped-query attention).
        (
            "concat(0, sizes=(4, 2, 2))",
            np.arange(16, dtype=np.float32).reshape(8, 2),
            {"q": (4, 2), "k": (2, 2), "v": (2, 2)},
        ),
        # stack: one tensor per index of the axis.
        (
            "stack(1)",
            np.arange(12, dtype=np.float32).reshape(2, 3, 2),
            {"q": (2, 2), "k": (2, 2), "v": (2, 2)},
        ),
        # a combined leaf transformed after: undone before it is split.
        (
            ("concat(1, sizes=(1, 1, 1))", "transpose"),
            np.arange(6, dtype=np.float32).reshape(3, 2),
            {"q": (2, 1), "k": (2, 1), "v": (2, 1)},
        ),
    ],
)
def test_a_combined_leaf_is_split_into_its_tensors(tmp_path, transform, leaf, tensors):
    rename = [(f"{n}_proj", "qkv") for n in "qkv"]
    rules = dict(rename=rename, transform=[("qkv", transform)])
    names = tg.save(tmp_path / "x.safetensors", {"qkv": leaf}, **rules)
    written = load_file(tmp_path / "x.safetensors")
    assert names == [f"{n}_proj" for n in "qkv"]
    assert {n[0]: a.shape for n, a in written.items()} == tensors
    back, _ = tg.load({"qkv": np.zeros_like(leaf)}, written, **rules)
    np.testing.assert_array_equal(back["qkv"], leaf)


def test_squeeze_expand_and_casts_are_undone(tmp_path):
    model = {"a": np.ones((3,), np.float32), "b": np.ones((1, 3), np.float32), "c": jnp.ones(2, jnp.float32)}
    rules = dict(transform=[("a", "squeeze(0)"), ("b", "expand(0)"), ("c", "float32")])
    tg.save(tmp_path / "x.safetensors", model, **rules)
    written = load_file(tmp_path / "x.safetensors")
    assert {n: (a.shape, a.dtype) for n, a in written.items()} == {
        "a": ((1, 3), np.float32),
        "b": ((3,), np.float32),
        "c": ((2,), np.float32),  # a cast writes the model's dtype
    }


def test_a_split_with_a_part_missing_from_the_model_is_refused(tmp_path):
    rules = dict(
        rename=[("c_attn", ("q", "k", "v"))],
        transform=[("q", "split(3, 0)"), ("k", "split(3, 1)"), ("v", "split(3, 2)")],
    )
    with pytest.raises(
        ValueError,
        match=r"c_attn: parts 1, 2 come from no leaf of the model, of its split into 3 \(part 0: q\)",
    ):
        tg.save(tmp_path / "x.safetensors", {"q": np.ones(2)}, strict=False, **rules)


@pytest.mark.parametrize(
    "rules, message",
    [
        (
            dict(transform=[("w", lambda x: x.T)]),
            r"w: transform\[0\] \(<lambda>\): the function <lambda> has no inverse",
        ),
        (
            dict(transform=[("w", "reshape(4)")]),
            r"reshape\(4\) cannot be undone: the checkpoint tensor's shape",
        ),
        (
            dict(rename=[(f"{n}_proj", "w") for n in "ab"], transform=[("w", "concat(0)")]),
            r"concat\(axis=0\) cannot be split back without the sizes of its tensors: write "
            r"concat\(axis=0, sizes=\(\.\.\.\)\)",
        ),
        (
            dict(rename=[(f"{n}_proj", "w") for n in "ab"], transform=[("w", "concat(0, sizes=(1, 2))")]),
            r"2 sizes adding up to 3, but .* its axis 0 has size 2",
        ),
        (
            dict(rename=[(f"{n}_proj", "w") for n in "abc"], transform=[("w", "stack(0)")]),
            r"stack\(axis=0\) stacks 2 tensors, but the rules rename 3 into it",
        ),
        (
            dict(rename=[(f"{n}_proj", "w") for n in "ab"], transform=[("w", "concat(2, sizes=(1, 1))")]),
            r"w: concat\(axis=2, sizes=\(1, 1\)\): axis 2 is out of range for 2 dimensions",
        ),
        (
            dict(rename=[(f"{n}_proj", "w") for n in "ab"], transform=[("w", "stack(-4)")]),
            r"w: stack\(axis=-4\): axis -4 is out of range for 2 dimensions",
        ),
    ],
)
def test_transforms_that_cannot_be_undone(tmp_path, rules, message):
    with pytest.raises(ValueError, match=message):
        tg.save(tmp_path / "x.safetensors", {"w": np.ones((2, 2), np.float32)}, **rules)


def test_a_tensor_two_leaves_would_write_is_refused(tmp_path):
    # `a` is loaded into part 0 of the concatenated `w` and, tied, into `t`.
    rules = dict(rename=[("a", ("w", "t")), ("b", "w")], transform=[("w", "concat(0, sizes=(1, 1))")])
    with pytest.raises(ValueError, match=r"cannot be undone for 1 tensor:\n    a: written from both w, t\n"):
        tg.save(tmp_path / "x.safetensors", {"w": np.arange(2.0), "t": np.zeros(1)}, **rules)
    assert not list(tmp_path.iterdir())


def test_a_combined_leaf_is_read_once_for_all_its_tensors(tmp_path, monkeypatch):
    # The leaf is read when its first tensor is written, and let go after its last:
    # a fused projection of a large model is neither read three times nor kept.
    reads, held, planned = Counter(), [], []
    plan = transfer.plan_export

    def plan_and_keep(view, rows, renames, transforms, chosen, value, *rest):
        def counted(row):
            reads[view.paths[row]] += 1
            array = np.array(value(row))  # a copy of its own, to see when it is let go
            held.append(weakref.ref(array))
            return array

        tensors, expected = plan(view, rows, renames, transforms, chosen, counted, *rest)
        planned.append(tensors)
        return tensors, expected

    monkeypatch.setattr(transfer, "plan_export", plan_and_keep)
    rename = [(f"{n}_proj", "qkv") for n in "qkv"]
    for transform, leaf, join in [
        ("concat(0, sizes=(4, 2, 2))", np.arange(16, dtype=np.float32).reshape(8, 2), np.concatenate),
        ("stack(1)", np.arange(12, dtype=np.float32).reshape(2, 3, 2), lambda xs: np.stack(xs, 1)),
    ]:
        reads.clear()
        tg.save(
            tmp_path / "x.safetensors",
            {"qkv": leaf, "w": np.ones(2)},
            rename=rename,
            transform=[("qkv", transform)],
        )
        assert reads == {"qkv": 1, "w": 1}
        pieces = [t for t in planned[-1] if t.name.endswith("_proj")]
        held.clear()
        assert np.array_equal(join([t.make() for t in pieces]), leaf)
        gc.collect()
        assert len(held) == 1 and held[0]() is None  # let go after the last piece
        # Made in another order, the pieces are still right.
        assert np.array_equal(join([t.make() for t in reversed(pieces)][::-1]), leaf)


def test_a_path_two_names_could_be_written_as_is_refused(tmp_path):
    # Either name renames into `w`: which the checkpoint has is not known.
    with pytest.raises(ValueError, match=r"w: the rename rules turn each of 'a', 'b' into it"):
        tg.save(tmp_path / "x.safetensors", {"w": np.ones(2)}, rename=[("a", "w"), ("b", "w")])


def test_tied_leaves_are_one_tensor_if_they_hold_the_same_values(tmp_path):
    rules = dict(rename=[("wte", ("embed", "head"))])
    same = {"embed": np.ones(2), "head": np.ones(2)}
    assert tg.save(tmp_path / "x.safetensors", same, **rules) == ["wte"]
    with pytest.raises(
        ValueError, match=r"wte: embed and head are both written as it, but their values differ"
    ):
        tg.save(tmp_path / "y.safetensors", {"embed": np.ones(2), "head": np.zeros(2)}, **rules)
    assert not (tmp_path / "y.safetensors").exists()
    # NaN is equal to NaN here: the same array tied twice.
    nan = np.array([np.nan, 1.0])
    assert tg.save(tmp_path / "z.safetensors", {"embed": nan, "head": nan}, **rules) == ["wte"]
    # Compared before any shard is written: an earlier export stays whole.
    big = dict(a=np.zeros(100, np.float32), embed=np.ones(100, np.float32), head=np.ones(100, np.float32))
    (tmp_path / "s").mkdir()
    tg.save(tmp_path / "s" / "model.safetensors", big, max_shard_size=400, **rules)
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    changed = dict(big, a=np.full(100, 7, np.float32), head=np.full(100, 3, np.float32))
    with pytest.raises(ValueError, match="their values differ"):
        tg.save(tmp_path / "s" / "model.safetensors", changed, max_shard_size=400, **rules)
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before


def test_a_path_the_rules_rename_away_is_named_with_the_fix(tmp_path):
    with pytest.raises(
        ValueError, match=r"b: no checkpoint name becomes it: the rules rename the path itself; skip"
    ):
        tg.save(tmp_path / "x.safetensors", {"a": np.ones(2), "b": np.ones(2)}, rename=[("b", "a")])
    # a split on a scalar is an error naming the axis, not a ZeroDivisionError
    rules = dict(rename=[("qk", ("q", "k"))], transform=[("q", "split(2, 0)"), ("k", "split(2, 1)")])
    with pytest.raises(ValueError, match=r"axis 0 is out of range for 0 dimensions"):
        tg.save(tmp_path / "x.safetensors", {"q": np.float32(1), "k": np.float32(2)}, strict=False, **rules)


def test_skip_leaves_new_leaves_out_and_select_writes_a_part(tmp_path):
    model = {"blocks": [{"w": np.ones(2)}], "new_head": np.ones(3)}
    rules = dict(rename=[("^h", "blocks")], skip=["new_head"])
    assert tg.save(tmp_path / "x.safetensors", model, **rules) == ["h.0.w"]
    with pytest.raises(tg.NoMatchError, match=r"skip list given to save\(\)"):
        tg.save(tmp_path / "x.safetensors", model, skip=["new_haed"])
    message = (
        "save(): rename rule 1 ('^lm_head' -> 'head') writes none of the 2 model paths saved (its replacement "
        "matches none of them). Remove the rule, or fix it; pass strict=False to allow rules that match nothing."
    )
    with pytest.raises(tg.NoMatchError, match=f"^{re.escape(message)}$"):
        tg.save(tmp_path / "x.safetensors", model, rename=[("^h", "blocks"), ("^lm_head", "head")])
    assert tg.save(tmp_path / "x.safetensors", model, select="blocks", rename=[("^h", "blocks")]) == ["h.0.w"]


def test_an_export_the_rules_would_not_load_back_is_not_written(tmp_path):
    # `ignore` drops the tensor that `blocks.0.w` is written as: it would not load back.
    with pytest.raises(
        ValueError,
        match=r"would not load the export back into the model:\n    blocks.0.w: written as h.0.w, "
        r"but the rules find no tensor for it\n[\s\S]*Nothing was written",
    ):
        tg.save(
            tmp_path / "x.safetensors",
            {"blocks": [{"w": np.ones(2)}]},
            rename=[("^h", "blocks")],
            ignore=["h.0.w"],
        )
    assert not list(tmp_path.iterdir())


def test_a_stacked_model_exports_one_tensor_per_layer_under_the_checkpoint_names(tmp_path):
    model = {"blocks": {"w": np.arange(6, dtype=np.float32).reshape(3, 2)}}
    names = tg.save(tmp_path / "x.safetensors", model, rename=[("^h", "blocks")], stacked={"blocks": 1})
    assert names == ["h.0.w", "h.1.w", "h.2.w"]
    list_model = {"blocks": [{"w": np.zeros(2, np.float32)} for _ in range(3)]}
    back, _ = tg.load(list_model, tmp_path / "x.safetensors", rename=[("^h", "blocks")])
    np.testing.assert_array_equal(back["blocks"][2]["w"], [4, 5])


def test_like_writes_the_names_and_layouts_of_the_checkpoint_it_names(tmp_path):
    # ("gamma", "weight") is Hugging Face's BERT key fix: a norm's gamma is the model's weight,
    # but a dense layer's weight was "weight" all along. The rules alone cannot tell them apart.
    ckpt = {
        "enc.LayerNorm.gamma": np.ones(2, np.float32),
        "enc.dense.weight": np.ones((2, 2), np.float32),
    }
    rules = dict(rename=[("gamma", "weight")])
    model, _ = tg.load(
        {
            "enc": {
                "LayerNorm": {"weight": np.zeros(2, np.float32)},
                "dense": {"weight": np.zeros((2, 2), np.float32)},
            }
        },
        ckpt,
        **rules,
    )
    assert tg.save(tmp_path / "x.safetensors", model, **rules) == ["enc.LayerNorm.gamma", "enc.dense.gamma"]
    assert tg.save(tmp_path / "x.safetensors", model, like=ckpt, **rules) == [
        "enc.LayerNorm.gamma",
        "enc.dense.weight",
    ]
    wrong = dict(ckpt, **{"enc.dense.weight": np.ones((2, 3), np.float32)})
    with pytest.raises(
        ValueError,
        match=r"enc.dense.weight: written as float32\(2, 2\), which the source tree holds as float32\(2, 3\)",
    ):
        tg.save(tmp_path / "x.safetensors", model, like=wrong, **rules)
    with pytest.raises(
        ValueError,
        match=r"enc.dense.weight: none of the names the rules turn into it \(enc.dense.gamma, enc.dense.weight\) is in",
    ):
        tg.save(
            tmp_path / "x.safetensors", model, like={"enc.LayerNorm.gamma": np.ones(2, np.float32)}, **rules
        )


def test_a_rule_that_cannot_be_undone_stops_only_the_paths_it_could_have_written(tmp_path):
    model = {"w": np.ones(2), "head": np.ones(2)}
    # The regex writes "head": "w" passes it by; "head" is skipped.
    assert tg.save(tmp_path / "x.safetensors", model, rename=[("re:^lm_head$", "head")], skip=["head"]) == [
        "w"
    ]
    with pytest.raises(ValueError, match=r"head: rename rule 0 .* cannot be undone: a regex has no inverse"):
        tg.save(tmp_path / "x.safetensors", model, rename=[("re:^lm_head$", "head")])


def test_rules_for_leaves_left_out_are_not_typos(tmp_path):
    # The fine-tuning case: the checkpoint's head is renamed onto a new head that is skipped.
    rules = dict(rename=[("^h", "blocks"), ("^lm_head", "head")], skip=["head"])
    model = {"blocks": [{"w": np.ones(2)}], "head": np.ones(5)}
    assert tg.save(tmp_path / "x.safetensors", model, **rules) == ["h.0.w"]
    assert tg.save(tmp_path / "x.safetensors", model, select="blocks", rename=rules["rename"]) == ["h.0.w"]


def test_ignore_alone_refuses_to_write_what_the_rules_would_drop(tmp_path):
    with pytest.raises(ValueError, match=r"head: written, but the rules load it into nothing"):
        tg.save(tmp_path / "x.safetensors", {"w": np.ones(2), "head": np.ones(3)}, ignore=["head"])


def test_nested_tuples_of_transforms_are_undone_step_by_step(tmp_path):
    rules = dict(transform=[("w", (("transpose", "float32"), "expand(0)"))])
    model = {"w": np.arange(6, dtype=np.float32).reshape(1, 3, 2)}
    tg.save(tmp_path / "x.safetensors", model, **rules)
    assert load_file(tmp_path / "x.safetensors")["w"].shape == (2, 3)
    back, _ = tg.load({"w": np.zeros((1, 3, 2), np.float32)}, tmp_path / "x.safetensors", **rules)
    np.testing.assert_array_equal(back["w"], model["w"])


def test_a_rule_that_cannot_be_undone_stops_a_path_only_with_all_its_literal_pieces(tmp_path):
    # "blocks.0.bias" holds "blocks." but not ".weight": the regex cannot have written it.
    model = {"blocks": [{"bias": np.ones(2)}]}
    rule = (r"re:^layer(\d+)$", "blocks.{1}.weight")
    assert tg.save(tmp_path / "x.safetensors", model, rename=[rule], strict=False) == ["blocks.0.bias"]


@pytest.mark.parametrize(
    "rule, shown",
    [
        (("nothing", ("a", "b")), "rename rule 0 ('nothing' -> ('a', 'b'))"),
        ((re.compile("nothing", re.I), "a"), "rename rule 0 (re.compile('nothing', re.IGNORECASE) -> 'a')"),
    ],
)
def test_a_rule_is_named_with_every_replacement_and_a_compiled_regex_with_its_flags(tmp_path, rule, shown):
    checkpoint = tmp_path / "c.safetensors"
    tg.save(checkpoint, {"w": np.ones(2)})
    with pytest.raises(tg.NoMatchError, match=re.escape(shown) + " matches no checkpoint name"):
        tg.load_plan({"w": np.ones(2)}, checkpoint, rename=[rule])


def test_a_regex_group_that_took_part_in_no_match_writes_nothing(tmp_path):
    checkpoint = tmp_path / "c.safetensors"
    tg.save(checkpoint, {"b": np.ones(2)})
    model, report = tg.load({"xy": np.zeros(2)}, checkpoint, rename=[("re:(a)?b", "x{1}y")])
    assert report.ok and model["xy"].tolist() == [1.0, 1.0]


def test_a_replacement_field_the_pattern_does_not_capture_lists_the_captures(tmp_path):
    checkpoint = tmp_path / "c.safetensors"
    tg.save(checkpoint, {"h": [{"ln_1": np.ones(2)}]})
    with pytest.raises(
        ValueError,
        match=re.escape(
            "rename rule 0 ('h.{i}.ln_{n}' -> 'b.{j}'): the replacement uses {j}, which the pattern does "
            "not capture (captures: {i}, {n})."
        ),
    ):
        tg.load_plan({"b": [np.ones(2)]}, checkpoint, rename=[("h.{i}.ln_{n}", "b.{j}")])
