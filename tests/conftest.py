"""Shared fixtures: a tiny Equinox Transformer and a mixed container tree; hypothesis profiles."""

import os
import pathlib
from typing import NamedTuple

import equinox as eqx
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# A bounded number of examples in CI; HYPOTHESIS_PROFILE=thorough locally for a deeper search.
settings.register_profile("ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "thorough", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: The repository: README.md, examples/, benchmarks/, src/.
ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_plan_command(model, checkpoint, *options):
    """`treeglob load-plan MODEL CHECKPOINT OPTIONS...` run in this process: its exit status."""
    from treeglob._cli.main import main

    return main(["load-plan", str(model), str(checkpoint), *options])


class Block(eqx.Module):
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __init__(self, dim: int, *, key):
        k1, k2 = jax.random.split(key)
        self.ln1 = eqx.nn.LayerNorm(dim)
        self.attn = eqx.nn.MultiheadAttention(2, dim, use_query_bias=True, key=k1)
        self.ln2 = eqx.nn.LayerNorm(dim)
        self.mlp = eqx.nn.MLP(dim, dim, 2 * dim, 1, key=k2)

    def __call__(self, x):
        h = jax.vmap(self.ln1)(x)
        x = x + self.attn(h, h, h)
        return x + jax.vmap(self.mlp)(jax.vmap(self.ln2)(x))


class Transformer(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: list[Block]
    ln_f: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, vocab: int = 11, dim: int = 4, depth: int = 2, *, key):
        keys = jax.random.split(key, depth + 2)
        self.embed = eqx.nn.Embedding(vocab, dim, key=keys[0])
        self.blocks = [Block(dim, key=k) for k in keys[2:]]
        self.ln_f = eqx.nn.LayerNorm(dim)
        self.head = eqx.nn.Linear(dim, vocab, key=keys[1])

    def __call__(self, tokens):
        x = jax.vmap(self.embed)(tokens)
        for block in self.blocks:
            x = block(x)
        return jax.vmap(lambda t: self.head(self.ln_f(t)))(x)


class Pair(NamedTuple):
    left: object
    right: object


@pytest.fixture
def transformer():
    return Transformer(key=jax.random.key(0))


@pytest.fixture
def params(transformer):
    return eqx.filter(transformer, eqx.is_array)


@pytest.fixture
def mixed_tree():
    return {
        "layers": [{"w": np.zeros((3, 2)), "b": np.zeros(2)}, {"w": np.zeros((2, 2)), "b": np.zeros(2)}],
        "norm": Pair(left=np.ones(2), right=None),
        "meta": {"step": 3, "name": "run"},
    }


# Model definitions for the framework tests, not a test module (and it needs flax and haiku).
collect_ignore = ["framework_models.py"]
