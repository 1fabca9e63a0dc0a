"""Selectors (SPEC §3): conditions, operators, coercion, and whole-tree golden masks."""

import re
from dataclasses import FrozenInstanceError

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

import treeglob as tg


def selected(tree, selector, **kw):
    """The paths a selector picks, in leaf order."""
    flags = jax.tree.leaves(tg.mask(tree, selector, **kw))
    return [p for p, f in zip(tg.paths(tree), flags, strict=True) if f]


# Whole-tree golden masks on the Transformer: the selected paths, in leaf order.
GOLDEN = [
    (
        "*.bias",
        [
            "blocks.0.ln1.bias",
            "blocks.0.attn.query_proj.bias",
            "blocks.0.ln2.bias",
            "blocks.0.mlp.layers.0.bias",
            "blocks.0.mlp.layers.1.bias",
            "blocks.1.ln1.bias",
            "blocks.1.attn.query_proj.bias",
            "blocks.1.ln2.bias",
            "blocks.1.mlp.layers.0.bias",
            "blocks.1.mlp.layers.1.bias",
            "ln_f.bias",
            "head.bias",
        ],
    ),
    (
        eqx.nn.LayerNorm,
        [
            "blocks.0.ln1.weight",
            "blocks.0.ln1.bias",
            "blocks.0.ln2.weight",
            "blocks.0.ln2.bias",
            "blocks.1.ln1.weight",
            "blocks.1.ln1.bias",
            "blocks.1.ln2.weight",
            "blocks.1.ln2.bias",
            "ln_f.weight",
            "ln_f.bias",
        ],
    ),
    (
        (tg.ndim >= 2) - eqx.nn.Embedding,
        [
            "blocks.0.attn.query_proj.weight",
            "blocks.0.attn.key_proj.weight",
            "blocks.0.attn.value_proj.weight",
            "blocks.0.attn.output_proj.weight",
            "blocks.0.mlp.layers.0.weight",
            "blocks.0.mlp.layers.1.weight",
            "blocks.1.attn.query_proj.weight",
            "blocks.1.attn.key_proj.weight",
            "blocks.1.attn.value_proj.weight",
            "blocks.1.attn.output_proj.weight",
            "blocks.1.mlp.layers.0.weight",
            "blocks.1.mlp.layers.1.weight",
            "head.weight",
        ],
    ),
    (
        "blocks.1.{attn.query_proj,mlp.layers.0}",
        [
            "blocks.1.attn.query_proj.weight",
            "blocks.1.attn.query_proj.bias",
            "blocks.1.mlp.layers.0.weight",
            "blocks.1.mlp.layers.0.bias",
        ],
    ),
    ("^{embed,head}.weight$", ["embed.weight", "head.weight"]),
    (
        tg.owned_by(eqx.nn.Linear) & "blocks.0.mlp.**.weight",
        ["blocks.0.mlp.layers.0.weight", "blocks.0.mlp.layers.1.weight"],
    ),
    (re.compile(r"blocks\.0\.ln\d\.weight"), ["blocks.0.ln1.weight", "blocks.0.ln2.weight"]),
    (tg.shape(11, None), ["embed.weight", "head.weight"]),
    (tg.size > 40, ["embed.weight", "head.weight"]),
]


@pytest.mark.parametrize("selector, expected", GOLDEN)
def test_golden_selection_on_the_transformer(params, selector, expected):
    assert selected(params, selector) == expected


def test_golden_mask_on_a_mixed_tree(mixed_tree):
    got = tg.mask(mixed_tree, (tg.ndim == 1) | "meta.step")
    assert got == {
        "layers": [{"w": False, "b": True}, {"w": False, "b": True}],
        "norm": type(mixed_tree["norm"])(left=True, right=None),
        "meta": {"step": True, "name": False},
    }
    assert jtu.tree_structure(got) == jtu.tree_structure(mixed_tree)
    assert all(type(x) is bool for x in jax.tree.leaves(got))


def test_mask_and_its_complement_cover_the_tree(params):
    for selector in ["*.bias", eqx.nn.LayerNorm, tg.ndim >= 2]:
        m = jax.tree.leaves(tg.mask(params, selector))
        inverse = jax.tree.leaves(tg.mask(params, ~tg.any_of(selector)))
        assert [a != b for a, b in zip(m, inverse, strict=True)] == [True] * len(m)


def test_mask_works_as_an_eqx_filter_spec(transformer):
    params = eqx.filter(transformer, eqx.is_array)
    spec = tg.mask(params, "blocks.0")
    trainable, frozen = eqx.partition(params, spec)
    assert tg.paths(trainable) == [p for p in tg.paths(params) if p.startswith("blocks.0.")]
    assert len(tg.paths(trainable)) + len(tg.paths(frozen)) == len(tg.paths(params))


def test_inside_includes_the_root_and_any_node_class(mixed_tree):
    assert selected(mixed_tree, dict) == tg.paths(mixed_tree)
    assert selected(mixed_tree, tg.inside(type(mixed_tree["norm"]))) == ["norm.left"]
    assert selected(mixed_tree, list) == ["layers.0.b", "layers.0.w", "layers.1.b", "layers.1.w"]


def test_non_array_leaves_have_paths_but_no_metadata(transformer):
    assert selected(transformer, tg.inside(eqx.nn.MLP) - tg.inside(eqx.nn.Linear)) == [
        "blocks.0.mlp.activation",
        "blocks.0.mlp.final_activation",
        "blocks.1.mlp.activation",
        "blocks.1.mlp.final_activation",
    ]
    assert "blocks.0.mlp.activation" not in selected(transformer, tg.ndim >= 0)


def test_owned_by_does_not_skip_containers():
    seq = eqx.nn.Sequential([eqx.nn.Linear(2, 2, key=jax.random.key(0))])
    assert selected(seq, tg.owned_by(eqx.nn.Sequential), strict=False) == []
    assert selected(seq, tg.owned_by(tuple), strict=False) == []  # the tuple of layers owns no array
    assert selected(seq, tg.owned_by(eqx.nn.Linear)) == ["layers.0.weight", "layers.0.bias"]
    nested = {"a": {"b": {"c": 1}, "d": 2}}
    assert selected(nested, tg.owned_by(dict)) == ["a.b.c", "a.d"]


def test_union_and_tuple_of_classes():
    tree = {"ln": eqx.nn.LayerNorm(2), "lin": eqx.nn.Linear(2, 2, key=jax.random.key(0)), "x": np.ones(1)}
    expected = ["lin.weight", "lin.bias", "ln.weight", "ln.bias"]
    assert selected(tree, eqx.nn.Linear | eqx.nn.LayerNorm) == expected
    assert selected(tree, (eqx.nn.Linear, eqx.nn.LayerNorm)) == expected
    assert selected(tree, tg.inside(eqx.nn.Linear | eqx.nn.LayerNorm)) == expected


@pytest.mark.parametrize(
    "selector, expected",
    [
        (tg.ndim == 1, ["b"]),
        (tg.ndim != 1, ["w", "s"]),
        (tg.ndim < 2, ["b", "s"]),
        (tg.ndim <= 2, ["b", "w", "s"]),
        (tg.ndim > 0, ["b", "w"]),
        (tg.ndim >= 2, ["w"]),
        (tg.size == 1, ["s"]),
        (tg.shape(3), ["b"]),
        (tg.shape(), ["s"]),
        (tg.shape(..., 3), ["b", "w"]),
        (tg.shape(2, ...), ["w"]),
        (tg.dtype(jnp.floating), ["b", "w"]),
        (tg.dtype("int32"), ["s"]),
        (tg.dtype(jnp.bfloat16), ["w"]),
    ],
)
def test_array_metadata_conditions(selector, expected):
    tree = {
        "b": np.zeros(3, np.float32),
        "w": jax.ShapeDtypeStruct((2, 3), jnp.bfloat16),  # not eqx.is_array, still array-like
        "s": np.zeros((), np.int32),
        "act": jax.nn.relu,
        "n": 3,
    }
    assert sorted(selected(tree, selector)) == sorted(expected)


def test_where_predicate():
    tree = {"a": np.zeros(3), "b": "text"}
    assert selected(tree, tg.where(lambda path, leaf: isinstance(leaf, str))) == ["b"]
    assert selected(tree, tg.where(lambda path, leaf: path == "a")) == ["a"]


def test_where_errors_name_the_path():
    tree = {"a": np.zeros(3), "b": "text"}
    with pytest.raises(AttributeError) as info:
        tg.mask(tree, tg.where(lambda path, leaf: leaf.ndim > 0))
    assert "on the leaf at path 'b'" in info.value.__notes__[0]
    with pytest.raises(TypeError, match="returned int 1 for the leaf at path 'a'; it must return a bool"):
        tg.mask(tree, tg.where(lambda path, leaf: 1))


def test_boolean_laws_leaf_by_leaf(params):
    a, b = tg.glob("*.bias"), tg.inside(eqx.nn.LayerNorm)

    def m(s):
        return np.array(jax.tree.leaves(tg.mask(params, s, strict=False)))

    assert (m(a & b) == (m(a) & m(b))).all()
    assert (m(a | b) == (m(a) | m(b))).all()
    assert (m(a - b) == (m(a) & ~m(b))).all()
    assert (m(~(a | b)) == (m(~a) & m(~b))).all()
    assert (m("*.bias" & (tg.ndim >= 1)) == m(a)).all()  # coercion on the left of &
    assert (m(["*.bias", eqx.nn.LayerNorm]) == m(a | b)).all()


def test_selectors_are_immutable_hashable_values():
    s = tg.glob("*.bias") | (tg.ndim >= 2)
    assert s == tg.glob("*.bias") | (tg.ndim >= 2)
    assert hash(s) == hash(tg.glob("*.bias") | (tg.ndim >= 2))
    assert not callable(s)
    assert jtu.tree_leaves(s) == [s]  # not a PyTree: one opaque leaf
    with pytest.raises(FrozenInstanceError):
        s.parts = ()  # type: ignore[misc]
    assert repr(s) == "any_of(glob('*.bias'), (ndim >= 2))"


@pytest.mark.parametrize(
    "selector, text",
    [
        (tg.regex("a.*"), "regex('a.*')"),
        (tg.regex("a.*", ignore_case=True), "regex('a.*', ignore_case=True)"),
        (
            tg.regex(re.compile("a .*", re.VERBOSE | re.I)),
            "regex(re.compile('a .*', re.IGNORECASE|re.VERBOSE))",
        ),
        (tg.glob("*.B", ignore_case=True), "glob('*.B', ignore_case=True)"),
    ],
)
def test_reprs_say_every_option_that_changes_what_is_selected(selector, text):
    assert repr(selector) == text


def test_a_named_selector_shows_its_name_selects_what_it_stands_for_and_expands():
    from treeglob._core.selector import expanded, named

    tree = {"ln_f": {"scale": 1.0}, "fc": {"w": 2.0, "b": 3.0}}
    norms = named("NORMS", tg.optional(tg.glob("ln_*")))
    assert repr(norms) == "NORMS" and repr(~norms | "*.b") == "any_of(~NORMS, glob('*.b'))"
    assert expanded(~norms | "*.b") == "any_of(~optional(glob('ln_*')), glob('*.b'))"
    assert repr(norms) == "NORMS"  # expanding is over once it returns
    assert tg.mask(tree, norms) == tg.mask(tree, tg.glob("ln_*"))
    assert norms.may_be_empty and tg.labels(tree, [(named("X", tg.optional("nothing")), 1)], default=0)
    with pytest.raises(tg.NoMatchError, match=r"NOTHING matches no leaf.*\nClose matches in the tree: fc"):
        tg.mask(tree, named("NOTHING", "fcx"))
    report = tg.explain(tree, [(norms, "no_decay")], default="decay")
    assert (report.rules[0].selector, report.rules[0].expanded) == ("NORMS", "optional(glob('ln_*'))")
    assert "NORMS" in report.format() and "optional(glob('ln_*'))" in report.format(expand=True)


def test_bool_of_a_selector_raises():
    with pytest.raises(TypeError, match="has no truth value.*parentheses"):
        bool(tg.glob("a"))
    with pytest.raises(TypeError, match="has no truth value"):
        1 <= tg.ndim <= 3  # noqa: B015
    with pytest.raises(TypeError, match=r"must be compared with an int before it is combined"):
        "*.bias" & tg.ndim >= 2  # noqa: B015


@pytest.mark.parametrize(
    "bad, message",
    [
        (3, r"Cannot use int 3 as a selector.*lost its parentheses"),
        (tg.ndim, r"Cannot use _Metric treeglob.ndim as a selector.*Compare it first"),
        (len, r"Cannot use builtin_function_or_method .* treeglob.where\(fn\)"),
        ({"a": 1}, r"Cannot use dict \{'a': 1\} as a selector"),
    ],
)
def test_coercion_errors(bad, message):
    with pytest.raises(TypeError, match=message):
        tg.mask({"a": 1}, bad)


def test_argument_kind_errors():
    with pytest.raises(TypeError, match=r"needs an int on the right, got str"):
        tg.ndim >= "2"  # noqa: B015
    with pytest.raises(TypeError, match=r"inside\(\) takes classes, got str"):
        tg.inside("Linear")
    with pytest.raises(TypeError, match=r"shape\(\) takes non-negative ints"):
        tg.shape(-1)
    with pytest.raises(TypeError, match=r"dtype\(\) takes dtypes"):
        tg.dtype("not-a-dtype")
    with pytest.raises(TypeError, match=r"where\(\) takes a function"):
        tg.where("*.bias")
    with pytest.raises(TypeError, match=r"A glob pattern must be a str"):
        tg.glob(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got a selector .* where the tree goes"):
        tg.mask(tg.glob("a"), {"a": 1})


def test_bool_coerces_to_everything_or_nothing():
    assert tg.mask({"a": 1, "b": 2}, True) == {"a": True, "b": True}
    assert tg.mask({"a": 1, "b": 2}, False, strict=False) == {"a": False, "b": False}


def test_optax_accepts_masks_of_equinox_shape(transformer):
    params = eqx.filter(transformer, eqx.is_array)
    m = tg.mask(params, tg.ndim >= 2)
    tx = optax.adamw(0.1, weight_decay=0.5, mask=m)
    tx.init(params)  # an Equinox-shaped bool mask is not mistaken for a callable
