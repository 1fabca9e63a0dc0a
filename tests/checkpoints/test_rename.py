"""Rename rules on their own: what a rule renames, in what order rules apply, and their messages.

Rules at work (loading GPT-2 and timm checkpoints, export) are tested in test_transfer.py
and test_export.py.
"""

import re

import pytest

import treeglob as tg
from treeglob._checkpoints.rename import apply_renames, parse_renames
from treeglob._core.keys import quote


@pytest.mark.parametrize(
    "rule, name, expected",
    [
        # A glob replaces the segments it matches, wherever they are.
        (("c_attn", "qkv"), "h.0.attn.c_attn.weight", ["h.0.attn.qkv.weight"]),
        (("attn.c_attn", "mixer"), "h.0.attn.c_attn.bias", ["h.0.mixer.bias"]),
        # Only whole segments: "c_attn" does not match inside "xc_attn".
        (("c_attn", "qkv"), "h.0.xc_attn.weight", None),
        # Anchors.
        (("^transformer", "model"), "transformer.h.0.w", ["model.h.0.w"]),
        (("^h", "blocks"), "transformer.h.0.w", None),
        (("weight$", "kernel"), "h.0.weight", ["h.0.kernel"]),
        (("weight$", "kernel"), "h.weight.0", None),
        # An empty replacement drops the matched segments.
        (("^transformer", ""), "transformer.h.0.w", ["h.0.w"]),
        (("attn", ""), "h.0.attn.w", ["h.0.w"]),
        # Captures: a whole segment, or part of one.
        (("h.{i}.attn", "blocks.{i}.mixer"), "transformer.h.11.attn.w", ["transformer.blocks.11.mixer.w"]),
        (("layer{n}", "blocks.{n}"), "enc.layer3.w", ["enc.blocks.3.w"]),
        (("h.{i}.{part}.weight", "{part}{i}"), "h.2.mlp.weight", ["mlp2"]),
        # Globs, braces and ranges inside the pattern.
        (("h.*.ln_{1,2}", "norm"), "h.0.ln_2.weight", ["norm.weight"]),
        (("h.{0..3}", "early"), "h.3.w", ["early.w"]),
        (("h.{0..3}", "early"), "h.4.w", None),
        (("**.bias", "b"), "a.b.bias", ["b"]),
        # Fan-out: one tensor to several paths.
        (("c_attn", ("q", "k", "v")), "h.0.c_attn.weight", ["h.0.q.weight", "h.0.k.weight", "h.0.v.weight"]),
        # Regexes replace their first match; groups by name or number.
        (("re:^transformer\\.", ""), "transformer.h.0.w", ["h.0.w"]),
        ((r"re:h\.(\d+)", "blocks.{1}"), "x.h.7.w", ["x.blocks.7.w"]),
        ((r"re:h\.(?P<i>\d+)", "blocks.{i}"), "x.h.7.w", ["x.blocks.7.w"]),
        ((re.compile(r"ln_(\d)"), "norm{1}"), "h.0.ln_1.w", ["h.0.norm1.w"]),
        ((r"re:zzz", "y"), "h.0.w", None),
        # Which part a rule changes.
        (("h", "blocks"), "h.0.h.w", ["blocks.0.h.w"]),  # the leftmost match
        (("a.**.c", "x"), "a.b.c.d.c.w", ["x.w"]),  # ** takes as much as it can
        (("^h", "blocks"), "th.10.w", None),  # whole segments only
        ((r"re:h\.(\d+)", "blocks.{1}"), "th.10.w", ["tblocks.10.w"]),  # re.search: anchor with ^
        ((r"re:^h\.(\d+)", "blocks.{1}"), "th.10.w", None),
        # `**` reaches forward from where the glob stands, never back to an earlier segment.
        (("a.**.x.**", "z"), "x.a.y", None),
        (("a.**.x.**", "z"), "a.y.x", ["z"]),
        # `**` may match no segment at all, at the start of the glob too.
        (("**.b", "c"), "b", ["c"]),
        (("a.**.b", "c"), "a.b", ["c"]),
        # Brace alternatives spanning segments: the one that matches, as long as it can...
        (("{attn.q,q}.w", "wq"), "attn.q.w", ["wq"]),
        (("{attn.q,q}.w", "wq"), "x.q.w", ["x.wq"]),
        # ... and the first of those that end alike, which decides the captures.
        (("{a.b,a}.{x}.**", "y.{x}"), "a.b.c", ["y.c"]),
        (("{a,a.b}.{x}.**", "y.{x}"), "a.b.c", ["y.b"]),
        # A capture beside a wildcard in one segment.
        (("blk{i}_*.w", "blocks.{i}.w"), "blk3_a.w", ["blocks.3.w"]),
        (("blk?{i}.w", "blocks.{i}.w"), "blkx12.w", ["blocks.12.w"]),
        # A capture takes any character of its segment, a newline too.
        (("h.{x}", "k.{x}"), "h." + quote("a\nb"), ["k." + quote("a\nb")]),
    ],
)
def test_rename_rule(rule, name, expected):
    (parsed,) = parse_renames([rule])
    assert parsed.apply(name) == expected


def test_rename_rules_chain_in_order():
    rules = parse_renames(
        [("^transformer.h", "blocks"), ("blocks.{i}.ln_1", "blocks.{i}.ln1"), ("ln1", "norm")]
    )
    out = apply_renames(["transformer.h.0.ln_1.weight", "lm_head.weight"], rules, caller="load")
    assert out == {  # each name's new names, with the rules that changed it on the way
        "transformer.h.0.ln_1.weight": [("blocks.0.norm.weight", (0, 1, 2))],
        "lm_head.weight": [("lm_head.weight", ())],
    }


def test_rename_accepts_a_dict_in_order():
    rules = parse_renames({"a": "b", "b": "c"})
    assert apply_renames(["a.w"], rules, caller="load") == {"a.w": [("c.w", (0, 1))]}


@pytest.mark.parametrize(
    "rename, error, message",
    [
        ("h=blocks", TypeError, r"rename must be a list of \(pattern, replacement\) pairs"),
        ([("h",)], TypeError, r"rename\[0\] must be a \(pattern, replacement\) pair"),
        ([("h", 3)], TypeError, r"rename\[0\]: the replacement must be a str"),
        ([("h", ())], TypeError, r"rename\[0\]: the replacement must be a str"),
        ([(3, "x")], TypeError, r"rename\[0\]: the pattern must be a glob str"),
        (
            [("h.{i}", "blocks.{j}")],
            ValueError,
            r"uses \{j\}, which the pattern does not capture \(captures: \{i\}\)",
        ),
        ([("h.{i}.{i}", "x")], ValueError, r"captures \{i\} twice"),
        ([(r"re:h\.(\d+)", "blocks.{2}")], ValueError, r"uses \{2\}, which the pattern does not capture"),
        ([("h.{i}.a{", "x")], ValueError, r"Invalid pattern 'h.\{i\}.a\{' at position 7"),
        ([("re:h(", "x")], ValueError, r"h\("),
    ],
)
def test_bad_rename_rules(rename, error, message):
    with pytest.raises(error, match=message):
        parse_renames(rename)


def test_a_rename_rule_that_matches_nothing_is_an_error_with_close_matches():
    rules = parse_renames([("^transformer.h", "blocks"), ("ln_f", "norm")])
    with pytest.raises(
        tg.NoMatchError, match=r"rename rule 1 \('ln_f' -> 'norm'\) matches no checkpoint name"
    ):
        apply_renames(["transformer.h.0.w", "transformer.lnf.weight"], rules, caller="load")
    rules = parse_renames([("transformer.ln_g", "norm")])
    with pytest.raises(tg.NoMatchError, match=r"Close matches: transformer.ln_f"):
        apply_renames(["transformer.ln_f"], rules, caller="load")
    assert apply_renames(["a"], rules, caller="load", strict=False) == {"a": [("a", ())]}


@pytest.mark.parametrize(
    "pattern",
    ["{a,{i}}.w", "{a.b,{i}}.w", "h{a,{i}}.w", "h.{a,b{i}}"],
)
def test_a_capture_inside_braces_is_refused(pattern):
    # Before, these parsed: one alternative matched without the capture and the
    # replacement failed with a KeyError, or the capture's alternative never matched.
    message = (
        f"rename pattern {pattern!r}: a capture cannot stand inside braces; capture the "
        "segment, or write one rule per alternative."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_renames([(pattern, "y.{i}")])


@pytest.mark.parametrize(
    "rule, key, captures",
    [
        # Every field of the replacement is checked, after a good one too.
        (("h.{i}", "{i}.{bad}"), "bad", "{i}"),
        ((r"re:h\.(\d+)", "{1}.{bad}"), "bad", "none"),
        (("h.{i}.{j}", "{i}{k}"), "k", "{i}, {j}"),
        (("h.w", "{k}"), "k", "none"),
    ],
)
def test_a_replacement_field_the_pattern_does_not_capture(rule, key, captures):
    message = (
        f"rename rule 0 ({rule[0]!r} -> {rule[1]!r}): the replacement uses {{{key}}}, which the "
        f"pattern does not capture (captures: {captures}). In a glob, capture a segment with "
        "{name}, e.g. 'h.{i}.attn'."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_renames([rule])


@pytest.mark.parametrize(
    "pattern, names, close",
    [
        # The text compared is the pattern's without its anchors, a capture read as `0`,
        # a regex without its `re:`: each of those would make a short pattern too far.
        ("^transformer.h.{i}.attnn$", ["transformer.h.0.attn", "lm_head.weight"], "transformer.h.0.attn"),
        ("^fcc$", ["fc.w", "y"], "fc"),
        ("ln{i}x", ["ln0.w", "y"], "ln0"),
        ("re:fcc", ["fc.w", "y"], "fc"),
        ("Xq", ["Xqq.w", "y"], "Xqq"),
    ],
)
def test_a_rule_that_matches_nothing_names_close_matches(pattern, names, close):
    with pytest.raises(tg.NoMatchError, match=re.escape(f"Close matches: {close}.")):
        apply_renames(names, parse_renames([(pattern, "q")]), caller="load")
