"""Rename rules on their own: how a glob rule finds what it renames, and its messages.

The rules in use (loading GPT-2 and timm names, export) are tested in test_transfer.py
and test_export.py; these pin the matcher's corners that those leave open.
"""

import re

import pytest

import treeglob as tg
from treeglob._checkpoints.rename import apply_renames, parse_renames
from treeglob._core.keys import quote


def renamed(rule, name):
    """The names one rule gives `name` (itself where the rule does not match it)."""
    return [new for new, _ in apply_renames([name], parse_renames([rule]), caller="load", strict=False)[name]]


@pytest.mark.parametrize(
    "rule, name, expected",
    [
        # `**` reaches forward from where the glob stands, never back to an earlier segment.
        (("a.**.x.**", "z"), "x.a.y", ["x.a.y"]),
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
def test_a_glob_rule_renames(rule, name, expected):
    assert renamed(rule, name) == expected


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
