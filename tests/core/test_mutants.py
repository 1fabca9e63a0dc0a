"""Tests written against surviving mutants (mutmut): each pins an output that a mutant changed.

Mutation testing runs on demand, not in CI (see [tool.mutmut] in pyproject.toml); these are
ordinary tests and run with the rest of the suite.
"""

import inspect
import re
import sys

import jax
import numpy as np
import pytest

import treeglob as tg


def raises_exactly(exc_type, message):
    """`pytest.raises` that requires the whole message, not a part of it."""
    return pytest.raises(exc_type, match="^" + re.escape(message) + "$")


def pattern_message(pattern, pos, caret, problem, fix):
    return f"Invalid pattern {pattern!r} at position {pos}: {problem}\n    {pattern!r}\n    {' ' * caret}^\n{fix}"


def nested_braces(depth):
    """`{a,{a,...{a,b}...}}`: `depth` nested brace groups."""
    text = "b"
    for _ in range(depth):
        text = "{a," + text + "}"
    return text


# ----------------------------------------------------------------------------
# _pattern: the parser's messages and positions


def test_an_error_in_an_anchored_pattern_counts_the_caret_anchor():
    message = pattern_message(
        "^a.}",
        3,
        4,
        "'}' without a matching '{'.",
        "Escape a literal brace as '\\}', or open the group with '{'.",
    )
    with raises_exactly(ValueError, message):
        tg.glob("^a.}")


def test_an_unterminated_quote_that_ends_with_a_backslash():
    message = pattern_message(
        '"ab\\',
        0,
        1,
        "unterminated quoted segment.",
        'Close the quote: a quoted segment such as "conv.1" matches a key literally.',
    )
    with raises_exactly(ValueError, message):
        tg.glob('"ab\\')


@pytest.mark.parametrize(
    ("pattern", "pos", "suggestion"),
    [
        ("a[^bc]", 2, "[!bc]"),
        # The hint takes the members of this class, not of an earlier one ...
        ("[x]a[^bc]", 5, "[!bc]"),
        # ... and stops at the first ']' after the '^', with or without text after the class.
        ("[^ab]c[d]", 1, "[!ab]"),
        ("[^ab]c", 1, "[!ab]"),
    ],
)
def test_a_regex_negated_class_suggests_the_glob_spelling(pattern, pos, suggestion):
    message = pattern_message(
        pattern,
        pos,
        pos + 1,
        "'[^...]' is regex syntax; globs negate a class with '!'.",
        f"Write '{suggestion}'.",
    )
    with raises_exactly(ValueError, message):
        tg.glob(pattern)


def test_an_unbalanced_class():
    message = pattern_message(
        "x[ab",
        1,
        2,
        "unbalanced '[': no closing ']'.",
        "Close the class, e.g. '[abc]', or escape a literal bracket as '\\['.",
    )
    with raises_exactly(ValueError, message):
        tg.glob("x[ab")


@pytest.mark.parametrize(("pattern", "pos"), [("x[!bz-a]", 4), ("^x[z-a]", 3)])
def test_a_reversed_class_range_points_at_the_range(pattern, pos):
    message = pattern_message(pattern, pos, pos + 1, "the class range 'z-a' is reversed.", "Write 'a-z'.")
    with raises_exactly(ValueError, message):
        tg.glob(pattern)


def test_a_class_range_of_one_character_is_not_reversed():
    assert tg.mask({"a": 1, "b": 2}, "[a-a]") == {"a": True, "b": False}


def test_class_members_that_are_regex_syntax_are_literal():
    # A backslash inside a class is a literal backslash, and other characters stay themselves.
    assert tg.mask({"a\\b": 1, "ab": 2}, "a[\\]b") == {"a\\b": True, "ab": False}
    assert tg.mask({"X": 1, "Y": 2}, "[X]") == {"X": True, "Y": False}
    assert tg.mask({"X": 1, "a": 2}, "[ab]") == {"X": False, "a": True}


def test_braces_with_three_alternatives():
    assert tg.mask({"a": 1, "b": 2, "c": 3, "d": 4}, "{a,b,c}") == {
        "a": True,
        "b": True,
        "c": True,
        "d": False,
    }


def test_braces_may_nest_exactly_32_deep():
    tree = {"a": 1, "b": 2, "c": 3}
    assert tg.mask(tree, nested_braces(32)) == {"a": True, "b": True, "c": False}
    # The depth counts the groups open at one time, not the groups seen so far.
    assert tg.mask({"xa": 1, "yb": 2, "c": 3}, "{x,y}" + nested_braces(32)) == {
        "c": False,
        "xa": True,
        "yb": True,
    }


@pytest.mark.parametrize("prefix", ["", "{x,y}"])
def test_braces_nested_33_deep_are_refused(prefix):
    pattern = prefix + nested_braces(33)
    pos = len(prefix) + 3 * 32
    message = pattern_message(
        pattern,
        pos,
        pos + 1,
        "braces are nested more than 32 deep.",
        "Flatten the alternatives, or escape literal braces as '\\{' and '\\}'.",
    )
    with raises_exactly(ValueError, message):
        tg.glob(pattern)


def test_an_unbalanced_brace():
    message = pattern_message(
        "{a,b",
        0,
        1,
        "unbalanced '{': no closing '}'.",
        "Close the group, e.g. '{qkv,proj}' or '{0..11}', or escape a literal brace as '\\{'.",
    )
    with raises_exactly(ValueError, message):
        tg.glob("{a,b")


@pytest.mark.parametrize(
    ("pattern", "fix"),
    [
        (
            "{abc}",
            "List two or more alternatives, e.g. '{qkv,proj}', or escape the braces as '\\{' and '\\}'.",
        ),
        ("{1..x}", "An integer range takes two decimal bounds, e.g. '{0..11}'."),
        ("x{0..}", "An integer range takes two decimal bounds, e.g. '{0..11}'."),
    ],
)
def test_a_brace_group_with_one_alternative(pattern, fix):
    pos = pattern.index("{")
    content = pattern[pos:]
    message = pattern_message(
        pattern, pos, pos + 1, f"the brace group '{content}' has a single alternative.", fix
    )
    with raises_exactly(ValueError, message):
        tg.glob(pattern)


def test_ignore_case_folds_classes_and_braces():
    assert tg.mask({"b": 1, "d": 2}, tg.glob("[A-C]", ignore_case=True)) == {"b": True, "d": False}
    tree = {"ab": 1, "CD": 2, "ef": 3}
    assert tg.mask(tree, tg.glob("{Ab,cD}", ignore_case=True)) == {"CD": True, "ab": True, "ef": False}


def test_a_near_miss_spanning_segments_is_suggested_as_a_path():
    message = (
        "The selector given to mask() glob('a.bx') matches no leaf of the tree (1 leaves).\n"
        "Close matches in the tree: a.bc.\n"
        "If matching nothing is intended (e.g. a shared rule list naming parts this model lacks), "
        "wrap it in treeglob.optional(...), or pass strict=False to switch the check off."
    )
    with raises_exactly(tg.NoMatchError, message):
        tg.mask({"a": {"bc": 1}}, "a.bx")


def test_an_escaped_dollar_is_a_literal_character():
    # One backslash escapes the '$'; three are an escaped backslash and an escaped '$'.
    assert tg.mask({"a$": 1, "b": 2}, "a\\$") == {"a$": True, "b": False}
    assert tg.mask({"a\\$": 1, "b": 2}, "a\\\\\\$") == {"a\\$": True, "b": False}


def test_the_empty_segment_error_points_at_the_separator_after_it():
    # A trailing '.' leaves an empty last segment: the caret is on that '.'.
    fix = "Remove the extra '.', or use '**' for any number of segments (e.g. 'blocks.**.weight')."
    problem = "empty segment: a path segment cannot be empty."
    with raises_exactly(ValueError, pattern_message("a.b.", 3, 4, problem, fix)):
        tg.glob("a.b.")
    with raises_exactly(ValueError, pattern_message("a..b", 2, 3, problem, fix)):
        tg.glob("a..b")


def test_a_double_star_inside_a_segment():
    message = pattern_message(
        "a.**b",
        2,
        3,
        "'**' must be a whole segment.",
        "Use '*' to match inside a segment (e.g. 'attn*'), or put '**' between dots (e.g. 'blocks.**.bias').",
    )
    with raises_exactly(ValueError, message):
        tg.glob("a.**b")


def test_a_trailing_lone_backslash():
    message = pattern_message(
        "head\\",
        4,
        5,
        "the pattern ends with a lone '\\'.",
        "Remove it, or write '\\\\' to match a backslash.",
    )
    with raises_exactly(ValueError, message):
        tg.glob("head\\")


def test_an_escaped_character_is_consumed_once():
    assert tg.mask({"*x": 1, "*yx": 2}, "\\*x") == {"*x": True, "*yx": False}
    assert tg.mask({"a*b": 1, "acb": 2}, "a\\*b") == {"a*b": True, "acb": False}


def test_a_comma_outside_braces_is_a_literal_character():
    assert tg.mask({"a,b": 1, "a": 2}, "a,b") == {"a": False, "a,b": True}


def _expansion_message(pattern):
    return (
        f"Invalid pattern {pattern!r}: its brace groups spanning segments expand to more than 256 "
        "alternatives.\nKeep alternatives inside one segment ('{a,b}' without dots stays unexpanded), "
        "or split the pattern into several rules or a list."
    )


def test_braces_spanning_segments_may_expand_to_exactly_256_alternatives():
    from treeglob._core.pattern import compile_glob

    assert len(compile_glob("{a.b,c}" * 8).alternatives) == 256


@pytest.mark.parametrize("pattern", ["{a.b,c}" * 9, "{" + "{a.b,c}" * 9 + ",x.y}"])
def test_braces_expanding_past_256_alternatives_are_refused(pattern):
    # The message quotes the whole pattern, also when the expansion overflows inside a group.
    with raises_exactly(ValueError, _expansion_message(pattern)):
        tg.glob(pattern)


def test_three_stars_are_refused():
    message = pattern_message(
        "a***", 1, 2, "'***' is not a wildcard.", "Use '*' inside a segment or '**' as a whole segment."
    )
    with raises_exactly(ValueError, message):
        tg.glob("a***")


def test_a_double_star_pattern_compiled_for_the_first_time():
    # A pattern that no other test compiles, so that the parser really runs (compile_glob is cached).
    tree = {"m": {"x": {"y": {"unique_leaf_1": 1}}, "other": 2}}
    assert tg.mask(tree, "m.**.unique_leaf_1") == {"m": {"other": False, "x": {"y": {"unique_leaf_1": True}}}}


def test_an_anchored_end_keeps_every_partial_match_alive():
    # After 'a.a', one partial match of 'a$' is complete and another has just begun:
    # the walk must advance both.
    assert tg.mask({"a": {"a": 1, "b": 2}, "b": 3}, "a$") == {"a": {"a": True, "b": False}, "b": False}
    assert tg.mask({"a": {"b": {"a": {"b": 1}}}}, "a.b$") == {"a": {"b": {"a": {"b": True}}}}


# ----------------------------------------------------------------------------
# _segment


def test_integer_ranges_as_digit_classes():
    assert tg.translate("^{15..29}$") == "(?:1[5-9]|2[0-9])"
    assert tg.translate("^{10..39}$") == "(?:[1-3][0-9])"
    tree = {"15": 1, "1A": 2, "29": 3, "30": 4}
    assert tg.mask(tree, "{15..29}") == {"15": True, "1A": False, "29": True, "30": False}
    tree = {"10": 1, "39": 2, "40": 3, "9": 4}
    assert tg.mask(tree, "{10..39}") == {"10": True, "39": True, "40": False, "9": False}


def test_a_class_is_case_sensitive_without_ignore_case():
    assert tg.mask({"B": 1, "b": 2}, "[a-c]") == {"B": False, "b": True}


def test_the_markers_print_as_their_pattern_syntax():
    from treeglob._core.segment import _Marker

    assert repr(_Marker("**")) == "**"


# ----------------------------------------------------------------------------
# _selector

STRICT_FIX = (
    "If matching nothing is intended (e.g. a shared rule list naming parts this model lacks), "
    "wrap it in treeglob.optional(...), or pass strict=False to switch the check off."
)


def test_a_required_operand_that_matches_nothing_has_no_extra_line():
    message = "The right side of '-' glob('zzz') matches no leaf of the tree (2 leaves).\n" + STRICT_FIX
    with raises_exactly(tg.NoMatchError, message):
        tg.mask({"a": 1, "b": 2}, tg.glob("a") - "zzz")


def test_several_close_matches_are_listed_with_commas():
    message = (
        "The selector given to mask() glob('weight') matches no leaf of the tree (2 leaves).\n"
        "Close matches in the tree: wight, weigt.\n" + STRICT_FIX
    )
    with raises_exactly(tg.NoMatchError, message):
        tg.mask({"wight": 1, "weigt": 2}, "weight")


def test_a_difference_suggests_near_misses_of_both_sides():
    message = (
        "The selector given to mask() (glob('haed') - glob('bias')) matches no leaf of the tree (2 leaves).\n"
        "Close matches in the tree: head, bias.\n" + STRICT_FIX
    )
    with raises_exactly(tg.NoMatchError, message):
        tg.mask({"head": 1, "bias": 2}, tg.glob("haed") - "bias")


def test_all_of_flattens_and_unwraps_a_single_part():
    nested = (tg.glob("a") & "b") & "c"
    assert repr(nested) == "(glob('a') & glob('b') & glob('c'))"
    assert nested == tg.all_of("a", "b", "c")
    assert repr(tg.all_of("a")) == "glob('a')"
    assert tg.all_of("a") == tg.glob("a")


def test_any_of_flattens_only_parts_of_the_same_strictness():
    assert repr(tg.glob("a") | "b" | "c") == "any_of(glob('a'), glob('b'), glob('c'))"
    assert tg.glob("a") | "b" | "c" == tg.any_of("a", "b", "c")
    mixed = tg.any_of(tg.any_of("a", "b"), "c", require_each=True)
    assert repr(mixed) == "any_of(any_of(glob('a'), glob('b')), glob('c'), require_each=True)"


def test_any_of_unwraps_a_single_part_unless_each_part_is_required():
    assert repr(tg.any_of("a")) == "glob('a')"
    assert tg.any_of("a") == tg.glob("a")
    assert repr(tg.any_of("a", require_each=True)) == "any_of(glob('a'), require_each=True)"


def test_a_selector_used_twice_is_evaluated_once():
    calls = []

    def heavy(path, leaf):
        calls.append(path)
        return leaf > 1

    repeated = tg.where(heavy)
    assert tg.mask({"a": 1, "b": 2}, repeated | repeated) == {"a": False, "b": True}
    assert calls == ["a", "b"]


# ----------------------------------------------------------------------------
# _rules


def test_rule_labels_are_listed_once_each_and_by_type():
    # An equal label built at run time is the same label; 1, 1.0 and True are three labels.
    decay = "".join(["de", "cay"])
    rules = [("a", "decay"), ("b", decay), ("c", 1), ("d", 1.0), ("e", True)]
    message = (
        "decay_mask(): no rule has the label 'nope'; the rules' labels are ['decay', 1, 1.0, True]. "
        "Pass label=<the label meaning decay>."
    )
    with raises_exactly(ValueError, message):
        tg.decay_mask(rules, label="nope")


def test_the_missing_default_prints_as_missing():
    default = inspect.signature(tg.labels).parameters["default"].default
    assert repr(default) == "MISSING"


def test_array_labels_are_distinct_unless_identical():
    from treeglob._core.rules import normalize_rules

    first, second = np.array([1, 2]), np.array([1, 2])
    labels = normalize_rules([("a", first), ("b", second), ("c", first)]).labels()
    assert len(labels) == 2
    assert labels[0] is first and labels[1] is second


def test_a_single_selector_is_not_a_rule_list():
    message = (
        "rules must be a dict {label: selector} or a list of (selector, label) pairs, got the single "
        "selector 'a'. Write [('a', 'label')], or use treeglob.mask(tree, selector) for a plain selection."
    )
    with raises_exactly(TypeError, message):
        tg.labels({"a": 1}, "a")


def test_a_rule_that_is_not_a_pair():
    message = (
        "rules[0] is 'a'; each rule is a (selector, label) pair, e.g. ('*.bias', 'no_decay'). "
        "Or pass a dict {label: selector}."
    )
    with raises_exactly(TypeError, message):
        tg.labels({"a": 1}, ["a"])


def test_normalized_rules_can_be_listed_and_passed_again():
    from treeglob._core.rules import normalize_rules

    rules = list(normalize_rules([("a", "x"), ("b", "y")]))
    assert tg.labels({"a": 1, "b": 2}, rules) == {"a": "x", "b": "y"}


def test_a_label_must_be_a_leaf():
    message = (
        "The label of rule 0 is None. A label must be a PyTree leaf (a string, number, PartitionSpec, ...): "
        "None or a container would change the structure of the label tree."
    )
    with raises_exactly(TypeError, message):
        tg.labels({"a": 1}, [("a", None)])


# ----------------------------------------------------------------------------
# _stacking


def test_a_stacked_path_that_is_not_in_the_tree_suggests_nested_subtrees():
    tree = {"blocks": {"attn": {"w": np.zeros((2, 3))}, "attn2": {"w": np.zeros((2, 3))}}}
    message = (
        "stacked names the subtree 'blocks.atn', which is not in the tree. Close matches: blocks.attn, "
        "blocks.attn2, blocks. Give the path of the stacked node as treeglob.paths() prints it, e.g. {'blocks': 1}."
    )
    with raises_exactly(ValueError, message):
        tg.paths(tree, stacked={"blocks.atn": 1})


def test_stacking_keeps_the_node_types_of_the_ancestors():
    tree = {"blocks": {"w": np.zeros((2, 3))}, "head": np.zeros(3)}
    assert tg.mask(tree, tg.inside(dict), stacked={"blocks": 1}) == {"blocks": {"w": True}, "head": True}
    assert tg.mask(tree, tg.owned_by(dict), stacked={"blocks": 1}) == {"blocks": {"w": True}, "head": True}


def test_the_layers_of_a_stacked_leaf_have_a_parent_node():
    tree = {"w": np.zeros((2, 3)), "b": np.zeros(3)}
    assert tg.mask(tree, tg.owned_by(object), stacked={"w": 1}) == {"b": True, "w": True}


def test_rows_of_two_stacked_subtrees_and_a_leaf_between_them():
    tree = {"a": {"w": np.zeros((2, 3))}, "b": np.zeros(()), "c": {"w": np.zeros((2, 5))}}
    stacked = {"a": 1, "c": 1}
    assert tg.mask(tree, tg.shape(5), stacked=stacked) == {"a": {"w": False}, "b": False, "c": {"w": True}}
    assert tg.mask(tree, tg.ndim == 0, stacked=stacked) == {"a": {"w": False}, "b": True, "c": {"w": False}}


def test_bad_stacked_declarations():
    message = (
        "stacked must be a dict {path: number of leading axes}, e.g. {'blocks': 1}, got list: ['blocks']."
    )
    with raises_exactly(TypeError, message):
        tg.paths([1], stacked=["blocks"])
    message = "stacked: the key 1 must be the path of a subtree as a string, e.g. 'blocks'."
    with raises_exactly(TypeError, message):
        tg.paths([1], stacked={1: 1})
    message = (
        "stacked declares both 'a' and 'a.b', which lies inside it. Declare the outer subtree with the "
        "total number of leading axes instead."
    )
    with raises_exactly(ValueError, message):
        tg.paths({"a": {"b": np.zeros((2, 2))}}, stacked={"a": 1, "a.b": 1})


def test_a_stacked_subtree_without_arrays():
    message = "stacked subtree 'a' holds no array leaf to take the number of layers from."
    with raises_exactly(ValueError, message):
        tg.paths({"a": {"b": 1}}, stacked={"a": 1})


def test_a_stack_of_scalars_has_exactly_the_stacked_axes():
    assert tg.paths({"a": np.zeros(3)}, stacked={"a": 1}) == ["a.0", "a.1", "a.2"]


def test_leading_axes_that_differ_name_the_number_of_axes():
    tree = {"a": {"x": np.zeros((2, 3, 4)), "y": np.zeros((2, 4, 4))}}
    message = (
        "stacked={'a': 2} needs every array under 'a' to have the same leading 2 axes (the layers): a.x has "
        "shape (2, 3, 4) but a.y has shape (2, 4, 4). Check the number of stacked axes, or declare a "
        "smaller subtree."
    )
    with raises_exactly(ValueError, message):
        tg.paths(tree, stacked={"a": 2})


def test_rows_of_three_stacked_subtrees():
    tree = {
        "a": {"w": np.zeros((2, 1))},
        "b": {"w": np.zeros((2, 1))},
        "c": {"w": np.zeros((2, 5))},
        "d": np.zeros(()),
    }
    stacked = {"a": 1, "b": 1, "c": 1}
    expected = {"a": {"w": False}, "b": {"w": False}, "c": {"w": True}, "d": False}
    assert tg.mask(tree, tg.shape(5), stacked=stacked) == expected
    expected = {"a": {"w": False}, "b": {"w": False}, "c": {"w": False}, "d": True}
    assert tg.mask(tree, tg.ndim == 0, stacked=stacked) == expected


# ----------------------------------------------------------------------------
# _conditions


def returns_int(path, leaf):
    return 1


class Pred:
    """A callable object: it has no __qualname__ of its own, so messages use its repr."""

    def __call__(self, path, leaf):
        return "yes"

    def __repr__(self):
        return "Pred()"


def test_a_regex_near_miss_is_suggested():
    message = (
        "The selector given to mask() regex('head\\\\.wieght') matches no leaf of the tree (1 leaves).\n"
        "Close matches in the tree: head.weight.\n" + STRICT_FIX
    )
    with raises_exactly(tg.NoMatchError, message):
        tg.mask({"head": {"weight": 1}}, tg.regex(r"head\.wieght"))


def test_a_regex_near_miss_is_found_from_its_plain_characters():
    # The groups' parentheses are dropped before comparing: "(a)(b)(c)x" reads as "abcx".
    message = (
        "The selector given to mask() regex('(a)(b)(c)x') matches no leaf of the tree (1 leaves).\n"
        "Close matches in the tree: abcd.\n" + STRICT_FIX
    )
    with raises_exactly(tg.NoMatchError, message):
        tg.mask({"abcd": 1}, tg.regex("(a)(b)(c)x"))


def test_where_predicates_are_named_by_qualname_or_repr():
    assert repr(tg.where(returns_int)) == "where(returns_int)"
    assert repr(tg.where(Pred())) == "where(Pred())"
    message = (
        "The where() predicate {} returned {} for the leaf at path 'a'; it must return a bool. "
        "(Masks are static: a traced or array value cannot decide them.)"
    )
    with raises_exactly(TypeError, message.format("returns_int", "int 1")):
        tg.mask({"a": 1}, tg.where(returns_int))
    with raises_exactly(TypeError, message.format("Pred()", "str 'yes'")):
        tg.mask({"a": 1}, tg.where(Pred()))


def test_leaves_at_the_root_are_owned_by_the_root():
    assert tg.mask({"a": 1, "b": {"c": 2}}, tg.owned_by(dict)) == {"a": True, "b": {"c": True}}


def test_owned_by_and_inside_on_an_empty_tree_combine_as_bool_masks():
    assert tg.mask({}, tg.owned_by(dict) & "a", strict=False) == {}
    assert tg.mask({}, tg.inside(dict) & "a", strict=False) == {}


def test_a_leaf_that_is_an_instance_counts_as_inside():
    assert tg.mask({"a": np.zeros(2), "b": 1}, tg.inside(np.ndarray)) == {"a": True, "b": False}
    # Both ways at once: x.0 lies inside a list, a is an array.
    assert tg.mask({"x": [1], "a": np.zeros(2)}, tg.inside(list, np.ndarray)) == {"a": True, "x": [True]}


def test_a_wrapped_leaf_is_owned_by_its_wrapper():
    nnx = pytest.importorskip("flax.nnx")
    state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    assert tg.paths(state) == ["bias", "kernel"]
    assert dict(tg.mask(state, tg.owned_by(nnx.Param))) == {"bias": True, "kernel": True}


def test_every_comparison_of_ndim_and_size():
    tree = {"w": np.zeros((2, 3)), "b": np.zeros(3), "s": np.zeros(()), "e": np.zeros((0,)), "act": "relu"}
    assert repr(tg.ndim != 1) == "(ndim != 1)"
    assert tg.mask(tree, tg.ndim != 1) == {"act": False, "b": False, "e": False, "s": True, "w": True}
    assert repr(tg.size < 3) == "(size < 3)"
    assert tg.mask(tree, tg.size < 3) == {"act": False, "b": False, "e": True, "s": True, "w": False}
    assert repr(tg.ndim > 1) == "(ndim > 1)"
    assert tg.mask(tree, tg.ndim > 1) == {"act": False, "b": False, "e": False, "s": False, "w": True}


def test_a_zero_sized_dimension_is_a_valid_shape():
    tree = {"e": np.zeros((0,)), "f": np.zeros((1,))}
    assert tg.mask(tree, tg.shape(0)) == {"e": True, "f": False}


def test_dtype_needs_a_kind():
    with raises_exactly(TypeError, "dtype() needs at least one dtype, e.g. dtype(jnp.floating)."):
        tg.dtype()


def test_owned_by_and_inside_need_classes():
    with raises_exactly(TypeError, "owned_by() needs at least one class, e.g. owned_by(eqx.nn.LayerNorm)."):
        tg.owned_by()
    with raises_exactly(TypeError, "inside() needs at least one class, e.g. inside(eqx.nn.LayerNorm)."):
        tg.inside()
    with raises_exactly(TypeError, "owned_by() takes classes, got int: 1."):
        tg.owned_by(1)


def test_an_unknown_comparison():
    with raises_exactly(ValueError, "Unknown comparison '=>'; use one of ==, !=, <, <=, >, >=."):
        tg.ndim.compare("=>", 2)


def test_a_new_metric_prints_its_name():
    from treeglob._core.conditions import _Metric

    assert repr(_Metric("ndim") >= 2) == "(ndim >= 2)"


def boom(path, leaf):
    raise KeyError("x")


def test_an_exception_in_a_predicate_gets_a_note_naming_it_and_the_path():
    with pytest.raises(KeyError, match="'x'") as info:
        tg.mask({"a": 1}, tg.where(boom))
    assert info.value.__notes__ == ["treeglob: raised by the where() predicate boom on the leaf at path 'a'."]


def test_where_needs_a_callable():
    with raises_exactly(TypeError, "where() takes a function fn(path, leaf) -> bool, got int: 1."):
        tg.where(1)


# ----------------------------------------------------------------------------
# _tree


@pytest.mark.slow
def test_a_tree_deeper_than_the_recursion_limit_is_a_value_error():
    # In-process with a lowered limit: JAX's flatten runs out of recursion budget long before
    # the C stack does. (tests/core/test_pipeline.py checks the default limit in a subprocess.)
    tree = 1.0
    for _ in range(1000):
        tree = [tree]
    old = sys.getrecursionlimit()
    limit = len(inspect.stack(0)) + 200
    message = (
        "treeglob could not flatten the tree: it is nested deeper than JAX can flatten under Python's "
        f"recursion limit ({limit}). Raise the limit with sys.setrecursionlimit(...), or nest the tree "
        "less deeply."
    )
    sys.setrecursionlimit(limit)
    try:
        with raises_exactly(ValueError, message):
            tg.paths(tree)
    finally:
        sys.setrecursionlimit(old)


class _FailsToFlatten:
    """A registered node whose flatten function raises an unrelated SystemError."""


def _flatten_fails(node):
    raise SystemError("boom")


jax.tree_util.register_pytree_node(_FailsToFlatten, _flatten_fails, lambda aux, children: _FailsToFlatten())


def test_a_system_error_that_is_not_about_recursion_passes_through():
    with raises_exactly(SystemError, "boom"):
        tg.paths({"a": _FailsToFlatten()})


def _flatten_refuses(node):
    raise TypeError(node.message)


class _RefusesToFlatten:
    """A registered node whose flatten function raises a TypeError with the given message."""

    def __init__(self, message="bad node"):
        self.message = message


jax.tree_util.register_pytree_node(
    _RefusesToFlatten, _flatten_refuses, lambda aux, children: _RefusesToFlatten()
)


def test_a_flatten_error_is_a_type_error_with_a_hint_only_for_mixed_keys():
    with raises_exactly(TypeError, "treeglob could not flatten the tree: bad node"):
        tg.paths({"a": _RefusesToFlatten()})
    with pytest.raises(TypeError, match=r"^treeglob could not flatten the tree: .*\n") as info:
        tg.paths({1: 1, "a": 2})
    hint = (
        "\nA dict in the tree mixes key types (e.g. int and str keys), which JAX cannot sort. "
        "Use one key type per dict, e.g. str(key) for every key."
    )
    assert str(info.value).endswith(hint)
    # The wording of older JAX releases for the same mistake gets the hint too.
    older = "'<' not supported between instances of 'str' and 'int'"
    with raises_exactly(TypeError, f"treeglob could not flatten the tree: {older}{hint}"):
        tg.paths({"a": _RefusesToFlatten(older)})


def test_a_leaf_that_is_an_instance_counts_for_each_of_its_layers():
    tree = {"blocks": {"w": np.zeros((2, 3))}, "b": 1}
    expected = {"b": False, "blocks": {"w": True}}
    assert tg.mask(tree, tg.inside(np.ndarray), stacked={"blocks": 1}) == expected


# ----------------------------------------------------------------------------
# _keys


def test_the_empty_path_declares_the_root_stacked():
    tree = {"w": np.zeros((2, 3)), "b": np.zeros((2,))}
    assert tg.paths(tree, stacked={"": 1}) == ["0.b", "0.w", "1.b", "1.w"]


@pytest.mark.parametrize(
    ("pattern", "fix"),
    [
        ("[^abc]", "Write '[!abc]'."),
        ("[^]ab]", "Write '[!]ab]'."),
        ("[^]", "Write '[!...]'."),
        ("[^abc", "Write '[!...]'."),
    ],
)
def test_the_hint_for_regex_negation_keeps_a_leading_bracket_in_the_class(pattern, fix):
    with pytest.raises(ValueError) as info:
        tg.glob(pattern)
    assert str(info.value).splitlines()[-1] == fix


def test_close_matches_compare_runs_of_as_many_segments_as_the_pattern():
    from treeglob._core.keys import runs

    paths = [("a", "b", "c"), ("d",)]
    assert runs(paths, 1) == ["a", "b", "c", "d"]
    assert runs(paths, 2) == ["a.b", "b.c"]  # `d` is too short for a run of two
    assert runs(paths, 2, ending=True) == ["b.c"]
    assert runs(paths, 4) == []


def test_a_root_leaf_missing_from_types_from_is_listed_as_the_root():
    message = (
        "mask(): 1 leaves of the tree have no leaf of the same path in the tree the types come from "
        "(types_from):\n    <root>\nPass the model these parameters belong to, e.g. "
        "treeglob.mask(nnx.state(model, nnx.Param), selector, types_from=model)."
    )
    with raises_exactly(ValueError, message):
        tg.mask(np.zeros(2), "**", types_from={"w": np.zeros(2)})
