"""Paths (SPEC §1): rendering, quoting, Equinox specifics, the round-trip invariant."""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import treeglob as tg


class Point(NamedTuple):
    x: object
    y: object


@jtu.register_pytree_node_class
class Node:
    """A custom node registered without keys: children get FlattenedIndexKey."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def tree_flatten(self):
        return (self.a, self.b), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


@pytest.mark.parametrize(
    "tree, expected",
    [
        ({"params": {"Dense_0": {"kernel": 0, "bias": 1}}}, ["params.Dense_0.bias", "params.Dense_0.kernel"]),
        ([1, [2, 3]], ["0", "1.0", "1.1"]),
        ((1, {"a": 2}), ["0", "1.a"]),
        ({0: "x", 10: "y"}, ["0", "10"]),
        ({"0": "x", "10": "y"}, ["0", "10"]),
        (Point(1, Point(2, 3)), ["x", "y.x", "y.y"]),
        ({"a": None, "b": 1}, ["b"]),
        (Node(1, [2]), ["0", "1.0"]),
        (jax.ShapeDtypeStruct((2,), jnp.float32), [""]),
        (
            {"conv.1": {"w": 1}, "": 2, "a b": 3, 'q"t': 4, "x*": 5, "back\\": 6},
            ['""', '"a b"', '"back\\\\"', '"conv.1".w', '"q\\"t"', '"x*"'],
        ),
        # Keys that are paths: a flat dict of dotted names, `/`-joined names, tuple keys.
        ({"h.0.w": 1, "h.1.w": 2, "wte": 3}, ["h.0.w", "h.1.w", "wte"]),
        ({"mlp/~/linear_0": {"w": 1, "b": 2}}, ["mlp.~.linear_0.b", "mlp.~.linear_0.w"]),
        (
            {("params", "Dense_0", "kernel"): 1, ("params", "Dense_0", "bias"): 2},
            ["params.Dense_0.bias", "params.Dense_0.kernel"],
        ),
        # ... unless splitting would make two paths collide: then they stay whole, quoted.
        ({"a.b": 1, "a": 2}, ["a", '"a.b"']),
        ({"a/b": {"c": 1}, "a": {"b": {"d": 2}}}, ["a.b.d", '"a/b".c']),
    ],
)
def test_paths(tree, expected):
    assert tg.paths(tree) == expected


def test_equinox_modules():
    key = jax.random.key(0)
    assert tg.paths(eqx.nn.MLP(2, 2, 3, 1, key=key)) == [
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
        "activation",
        "final_activation",
    ]
    seq = eqx.nn.Sequential([eqx.nn.Linear(2, 2, key=key), eqx.nn.Lambda(jax.nn.relu)])
    assert tg.paths(seq) == ["layers.0.weight", "layers.0.bias", "layers.1.fn"]
    assert tg.paths(eqx.nn.Conv2d(1, 2, 3, key=key)) == ["weight", "bias"]
    assert tg.paths(eqx.filter(eqx.nn.MultiheadAttention(2, 4, key=key), eqx.is_array)) == [
        "query_proj.weight",
        "key_proj.weight",
        "value_proj.weight",
        "output_proj.weight",
    ]


def test_batchnorm_state_has_index_only_paths():
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    assert tg.paths(eqx.filter(bn, eqx.is_array)) == ["weight", "bias"]
    assert tg.paths(state) == ["0", "1.0", "1.1"]


def test_shared_keeps_the_tied_weight_once():
    class Tied(eqx.Module):
        shared: eqx.nn.Shared

        def __init__(self, key):
            emb, head = eqx.nn.Embedding(5, 3, key=key), eqx.nn.Linear(3, 5, key=key)
            self.shared = eqx.nn.Shared((emb, head), lambda p: p[1].weight, lambda p: p[0].weight)

    params = eqx.filter(Tied(jax.random.key(0)), eqx.is_array)
    assert tg.paths(params) == ["shared.pytree.0.weight", "shared.pytree.1.bias"]


def test_every_path_selects_exactly_its_leaf(transformer):
    tree = {
        "model": eqx.filter(transformer, eqx.is_array),
        "weird": {"conv.1": 1, "": 2, "a b": [3, 4], 'q"t': 5, "{x}": 6, "^y$": 7, "b\\s": 8, "07": 9},
    }
    all_paths = tg.paths(tree)
    assert len(set(all_paths)) == len(all_paths)
    for p in all_paths:
        selected = [
            q for q, m in zip(all_paths, jax.tree.leaves(tg.mask(tree, "^" + p + "$")), strict=True) if m
        ]
        assert selected == [p]


def test_mixed_key_types_give_a_clear_error():
    with pytest.raises(TypeError, match="mixes key types"):
        tg.paths({1: "a", "b": 2})


class Picky:
    """A custom node whose unflatten refuses int leaves (the placeholders a one-level rebuild uses)."""

    def __init__(self, a, b):
        self.a, self.b = a, b


def _picky_unflatten(aux, children):
    if any(type(c) is int for c in children):
        raise TypeError("Picky holds no ints")
    return Picky(*children)


jax.tree_util.register_pytree_with_keys(
    Picky,
    lambda p: (((jax.tree_util.GetAttrKey("a"), p.a), (jax.tree_util.GetAttrKey("b"), p.b)), None),
    _picky_unflatten,
)


def test_custom_nodes_that_refuse_placeholders_still_select_by_path_and_type():
    tree = {"x": Picky(np.zeros(2), np.zeros(3)), "y": [Picky(np.zeros(1), np.zeros((2, 2)))]}
    assert tg.paths(tree) == ["x.a", "x.b", "y.0.a", "y.0.b"]
    assert [p for p, m in zip(tg.paths(tree), jax.tree.leaves(tg.mask(tree, "*.b")), strict=True) if m] == [
        "x.b",
        "y.0.b",
    ]
    assert jax.tree.leaves(tg.mask(tree, tg.inside(Picky) & "y")) == [False, False, True, True]
    assert jax.tree.leaves(tg.mask(tree, tg.owned_by(list), strict=False)) == [False] * 4


def test_structure_is_shared_by_equal_treedefs_and_follows_changes():
    a = {"blocks": [{"w": np.zeros(2)}] * 3}
    b = {"blocks": [{"w": np.zeros(2)}] * 4}
    assert jax.tree.leaves(tg.mask(a, "blocks.{2..9}")) == [False, False, True]
    assert jax.tree.leaves(tg.mask(b, "blocks.{2..9}")) == [False, False, True, True]
    assert jax.tree.leaves(tg.mask(a, "blocks.{2..9}")) == [False, False, True]


def test_what_the_structure_decides_is_remembered_and_what_the_leaves_decide_is_not():
    # Globs and types are remembered per treedef (read-only, for every later call);
    # shapes and the types of the leaves themselves are read on every call.
    from treeglob._core.selector import Context
    from treeglob._core.tree import TreeView

    class Tag:
        pass

    a = {"w": np.zeros((2, 2)), "b": np.zeros(2)}
    b = {"w": np.zeros(2), "b": np.zeros((2, 2))}  # the same treedef, other shapes
    assert tg.mask(a, tg.ndim >= 2) == {"b": False, "w": True}
    assert tg.mask(b, tg.ndim >= 2) == {"b": True, "w": False}
    assert tg.mask({"w": Tag(), "b": 1}, Tag) == {"b": False, "w": True}
    assert tg.mask({"w": 1, "b": Tag()}, Tag) == {"b": True, "w": False}
    view = TreeView(a)
    hit = Context(view, strict=True).evaluate(tg.glob("w"))
    assert hit.tolist() == [False, True] and not hit.flags.writeable
    assert Context(TreeView(b), strict=True).evaluate(tg.glob("w")) is hit
    for i in range(300):
        Context(view, strict=False).evaluate(tg.glob(f"x{i}"))
    assert view.structure.memo is not None and len(view.structure.memo) <= 128


def test_the_blocks_of_a_flat_checkpoint_share_one_structure():
    # As equal treedefs do: the blocks of a checkpoint are walked once, not once each.
    from treeglob._core.tree import TreeView

    flat = {f"blocks.{i}.{name}": np.zeros(2) for i in range(12) for name in ("attn.w", "mlp.w", "mlp.b")}
    blocks = dict(TreeView(flat).structure.children)["blocks"]
    assert [name for name, _ in blocks.children] == [str(i) for i in sorted(range(12), key=str)]
    assert len({id(child) for _, child in blocks.children}) == 1
    assert tg.paths(flat)[:3] == ["blocks.0.attn.w", "blocks.0.mlp.b", "blocks.0.mlp.w"]


def test_a_leaf_class_that_declares_shape_but_leaves_it_unset():
    class Meta:
        __slots__ = ("dtype", "shape")

    partial, full = Meta(), Meta()
    partial.dtype = full.dtype = np.dtype(np.float32)
    full.shape = (3,)
    assert tg.mask({"a": partial, "b": full, "c": np.zeros((2, 2))}, tg.ndim == 1) == {
        "a": False,
        "b": True,
        "c": False,
    }
