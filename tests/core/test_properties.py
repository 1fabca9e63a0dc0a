"""Properties on trees and patterns nobody wrote by hand (hypothesis).

The glob matcher is checked against `reference_match`, a deliberately simple
implementation of SPEC section 2 written here: brace expansion, then
`fnmatch.fnmatchcase` per segment, `**` as any number of segments, and a
search over start positions.
"""

import fnmatch
import functools
import itertools
import re
import warnings
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
import pytest
from hypothesis import assume, example, given, strategies as st

import treeglob as tg
from treeglob._core.keys import key_text, quote, split_path
from treeglob._core.pattern import compile_glob
from treeglob._core.tree import TreeView

# ----------------------------------------------------------------------------
# Random PyTrees with awkward keys


class Pair(NamedTuple):
    left: Any
    right: Any


class Node(eqx.Module):
    weight: Any
    extra: Any


AWKWARD = st.sampled_from(
    ["", ".", "a.b", " ", "x y", '"', "'", "\\", "*", "?", "[0]", "{a,b}", "^", "$", "é", "07"]
)
STR_KEYS = st.one_of(AWKWARD, st.text("abc01_.", min_size=0, max_size=4))
INT_KEYS = st.integers(0, 20)

ARRAYS = st.builds(
    lambda shape, kind: np.zeros(shape, kind),
    st.lists(st.integers(1, 3), max_size=3).map(tuple),
    st.sampled_from(["float32", "int32", "float16"]),
)
STRUCTS = st.builds(
    lambda shape: jax.ShapeDtypeStruct(shape, np.float32), st.lists(st.integers(1, 4), max_size=3).map(tuple)
)
LEAVES = st.one_of(ARRAYS, STRUCTS, st.integers(-3, 3), st.just("relu"), st.just(jax.nn.gelu))


def containers(children):
    return st.one_of(
        st.lists(children, max_size=3),
        st.tuples(children, children),
        st.dictionaries(STR_KEYS, children, max_size=3),
        st.dictionaries(INT_KEYS, children, max_size=3),
        st.builds(Pair, children, st.one_of(children, st.none())),
        st.builds(Node, children, st.one_of(children, st.none())),
    )


TREES = st.recursive(LEAVES, containers, max_leaves=12)


def leaves(tree):
    return jax.tree.leaves(tree)


# ----------------------------------------------------------------------------
# Random selectors, drawn with knowledge of the tree so that they often match


@st.composite
def selectors(draw, tree, depth=2):
    segs = [quote(s) for p in tg.paths(tree) for s in split_path(p)] or ["x"]
    atoms = [
        st.sampled_from(segs).map(lambda s: tg.glob(s) if s else tg.glob('""')),
        st.sampled_from(segs).map(
            lambda s: tg.glob("*" + s[-1:] + "*") if s and s[-1] not in ".*?[]{}\"\\^$' " else tg.glob("**")
        ),
        st.integers(0, 3).flatmap(
            lambda n: st.sampled_from([tg.ndim >= n, tg.ndim == n, tg.ndim < n, tg.size > n])
        ),
        st.sampled_from([tg.inside(Node), tg.inside(Pair), tg.owned_by(Node), tg.owned_by(list)]),
        st.sampled_from([tg.dtype(np.floating), tg.shape(None, ...), tg.where(lambda p, x: len(p) % 2 == 0)]),
        st.booleans().map(lambda b: tg.any_of(b)),
    ]
    base = draw(st.one_of(atoms))
    if depth == 0:
        return base
    op = draw(st.sampled_from(["atom", "and", "or", "not", "minus"]))
    if op == "atom":
        return base
    other = draw(selectors(tree, depth - 1))
    return {"and": base & other, "or": base | other, "not": ~base, "minus": base - other}[op]


def bits(tree, selector):
    return leaves(tg.mask(tree, selector, strict=False))


@given(st.data())
def test_mask_keeps_the_structure_and_yields_python_bools(data):
    tree = data.draw(TREES)
    result = tg.mask(tree, data.draw(selectors(tree)), strict=False)
    assert jtu.tree_structure(result) == jtu.tree_structure(tree)
    assert all(type(x) is bool for x in leaves(result))


@given(st.data())
def test_boolean_algebra_leaf_by_leaf(data):
    tree = data.draw(TREES)
    a, b, c = (data.draw(selectors(tree, depth=1)) for _ in range(3))
    A, B = bits(tree, a), bits(tree, b)
    assert bits(tree, ~a) == [not x for x in A]
    assert bits(tree, a & b) == [x and y for x, y in zip(A, B, strict=True)]
    assert bits(tree, a | b) == [x or y for x, y in zip(A, B, strict=True)]
    assert bits(tree, a - b) == bits(tree, a & ~b)
    assert bits(tree, ~(a | b)) == bits(tree, ~a & ~b)  # De Morgan
    assert bits(tree, a & (b | c)) == bits(tree, (a & b) | (a & c))  # distributivity
    assert bits(tree, a | (a & b)) == A  # absorption
    assert bits(tree, ~~a) == A


@given(st.data())
def test_labels_give_each_leaf_the_label_of_the_first_matching_rule(data):
    tree = data.draw(TREES)
    rules = [(data.draw(selectors(tree, depth=1)), f"r{i}") for i in range(data.draw(st.integers(1, 4)))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tg.ShadowedRuleWarning)
        got = tg.labels(tree, rules, default="none", strict=False)
    assert jtu.tree_structure(got) == jtu.tree_structure(tree)
    masks = [bits(tree, s) for s, _ in rules]
    expected = [
        next((label for m, (_, label) in zip(masks, rules, strict=True) if m[i]), "none")
        for i in range(len(leaves(tree)))
    ]
    assert leaves(got) == expected


def _is_leaf(x):
    return x is not None and jtu.treedef_is_leaf(jtu.tree_structure(x))


def _spellings(key, child, flat):
    """The segment sequences a child's key may stand for: itself, and for a dict key that is
    a path (a tuple, a `/`-joined name, a dotted name in a flat dict) its parts."""
    out = [(key_text(key),)]
    raw = getattr(key, "key", None)
    if isinstance(raw, tuple):
        out.append(tuple(str(k) for k in raw))
    elif isinstance(raw, str):
        out.append(tuple(raw.replace("/", ".").split(".") if flat else raw.split("/")))
    return out


def resolve(tree, path):
    """Follow a rendered path down the tree, one child at a time: the child whose key
    (whole, or split where it is a path) begins the rest of the path."""
    node, rest = tree, split_path(path)
    while rest:
        children = jtu.tree_flatten_with_path(node, is_leaf=lambda x, node=node: x is not node)[0]
        # as the library decides: subtrees without leaves (`{}`, `None`) do not count
        flat = all(_is_leaf(child) for _, child in children if jtu.tree_leaves(child))
        matches = {
            id(child): (child, len(parts))
            for (key,), child in children
            for parts in _spellings(key, child, flat)
            if rest[: len(parts)] == parts
        }
        assert len(matches) == 1, (path, rest)
        node, used = next(iter(matches.values()))
        rest = rest[used:]
    return node


@given(TREES)
@example({"": {0: []}, "a.b": jax.ShapeDtypeStruct((), np.float32)})  # a flat dict beside an empty one
def test_paths_are_unique_and_lead_back_to_their_leaf(tree):
    ps, ls = tg.paths(tree), leaves(tree)
    assert len(set(ps)) == len(ps) == len(ls)
    for i, (p, leaf) in enumerate(zip(ps, ls, strict=True)):
        assert resolve(tree, p) is leaf
        if p:  # SPEC: glob("^" + p + "$") selects exactly the leaf at p
            assert [j for j, hit in enumerate(bits(tree, tg.glob("^" + p + "$"))) if hit] == [i]


@given(TREES)
def test_printed_paths_are_the_quoted_segments_joined_with_dots(tree):
    view = TreeView(tree)
    assert view.paths == [".".join(map(quote, segments)) for segments in view.segments]
    assert view.leaf_paths == view.paths


@given(
    st.dictionaries(STR_KEYS, st.integers(), min_size=1, max_size=3),
    st.dictionaries(INT_KEYS, st.integers(), min_size=1, max_size=3),
)
def test_mixed_key_types_are_a_clear_error(str_part, int_part):
    with pytest.raises(TypeError, match="mixes key types"):
        tg.paths({**str_part, **int_part})


# ----------------------------------------------------------------------------
# The glob matcher against a simple reference implementation of SPEC section 2


def expand(pattern):
    """All brace-free patterns: alternatives and integer ranges written out."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    options = [str(i) for i in range(int(r.group(1)), int(r.group(2)) + 1)] if r else body.split(",")
    return [x for o in options for x in expand(pattern[: m.start()] + o + pattern[m.end() :])]


def expansions(pattern):
    """How many brace-free patterns `expand` would write out."""
    count = 1
    for body in re.findall(r"\{([^{}]*)\}", pattern):
        r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        count *= max(1, int(r.group(2)) - int(r.group(1)) + 1) if r else len(body.split(","))
    return count


def reference_match(pattern, segments):
    anchored_start, anchored_end = pattern.startswith("^"), pattern.endswith("$")
    core = pattern[1 if anchored_start else 0 : len(pattern) - (1 if anchored_end else 0)]
    for alternative in expand(core):
        parts = alternative.split(".")

        @functools.cache
        def match_from(i, j, parts=tuple(parts)):  # parts[i:] against segments[j:]
            if i == len(parts):
                return not anchored_end or j == len(segments)
            if parts[i] == "**":
                return any(match_from(i + 1, k) for k in range(j, len(segments) + 1))
            return (
                j < len(segments) and fnmatch.fnmatchcase(segments[j], parts[i]) and match_from(i + 1, j + 1)
            )

        starts = [0] if anchored_start else range(len(segments) + 1)
        if any(match_from(0, j) for j in starts):
            return True
    return False


SEGMENT_ATOMS = st.sampled_from(
    ["a", "b", "0", "1", "7", "12", "*", "?", "[ab]", "[!a]", "[0-9]", "{a,b}", "{a,1*}", "{0..12}", "{3..7}"]
)
SEGMENT = st.lists(SEGMENT_ATOMS, min_size=1, max_size=3).map("".join)
PATTERNS = st.builds(
    lambda anchors, segs, end: ("^" if anchors else "") + ".".join(segs) + ("$" if end else ""),
    st.booleans(),
    st.lists(st.one_of(SEGMENT, st.just("**"), st.just("{a.b,1}")), min_size=1, max_size=4),
    st.booleans(),
)
PATHS = st.lists(
    st.sampled_from(["a", "b", "ab", "0", "1", "7", "07", "12", "13", "a1", "ba"]), min_size=0, max_size=5
)


@given(PATTERNS, PATHS)
def test_glob_agrees_with_the_reference(pattern, segments):
    # `***` or `**x` are errors, tested elsewhere; the reference expands every brace, treeglob does not.
    assume(not re.search(r"(^|\.)\*\*\*|\*\*(?!\.|$|\$)|\*\*\*", pattern))
    assume(expansions(pattern) <= 5000)
    try:
        compiled = compile_glob(pattern)
    except ValueError:
        assume(False)
    assert compiled.match(tuple(segments)) is reference_match(pattern, tuple(segments)), (pattern, segments)


# ----------------------------------------------------------------------------
# Fuzzing the parser: a selector or a ValueError, nothing else

META = "*?[]{}.,!^$\\\"'-0123456789ab"


@given(st.text(max_size=30))
def test_arbitrary_text_builds_a_selector_or_raises_value_error(text):
    for build in (tg.glob, lambda t: tg.regex("re:" + t), tg.translate):
        try:
            with warnings.catch_warnings():
                # Python's own advice on an ambiguous regex ("Possible nested set") stays a warning.
                warnings.simplefilter("ignore", FutureWarning)
                build(text)
        except ValueError:
            pass


@st.composite
def mutated(draw):
    pattern = draw(PATTERNS)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(pattern)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        c = draw(st.sampled_from(META))
        pattern = {
            "insert": pattern[:i] + c + pattern[i:],
            "delete": pattern[:i] + pattern[i + 1 :],
            "replace": pattern[:i] + c + pattern[i + 1 :],
        }[op]
    return pattern


@given(mutated(), PATHS)
def test_mutated_patterns_build_a_selector_or_raise_value_error(pattern, segments):
    try:
        compiled = compile_glob(pattern)
    except ValueError as exc:
        assert repr(pattern) in str(exc)  # the message quotes the pattern
        return
    assert compiled.match(tuple(segments)) in (True, False)


def test_reference_sanity():
    assert reference_match("blocks.{0..5}", ("blocks", "3", "w"))
    assert not reference_match("blocks.{0..5}", ("blocks", "07"))
    assert reference_match("^a.**.b$", ("a", "b"))
    assert list(itertools.islice(expand("{a,b}.{0..1}"), 4)) == ["a.0", "a.1", "b.0", "b.1"]
