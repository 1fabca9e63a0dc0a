"""Selecting modules and subtrees (`treeglob.modules`): what a selector means on a node."""

import equinox as eqx
import jax
import numpy as np
import pytest

import treeglob as tg
from conftest import Block, Transformer

MODEL = Transformer(key=jax.random.key(0))  # 2 blocks: ln1, attn, ln2, mlp (an MLP of 2 Linears)

PROJECTIONS = [f"{p}_proj" for p in ("query", "key", "value", "output")]
# The innermost nodes of a block: Equinox's attention keeps a Dropout, whose `p` is a leaf.
INNERMOST = [
    "ln1",
    *(f"attn.{p}" for p in PROJECTIONS),
    "attn.dropout",
    "ln2",
    "mlp.layers.0",
    "mlp.layers.1",
]


def per_block(*names):
    return [f"blocks.{i}.{name}" for i in range(2) for name in names]


CASES = [
    # a glob names a node whole: it ends at the node, as if it ended in `$`
    ("attn", "outermost", per_block("attn")),
    ("attn$", "outermost", per_block("attn")),  # the `$` written out
    ("attn.{query,value}_proj", "outermost", per_block("attn.query_proj", "attn.value_proj")),
    ("blocks.*", "outermost", ["blocks.0", "blocks.1"]),
    ("^blocks.0", "outermost", ["blocks.0"]),
    ("mlp.layers.1", "outermost", per_block("mlp.layers.1")),
    # `**` reaches every node below, and the node itself: outermost keeps it, innermost the deepest
    ("blocks.**", "outermost", ["blocks"]),
    (
        "blocks.**",
        "innermost",
        per_block(*INNERMOST),
    ),
    ("**", "outermost", [""]),  # the root, with the path ""
    # a class selects its instances (and what lies inside them)
    (eqx.nn.MLP, "outermost", per_block("mlp")),
    (
        eqx.nn.Linear,
        "outermost",
        [*per_block(*(f"attn.{p}" for p in PROJECTIONS), "mlp.layers.0", "mlp.layers.1"), "head"],
    ),
    (
        Block,
        "innermost",
        per_block(*INNERMOST),
    ),
    (tg.inside(eqx.nn.MLP) & "layers.0", "outermost", per_block("mlp.layers.0")),
    (tg.owned_by(Block), "outermost", per_block("ln1", "attn", "ln2", "mlp")),
    (tg.inside(eqx.nn.LayerNorm) - "blocks.**", "outermost", ["ln_f"]),
    # a regex matches the whole path, a predicate gets the node
    (r"re:blocks\.1\.(attn|mlp)", "outermost", ["blocks.1.attn", "blocks.1.mlp"]),
    (
        tg.where(lambda path, node: isinstance(node, eqx.nn.LayerNorm) and path.startswith("blocks.1")),
        "outermost",
        ["blocks.1.ln1", "blocks.1.ln2"],
    ),
    (["embed", "head"], "outermost", ["embed", "head"]),
]


@pytest.mark.parametrize("selector, nested, expected", CASES, ids=lambda x: repr(x)[:40])
def test_a_selector_selects_the_nodes_it_names(selector, nested, expected):
    assert tg.modules(MODEL, selector, nested=nested).paths == expected


def test_a_row_gives_the_path_type_leaf_count_and_the_node_itself():
    (row,) = tg.modules(MODEL, "^blocks.1.mlp")
    # 2 Linears of 2 arrays, and the activations, which are leaves in Equinox
    assert (row.path, row.type, row.leaves, row.layer) == ("blocks.1.mlp", eqx.nn.MLP, 6, None)
    assert row.module is MODEL.blocks[1].mlp


def test_the_table_lists_each_selected_module():
    table = str(tg.modules({"attn": {"q": {"w": 1, "b": 2}, "k": {"w": 3}}}, "attn.q"))
    assert table.splitlines() == [
        "1 module selected by glob('attn.q') (outermost of nested matches)",
        "path    type  leaves",
        "attn.q  dict  2",
    ]


def test_dict_keys_that_are_paths_make_nodes_at_the_paths_their_leaves_show():
    params = {"gpt/block_0/attn": {"w": 1, "b": 2}, "gpt/block_0/mlp": {"w": 3}, "head": {"w": 4}}
    assert tg.modules(params, "*", nested="innermost").paths == [
        "gpt.block_0.attn",
        "gpt.block_0.mlp",
        "head",
    ]
    with pytest.raises(tg.NoMatchError, match=r"(?s)It selects leaves \(gpt\.block_0\.attn\.b.*'mlp\.\*\*'"):
        tg.modules(params, "block_0")  # a prefix of Haiku module names, not a node


def test_wrappers_and_leaves_are_not_nodes():
    assert tg.modules({"a": np.zeros(2)}, "**", nested="innermost").paths == [""]
    assert tg.modules({"a": np.zeros(2)}, "a", strict=False).paths == []


def stacked_model():
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "blocks": eqx.filter_vmap(lambda k: Block(4, key=k))(keys),
        "head": eqx.nn.Linear(4, 2, key=keys[0]),
    }


def test_stacked_layers_are_listed_as_the_same_model_built_with_a_list_would_be():
    keys = jax.random.split(jax.random.key(0), 3)
    as_list = {"blocks": [Block(4, key=k) for k in keys], "head": eqx.nn.Linear(4, 2, key=keys[0])}
    stacked = tg.modules(stacked_model(), "**", nested="innermost", stacked={"blocks": 1})
    listed = tg.modules(as_list, "**", nested="innermost")
    assert [(r.path, r.type) for r in stacked] == [(r.path, r.type) for r in listed]
    assert [r.layer for r in stacked][: len(INNERMOST)] == [(0,)] * len(INNERMOST)
    assert stacked[-1].layer is None
    whole = tg.modules(stacked_model(), "blocks.*", stacked={"blocks": 1})
    assert [(r.path, r.type, r.layer) for r in whole] == [(f"blocks.{i}", Block, (i,)) for i in range(3)]
    (stack,) = tg.modules(stacked_model(), "blocks", stacked={"blocks": 1})
    assert stack.type.__name__ == "Layers" and stack.module is not None


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: tg.modules(MODEL, "atn"),
            tg.NoMatchError,
            r"glob\('atn'\) matches no module(.|\n)*Close matches in the tree: attn\.",
        ),
        (
            lambda: tg.modules(MODEL, "attn.query_proj.weight"),
            tg.NoMatchError,
            r"It selects leaves \(blocks\.0\.attn\.query_proj\.weight",
        ),
        (
            lambda: tg.modules(MODEL, tg.ndim >= 2),
            TypeError,
            r"\(ndim >= 2\) describes arrays, and a module or subtree is not one",
        ),
        (lambda: tg.modules(MODEL, "attn" & tg.shape(4, 4)), TypeError, r"shape\(4, 4\) describes arrays"),
        (
            lambda: tg.modules(MODEL, "attn", nested="deepest"),
            ValueError,
            r"modules\(nested='deepest'\) is not a choice(.|\n)*'innermost'",
        ),
        (
            lambda: tg.modules(tg.glob("attn"), MODEL),
            TypeError,
            r"modules\(\) got a selector \(glob\('attn'\)\) where the tree goes",
        ),
        (
            lambda: tg.modules("attn", MODEL),
            TypeError,
            r"modules\(\) got a selector \('attn'\) where the tree goes",
        ),
        (
            lambda: tg.modules(MODEL, ~tg.glob("atn")),
            tg.NoMatchError,
            r"The negated selector glob\('atn'\) matches no module",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_the_haiku_hint_comes_only_for_trees_with_slash_names():
    with pytest.raises(tg.NoMatchError) as info:
        tg.modules(MODEL, "attn.query_proj.weight")
    assert "Haiku" not in str(info.value)
    with pytest.raises(
        tg.NoMatchError,
        match=r"`mlp` in `mlp/~/linear_0`\) is no node: select the modules below it \('mlp\.\*\*'\)",
    ):
        tg.modules({"mlp/~/linear_0": {"w": 1}}, "mlp")
    assert tg.modules({"mlp/~/linear_0": {"w": 1}}, "mlp.**").paths == ["mlp.~.linear_0"]


def test_an_error_in_a_predicate_names_the_module_it_was_asked_about():
    with pytest.raises(AttributeError) as info:
        tg.modules(MODEL, tg.where(lambda path, node: node.weight is not None))
    assert "on the module at path ''." in info.value.__notes__[0]


def test_optional_and_non_strict_selections_may_be_empty():
    assert tg.modules(MODEL, tg.optional("lora")).paths == []
    assert tg.modules(MODEL, "lora", strict=False).paths == []
