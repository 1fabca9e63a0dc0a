"""Rules (SPEC §4): first match wins, strictness, defaults, labels of any leaf type, explain."""

import re
import warnings

import equinox as eqx
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import treeglob as tg

WD_RULES = [
    (tg.any_of("*.bias", eqx.nn.LayerNorm, eqx.nn.Embedding), "no_decay"),
    (tg.ndim >= 2, "decay"),
]


def test_first_match_wins(params):
    got = tg.labels(params, WD_RULES)
    flat = dict(zip(tg.paths(params), jax.tree.leaves(got), strict=True))
    assert flat["embed.weight"] == "no_decay"  # 2-D, but the exclusion comes first
    assert flat["blocks.0.ln1.weight"] == "no_decay"
    assert flat["blocks.1.attn.key_proj.weight"] == "decay"
    assert flat["head.bias"] == "no_decay"
    assert set(flat.values()) == {"decay", "no_decay"}


def test_labels_partition_the_tree(params):
    got = tg.labels(params, {"a": "blocks.0", "b": "blocks", "c": eqx.nn.Linear}, default="d")
    assert jax.tree.structure(got) == jax.tree.structure(params)
    flat = dict(zip(tg.paths(params), jax.tree.leaves(got), strict=True))
    for path, label in flat.items():
        expected = (
            "a"
            if path.startswith("blocks.0.")
            else "b"
            if path.startswith("blocks.")
            else "c"
            if path.startswith("head.")
            else "d"
        )
        assert label == expected, path
    # Each selector's mask equals "label == x" on the label tree.
    masks = {k: jax.tree.leaves(tg.mask(params, s)) for k, s in {"a": "blocks.0"}.items()}
    assert masks["a"] == [lab == "a" for lab in jax.tree.leaves(got)]


def test_labels_of_any_leaf_type(params):
    specs = tg.labels(params, [("*.weight" & (tg.ndim == 2), P(None, "model"))], default=P())
    flat = dict(
        zip(tg.paths(params), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)), strict=True)
    )
    assert flat["head.weight"] == P(None, "model")
    assert flat["head.bias"] == P()
    scales = tg.labels(params, [("blocks.0", 0.5), ("blocks.1", 0.75)], default=1.0)
    assert sorted(set(jax.tree.leaves(scales))) == [0.5, 0.75, 1.0]


@pytest.mark.parametrize("bad", [None, [1, 2], {"a": 1}])
def test_label_must_be_a_leaf(bad):
    with pytest.raises(TypeError, match=r"The label of rule 0 is .* would change the\s+structure"):
        tg.labels({"a": 1}, [("a", bad)])
    with pytest.raises(TypeError, match="The label of default is"):
        tg.labels({"a": 1}, [("a", "x")], default=bad)


def test_uncovered_leaves_are_listed(transformer):
    with pytest.raises(
        ValueError,
        match=r"(?s)8 of 39 leaves match no rule.*blocks\.0\.attn\.dropout\.p.*"
        r"eqx\.filter\(model, eqx\.is_array\)",
    ):
        tg.labels(transformer, WD_RULES)


HINT = (
    "Add a rule for them, pass default=<label>, or, if they are not parameters "
    "(activations, static values), filter them out first: eqx.filter(model, eqx.is_array)."
)


@pytest.mark.parametrize(
    "tree, listed",
    [
        # Up to 20 are listed, then a count of the rest.
        ({f"w{i:02d}": np.zeros(1) for i in range(20)}, [f"w{i:02d}" for i in range(20)]),
        (
            {f"w{i:02d}": np.zeros(1) for i in range(21)},
            [f"w{i:02d}" for i in range(20)] + ["... and 1 more"],
        ),
        # A bare array is the tree's root.
        (np.zeros(2), ["<root>"]),
    ],
)
def test_the_whole_message_for_uncovered_leaves(tree, listed):
    n = len(tree) if isinstance(tree, dict) else 1
    message = f"{n} of {n} leaves match no rule and no default label was given:\n"
    message += "".join(f"    {line}\n" for line in listed) + HINT
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        tg.labels(tree, [("zzz", "x")], strict=False)


def test_rule_matching_nothing_is_an_error_with_suggestions(params):
    with pytest.raises(
        tg.NoMatchError,
        match=r"(?s)The selector of rule 0 \(label 'no_decay'\) glob\('\*\.bais'\) "
        r"matches no leaf.*Close matches in the tree: bias\.",
    ):
        tg.labels(params, [("*.bais", "no_decay")], default="decay")
    assert issubclass(tg.NoMatchError, ValueError)


def test_negated_operand_matching_nothing_is_an_error(params):
    with pytest.raises(
        tg.NoMatchError,
        match=r"(?s)In rule 0 \(label 'decay'\), the right side of '-' "
        r"glob\('wtee'\) matches no leaf",
    ):
        tg.labels(params, [((tg.ndim >= 2) - "wtee", "decay")], default="no")
    with pytest.raises(
        tg.NoMatchError,
        match=r"The negated selector glob\('embedd'\) matches no leaf.*\n"
        r"Close matches in the tree: embed\.",
    ):
        tg.mask(params, ~tg.glob("embedd"))


def test_any_of_parts_may_match_nothing_unless_asked(params):
    shared_exclusions = tg.any_of("*.bias", "pos_embed", "cls_token")
    assert "no_decay" in jax.tree.leaves(tg.labels(params, [(shared_exclusions, "no_decay")], default="d"))
    with pytest.raises(
        tg.NoMatchError, match=r"A part of any_of\(..., require_each=True\) glob\('pos_embed'\)"
    ):
        tg.mask(params, tg.any_of("*.bias", "pos_embed", require_each=True))


def test_optional_rules_and_the_per_call_opt_out(params):
    rules = [(tg.optional("cls_token"), "frozen"), ("*.bias", "no_decay")]
    assert "frozen" not in jax.tree.leaves(tg.labels(params, rules, default="decay"))
    got = tg.labels(params, [("cls_token", "frozen")], default="decay", strict=False)
    assert set(jax.tree.leaves(got)) == {"decay"}
    assert tg.mask(params, (tg.ndim >= 2) - tg.optional("cls_token")) == tg.mask(params, tg.ndim >= 2)


def test_swapped_rule_pair_gets_a_hint(params):
    with pytest.raises(
        tg.NoMatchError, match=r"Its label '\*\.bias' does match paths: rules are \(selector, label\)"
    ):
        tg.labels(params, [("no_decay", "*.bias")], default="decay")


def test_shadowed_rule_warns(params):
    with pytest.warns(tg.ShadowedRuleWarning, match=r"rule 1 \(label 'no_decay'\) never decides a label"):
        tg.labels(params, [(tg.ndim >= 1, "decay"), ("*.bias", "no_decay")])
    assert issubclass(tg.ShadowedRuleWarning, UserWarning)


@pytest.mark.parametrize(
    "rules, message",
    [
        ("*.bias", r"got the single selector 'bias'|got the single selector '\*\.bias'"),
        ([("*.bias",)], r"rules\[0\] is \('\*\.bias',\); each rule is a \(selector, label\) pair"),
        (42, r"rules must be a dict \{label: selector\} or a list of \(selector, label\) pairs, got int"),
    ],
)
def test_malformed_rules(rules, message):
    with pytest.raises(TypeError, match=message):
        tg.labels({"a": 1}, rules)


def test_explain_report(params):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explain marks shadowed rules instead of warning
        report = tg.explain(params, WD_RULES + [("head", "never")], default="other")
    text = str(report)
    for path in tg.paths(params):
        assert path in text
    assert "(shadowed: earlier rules take all its leaves)" in text
    assert report.summary == {
        "no_decay": {"leaves": 18, "elements": 127},
        "decay": {"leaves": 13, "elements": 300},
    }
    row = next(r for r in report.rows if r.path == "head.weight")
    assert (row.shape, row.dtype, row.size, row.label, row.rule) == ((11, 4), "float32", 44, "decay", 1)
    data = report.to_dict()
    assert set(data) == {"leaves", "rules", "summary"}
    assert data["rules"][2] == {
        "index": 2,
        "label": "never",
        "selector": "glob('head')",
        "matched": 2,
        "decided": 0,
        "shadowed": True,
        "expanded": "",
    }
    header = text.splitlines()[0]
    assert header.split() == ["path", "shape", "dtype", "size", "label", "rule"]
    # The rows, the table and the data are the same columns.
    assert [leaf["path"] for leaf in data["leaves"]] == [r.path for r in report.rows] == tg.paths(params)
    assert data["leaves"][3] == {f: getattr(report.rows[3], f) for f in data["leaves"][3]}
    subset = [r for r in report.rows if r.label == "decay"]
    assert report.to_dict(rows=subset)["leaves"] == [dict(vars(r)) for r in subset]
    shown = report.format(rows=subset).split("\n\n")[0].splitlines()[1:]
    assert [line.split()[0] for line in shown] == [r.path for r in subset]


def test_explain_raises_like_labels(params):
    with pytest.raises(tg.NoMatchError):
        tg.explain(params, [("nothing_here", "x")], default="y")


def test_dict_rules_keep_insertion_order():
    tree = {"a": np.zeros(2), "b": np.zeros((2, 2))}
    assert tg.labels(tree, {"first": "b", "second": "**"}) == {"a": "second", "b": "first"}


def test_explain_summary_counts_a_label_shared_by_two_rules_once():
    tree = {"a": np.zeros(2), "b": np.zeros(3), "c": np.zeros(4)}
    report = tg.explain(tree, [("a", "x"), ("b", "x")], default="y")
    assert report.summary == {"x": {"leaves": 2, "elements": 5}, "y": {"leaves": 1, "elements": 4}}


def test_explain_summary_with_array_labels():
    label = np.array([1.0, 2.0])
    report = tg.explain({"a": np.zeros(2)}, [("a", label)])
    assert list(report.summary.values()) == [{"leaves": 1, "elements": 2}]


def test_a_report_with_types_from_is_filtered_by_type_and_colors_each_label():
    # A leaf named like a label (`decay`) is colored in the label column only.
    model = {
        "norm": eqx.nn.LayerNorm(2),
        "w": np.zeros((2, 2), np.float32),
        "decay": np.zeros((2, 2), np.float32),
    }
    params = {"norm": {"weight": model["norm"].weight, "bias": model["norm"].bias}, "w": model["w"]}
    params["decay"] = model["decay"]
    report = tg.explain(params, [(eqx.nn.LayerNorm, "no_decay")], default="decay", types_from=model)
    assert [row.path for row in report.filter(eqx.nn.LayerNorm).rows] == ["norm.bias", "norm.weight"]
    bold, green, yellow = (lambda s, code=code: f"\x1b[{code}m{s}\x1b[0m" for code in (1, 32, 33))
    assert report.format(color=True, width=100).splitlines()[1:] == [
        f"decay        (2, 2)  float32     4  {yellow('decay   ')}  default",
        f"norm.bias    (2,)    float32     2  {green('no_decay')}  0",
        f"norm.weight  (2,)    float32     2  {green('no_decay')}  0",
        f"w            (2, 2)  float32     4  {yellow('decay   ')}  default",
        "",
        "  ".join(bold(h) for h in ("rule", "label   ", "matched", "decided", "selector         ")),
        f"   0  {green('no_decay')}        2        2  inside(LayerNorm)",
        "",
        "  ".join(bold(h) for h in ("label   ", "leaves", "elements", "share")),
        f"{green('no_decay')}       2         4  33.3%",
        f"{yellow('decay   ')}       2         8  66.7%",
    ]
