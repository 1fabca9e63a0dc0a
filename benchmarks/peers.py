"""What users write instead of treeglob, each next to the treeglob call that selects the same.

Every peer is a `Peer`: the task, how the peer does it, and the treeglob
call it is timed against. `run.py` asserts that both select exactly the
same leaves before it times them. The penzai and Flax NNX peers need the
`bench` extra (`pip install treeglob[bench]`); without it they are skipped.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.tree_util as jtu

import treeglob as tg


class Peer(NamedTuple):
    task: str
    name: str
    peer: Callable[[], Any]  # the peer's call, timed
    ours: Callable[[], Any]  # the treeglob call, timed
    selected: Callable[[Any], list[bool]]  # the peer's result as one bool per leaf of `ours`'s
    ours_selected: Callable[[Any], list[bool]]


def _leaves(tree: Any) -> list[Any]:
    return jax.tree.leaves(tree)


# ----------------------------------------------------------------------------
# Equinox: hand-written code over key paths, the seed's isinstance/tree_at, penzai

#: Path rules, first match wins: as globs for treeglob, as regexes over "/"-joined
#: names for the big_vision-style list (`re.fullmatch`, as its `make_mask_trees`).
PATH_RULES = [
    ("*.bias", r".*/bias", "no_decay"),
    ("{embed,pos_embed}", r"(.*/)?(embed|pos_embed)(/.*)?", "frozen"),
    ("blocks.{0..3}", r"(.*/)?blocks/[0-3](/.*)?", "early"),
    ("*.attn.{query,key,value}_proj.weight", r".*/attn/(query|key|value)_proj/weight", "attn"),
    ("head", r"(.*/)?head(/.*)?", "head"),
]

#: One mask by name: every attention projection's weight, and the head's.
MASK_GLOBS = ("*.attn.*_proj.weight", "head.weight")


def fnmatch_mask(params: Any) -> Any:
    """`tree_map_with_path` + `keystr` + `fnmatch`, as a user would write it."""

    def selected(key_path: Any, _: Any) -> bool:
        path = jtu.keystr(key_path, simple=True, separator=".")
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in MASK_GLOBS)

    return jtu.tree_map_with_path(selected, params)


def big_vision_labels(params: Any) -> Any:
    """big_vision's way: "/"-joined names, a list of regexes, the first that fully matches wins."""
    compiled = [(re.compile(regex), label) for _, regex, label in PATH_RULES]

    def first_match(key_path: Any, _: Any) -> str:
        name = jtu.keystr(key_path, simple=True, separator="/")
        return next((label for regex, label in compiled if regex.fullmatch(name)), "decay")

    return jtu.tree_map_with_path(first_match, params)


def seed_mask(params: Any) -> Any:
    """The seed's hand-written selection: Linear layers decayed whole, LayerNorm only its bias."""

    def is_layer(x: Any) -> bool:
        return isinstance(x, eqx.nn.Linear) or isinstance(x, eqx.nn.LayerNorm)

    def set_mask(x: Any) -> Any:
        if isinstance(x, eqx.nn.Linear):
            return jtu.tree_map(lambda _: True, x)
        elif isinstance(x, eqx.nn.LayerNorm):
            mask = jtu.tree_map(lambda _: False, x)
            return eqx.tree_at(lambda m: m.bias, mask, True)
        else:
            return jtu.tree_map(lambda _: False, x)

    return jtu.tree_map(set_mask, params, is_leaf=is_layer)


SEED_SELECTOR = tg.inside(eqx.nn.Linear) | (tg.inside(eqx.nn.LayerNorm) & tg.glob("bias"))


def equinox_peers(params: Any) -> list[Peer]:
    flat = jtu.tree_flatten_with_path(params)[0]
    # Exact paths for at_keypaths: the embedding, the position table and the head.
    exact = [
        kp
        for kp, _ in flat
        if jtu.keystr(kp, simple=True, separator=".").split(".")[0] in {"embed", "pos_embed", "head"}
    ]
    exact_selector = tg.any_of(*("^" + jtu.keystr(kp, simple=True, separator=".") + "$" for kp in exact))
    path_rules = [(pattern, label) for pattern, _, label in PATH_RULES]
    same = _leaves
    peers = [
        Peer(
            "labels, 5 path rules, first match",
            "big_vision-style regex list",
            lambda: big_vision_labels(params),
            lambda: tg.labels(params, path_rules, default="decay"),
            same,
            same,
        ),
        Peer(
            "mask, 2 globs",
            "tree_map_with_path + keystr + fnmatch",
            lambda: fnmatch_mask(params),
            lambda: tg.mask(params, tg.any_of(*MASK_GLOBS)),
            same,
            same,
        ),
        Peer(
            "mask, Linear | LayerNorm.bias",
            "seed: isinstance + eqx.tree_at",
            lambda: seed_mask(params),
            lambda: tg.mask(params, SEED_SELECTOR),
            same,
            same,
        ),
    ]
    try:
        from penzai import pz
    except ImportError:
        return peers
    false = jax.tree.map(lambda _: False, params)

    def all_true(subtree: Any) -> Any:
        return jax.tree.map(lambda _: True, subtree)

    def penzai_instances() -> Any:
        mask = pz.select(false).at_instances_of(eqx.nn.Linear).apply(all_true)
        return pz.select(mask).at_instances_of(eqx.nn.LayerNorm).at(lambda n: n.bias).set(True)

    def penzai_where() -> Any:
        mask = pz.select(false).at_subtrees_where(lambda x: isinstance(x, eqx.nn.Linear)).apply(all_true)
        where_norm = pz.select(mask).at_subtrees_where(lambda x: isinstance(x, eqx.nn.LayerNorm))
        return where_norm.at(lambda n: n.bias).set(True)

    peers += [
        Peer(
            "mask, Linear | LayerNorm.bias",
            "penzai at_instances_of",
            penzai_instances,
            lambda: tg.mask(params, SEED_SELECTOR),
            same,
            same,
        ),
        Peer(
            "mask, Linear | LayerNorm.bias",
            "penzai at_subtrees_where",
            penzai_where,
            lambda: tg.mask(params, SEED_SELECTOR),
            same,
            same,
        ),
        Peer(
            f"mask, {len(exact)} exact paths",
            "penzai at_keypaths",
            lambda: pz.select(false).at_keypaths(exact).set(True),
            lambda: tg.mask(params, exact_selector),
            same,
            same,
        ),
    ]
    return peers


# ----------------------------------------------------------------------------
# Flax NNX: filters on the module, map_state on a parameter State

#: What no decay touches: biases, the norms, the embeddings, by name (NNX's PathContains).
NO_DECAY = ("bias", "ln1", "ln2", "ln_f", "wte", "wpe")


def nnx_gpt(leaves: int) -> Any:
    """An abstract NNX GPT of about `leaves` parameters: one block built, then cloned."""
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, dim: int, *, rngs: nnx.Rngs):
            self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(4, dim, decode=False, rngs=rngs)
            self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
            self.fc = nnx.Linear(dim, 4 * dim, rngs=rngs)
            self.proj = nnx.Linear(4 * dim, dim, rngs=rngs)

    class GPT(nnx.Module):
        def __init__(self, dim: int, *, rngs: nnx.Rngs):
            self.wte = nnx.Embed(100, dim, rngs=rngs)
            self.wpe = nnx.Param(jax.numpy.zeros((64, dim)))
            self.blocks = nnx.List([Block(dim, rngs=rngs)])
            self.ln_f = nnx.LayerNorm(dim, rngs=rngs)
            self.head = nnx.Linear(dim, 100, rngs=rngs)

    model = nnx.eval_shape(lambda: GPT(64, rngs=nnx.Rngs(0)))
    per_block = len(jax.tree.leaves(nnx.state(model.blocks[0])))
    depth = max(1, round((leaves - 7) / per_block))
    # Cloned, not shared: NNX keeps a shared block once.
    model.blocks = nnx.List([nnx.clone(model.blocks[0]) for _ in range(depth)])
    return model


def nnx_peers(model: Any) -> list[Peer]:
    try:
        from flax import nnx
    except ImportError:
        return []
    state = nnx.state(model, nnx.Param)
    names = set(NO_DECAY)
    decay = nnx.All(nnx.Param, nnx.Not(nnx.Any(*(nnx.PathContains(name) for name in NO_DECAY))))
    ours_module = tg.inside(nnx.Param) - tg.any_of(*NO_DECAY)
    ours_state = ~tg.any_of(*NO_DECAY)
    paths = tg.paths(model)

    def by_path(selected_state: Any) -> list[bool]:
        chosen = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(selected_state)}
        return [p in chosen for p in paths]

    return [
        Peer(
            "NNX State: mask of the decayed Params",
            "nnx.map_state, a plain lambda",
            lambda: nnx.map_state(lambda path, _: not names.intersection(path), state),
            lambda: tg.mask(state, ours_state),
            _leaves,
            _leaves,
        ),
        Peer(
            "NNX module: the decayed Params",
            "nnx.state(model, filter)",
            lambda: nnx.state(model, decay),
            lambda: tg.mask(model, ours_module),
            by_path,
            _leaves,
        ),
        Peer(
            "NNX module: the decayed Params",
            "nnx.split(model, filter, ...)",
            lambda: nnx.split(model, decay, ...),
            lambda: tg.mask(model, ours_module),
            lambda split: by_path(split[1]),
            _leaves,
        ),
    ]
