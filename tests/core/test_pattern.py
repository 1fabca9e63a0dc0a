"""Pattern semantics (SPEC §2): case tables, translate() goldens, malformed patterns."""

import fnmatch
import random
import re
import time

import pytest

import treeglob as tg
from treeglob._core.pattern import compile_glob


def matches(pattern: str, path: str, **kw) -> bool:
    segments = tuple(path.split(".")) if path else ()
    return compile_glob(pattern, kw.get("ignore_case", False)).match(segments)


CASES = [
    # --- literal segments, unanchored subtree semantics
    ("bias", "blocks.0.attn.bias", True),
    ("bias", "blocks.0.attn.biases", False),
    ("attn", "blocks.0.attn.qkv.weight", True),  # a node selects every leaf under it
    ("qkv.weight", "blocks.3.attn.qkv.weight", True),
    ("qkv.weight", "blocks.3.attn.qkv.weight_g", False),
    ("attn.weight", "blocks.3.attn.qkv.weight", False),  # segments must be consecutive
    ("blocks.0", "blocks.10.w", False),
    # --- * and ?
    ("*.bias", "head.bias", True),
    ("*.bias", "bias", False),  # '*' is one whole segment before 'bias'
    ("*.bias", "blocks.0.attn.bias", True),
    ("*embed*", "tok_embedding.weight", True),
    ("*embed*", "blocks.0.w", False),
    ("blocks.*.attn", "blocks.7.attn.qkv.bias", True),
    ("blocks.*.attn", "blocks.attn.x", False),  # '*' never spans zero segments
    ("blocks.*", "blocks.0.w", True),
    ("l?", "l1.w", True),
    ("l?", "l12.w", False),
    ("l?", "l.w", False),  # '?' is exactly one character, never the separator
    # --- character classes
    ("Dense_[0-2]", "params.Dense_1.kernel", True),
    ("Dense_[0-2]", "params.Dense_3.kernel", False),
    ("Dense_[!0-2]", "params.Dense_3.kernel", True),
    ("Dense_[!0-2]", "params.Dense_1.kernel", False),
    ("[]]x", "]x", True),
    # --- alternation, inside a segment and across segments
    ("{qkv,proj}.weight", "attn.proj.weight", True),
    ("{qkv,proj}.weight", "attn.out.weight", False),
    ("{attn.qkv,mlp.fc1}.weight", "blocks.0.mlp.fc1.weight", True),
    ("{attn.qkv,mlp.fc1}.weight", "blocks.0.mlp.fc2.weight", False),
    ("layer{,s}.0", "layers.0.w", True),
    ("layer{,s}.0", "layer.0.w", True),
    ("{a,{b,c}d}", "cd", True),
    ("{a,{b,c}d}", "c", False),
    # --- integer ranges compare as numbers on canonical decimals
    ("blocks.{0..11}", "blocks.7.w", True),
    ("blocks.{0..11}", "blocks.11.w", True),
    ("blocks.{0..11}", "blocks.12.w", False),
    ("blocks.{0..11}", "blocks.07.w", False),
    ("blocks.{0..11}", "blocks.110.w", False),
    ("blocks.{0..5}", "blocks.5.mlp.w", True),
    ("blocks.{3..3}", "blocks.3.w", True),
    ("Dense_{0..3}", "params.Dense_2.kernel", True),
    ("Dense_{0..3}", "params.Dense_4.kernel", False),
    ("{95..105}", "x.99", True),
    ("{95..105}", "x.100", True),
    ("{95..105}", "x.106", False),
    ("{0..1000000000}", "x.999999999", True),
    ("{0..1000000000}", "x.1000000001", False),
    # --- ** matches zero or more whole segments
    ("blocks.**.bias", "blocks.bias", True),
    ("blocks.**.bias", "blocks.0.attn.bias", True),
    ("^**.bias$", "bias", True),
    ("^**$", "", True),
    ("**", "anything.at.all", True),
    ("^a.**.b.**.c$", "a.x.b.c", True),
    ("^a.**.b.**.c$", "a.x.c.b", False),
    # --- anchors
    ("^head", "head.weight", True),
    ("^head", "model.head.weight", False),
    ("attn.*$", "blocks.0.attn.bias", True),
    ("attn.*$", "blocks.0.attn.qkv.bias", False),
    ("^head.weight$", "head.weight", True),
    ("^head.weight$", "head.weight.x", False),
    # --- escapes and quoted segments
    ("\\*", "*", True),
    ("\\*", "a", False),
    ('params."conv.1".kernel', "params.conv.1.kernel", False),  # only as one segment
    # --- case
    ("LayerNorm", "layernorm.w", False),
]


@pytest.mark.parametrize("pattern, path, expected", CASES)
def test_glob_cases(pattern, path, expected):
    assert matches(pattern, path) is expected


# translate() is exact for paths whose keys need no quoting.
PLAIN_CASES = [c for c in CASES if '"' not in c[0] and not set("]*") & set(c[1])]


@pytest.mark.parametrize("pattern, path, expected", PLAIN_CASES)
def test_translate_agrees_with_the_matcher(pattern, path, expected):
    assert (re.fullmatch(tg.translate(pattern), path) is not None) is expected


def test_quoted_segment_matches_a_key_with_dots():
    tree = {"params": {"conv.1": {"kernel": 1}, "conv": {"1": {"kernel": 2}}}}
    assert tg.mask(tree, 'params."conv.1".kernel') == {
        "params": {"conv.1": {"kernel": True}, "conv": {"1": {"kernel": False}}}
    }
    # Wildcards work segment-wise: '*' matches the whole key "conv.1".
    assert tg.mask(tree, "^params.*.kernel") == {
        "params": {"conv.1": {"kernel": True}, "conv": {"1": {"kernel": False}}}
    }


def test_ignore_case():
    assert matches("LayerNorm", "layernorm.w", ignore_case=True)
    assert tg.mask({"LN": 1, "x": 2}, tg.glob("ln", ignore_case=True)) == {"LN": True, "x": False}
    assert tg.mask({"LN": 1, "x": 2}, tg.regex("ln", ignore_case=True)) == {"LN": True, "x": False}


REGEX_CASES = [
    ("re:.*bias", "blocks.0.bias", True),
    ("re:head", "head.weight", False),  # full match, no subtree semantics
    ("re:head\\..*", "head.weight", True),
    (re.compile(r"blocks\.[0-3]\..*"), "blocks.2.w", True),
    (re.compile(r"blocks\.[0-3]\..*"), "blocks.4.w", False),
]


@pytest.mark.parametrize("pattern, path, expected", REGEX_CASES)
def test_regex_cases(pattern, path, expected):
    tree = {}
    node = tree
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = 0
    tree["other"] = 1
    got = tg.mask(tree, pattern, strict=False)
    node = got
    for p in parents:
        node = node[p]
    assert node[last] is expected


TRANSLATE_GOLDEN = [
    ("^head.weight$", r"head\.weight"),
    ("*.bias", r"(?:[^.]+\.)*[^.]*\.bias(?:\.[^.]+)*"),
    ("blocks.{0..11}$", r"(?:[^.]+\.)*blocks\.(?:[0-9]|1[0-1])"),
    ("^{95..105}$", r"(?:9[5-9]|10[0-5])"),
    ("^{0..1000}$", r"(?:[0-9]|[1-9][0-9]|[1-9][0-9]{2}|10{3})"),
    ("^a.**.b$", r"a(?:\.[^.]+)*\.b"),
    ("^**.b$", r"(?:[^.]+\.)*b"),
    ("^**$", r"(?:[^.]+(?:\.[^.]+)*)?"),
    ("^l?.[!a-c]$", r"l[^.]\.[^a-c]"),
    ("^{qkv,proj}$", r"(?:qkv|proj)"),
    ("^{a.b,c}$", r"(?:a\.b|c)"),
    ("^x$", r"x"),
    ("re:a.*", "a.*"),
]


@pytest.mark.parametrize("pattern, expected", TRANSLATE_GOLDEN)
def test_translate_golden(pattern, expected):
    assert tg.translate(pattern) == expected


def test_translate_ignore_case_and_compiled_regex():
    assert tg.translate("^LN$", ignore_case=True) == "(?i)ln"
    assert tg.translate(re.compile("a+")) == "a+"


MALFORMED = [
    ("", 0, "the pattern is empty"),
    ("^$", 0, "the pattern is empty"),
    ("a..b", 2, "empty segment"),
    (".a", 0, "empty segment"),
    ("a.", 1, "empty segment"),
    ("x.{.a,b}", 3, "empty segment"),
    ("{a.b,}", 0, "empty segment"),  # found by the mutation fuzzer: was an IndexError
    ("a.**b", 2, r"'\*\*' must be a whole segment"),
    ("x**", 1, r"'\*\*' must be a whole segment"),
    ("***", 0, r"'\*\*\*' is not a wildcard"),
    ("[abc", 0, r"unbalanced '\['"),
    ("[^a]", 1, r"Write '\[!a\]'"),
    ("[z-a]", 1, "the class range 'z-a' is reversed"),
    ("{a,b", 0, r"unbalanced '\{'"),
    ("a}", 1, r"'\}' without a matching '\{'"),
    ("{a}", 0, "has a single alternative"),
    ("{a..b}", 0, r"An integer range takes two decimal bounds"),
    ("{5..0}", 0, r"(?s)the range \{5..0\} is reversed.*\{0..5\}"),
    ("a\\", 1, r"ends with a lone '\\'"),
    ('"ab', 0, "unterminated quoted segment"),
    ("re:(ab", 3, r"invalid regular expression \(missing \), unterminated subpattern\)"),
]


@pytest.mark.parametrize("pattern, pos, message", MALFORMED)
def test_malformed_patterns(pattern, pos, message):
    with pytest.raises(ValueError, match=message) as info:
        tg.translate(pattern)
    text = str(info.value)
    assert f"Invalid pattern {pattern!r} at position {pos}:" in text
    # The caret line points at the position inside the quoted pattern.
    quoted, caret = text.splitlines()[1:3]
    assert quoted.strip() == repr(pattern)
    assert caret.index("^") == quoted.index(repr(pattern)) + len(repr(pattern[:pos])) - 1


def test_brace_expansion_is_bounded():
    pattern = ".".join(["{a.x,b.y}"] * 9)  # 2**9 = 512 alternatives
    with pytest.raises(ValueError, match="expand to more than 256 alternatives"):
        tg.glob(pattern)


def test_in_segment_alternation_is_not_expanded():
    pattern = "{a,b}" * 25  # 2**25 strings, but one segment matcher
    assert matches(pattern, "ab" * 12 + "a")


def test_matching_is_linear_on_adversarial_patterns():
    start = time.perf_counter()
    assert not matches("*a" * 30 + "b", "a" * 300)
    assert not matches("**." * 30 + "b", ".".join(["a"] * 300))
    assert matches("{0..1000000000}", "x." * 100 + "999999999")
    assert time.perf_counter() - start < 5  # exponential backtracking would take hours


def test_compiled_patterns_are_cached():
    assert compile_glob("blocks.{0..3}.*") is compile_glob("blocks.{0..3}.*")
    assert compile_glob("a", True) is not compile_glob("a", False)


def test_single_segment_globs_agree_with_fnmatch():
    """Seeded oracle fuzz: without dots or braces, one segment behaves like fnmatchcase."""
    rng = random.Random(0)
    atoms = ["a", "b", "*", "?", "[ab]", "[!a]", "[a-b]"]
    for _ in range(3000):
        pattern = "".join(rng.choice(atoms) for _ in range(rng.randint(1, 6)))
        if "**" in pattern:
            continue
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        got = compile_glob("^" + pattern + "$").match((text,))
        assert got is fnmatch.fnmatchcase(text, pattern), (pattern, text)
