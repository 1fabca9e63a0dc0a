"""A soak of save -> load round trips: random trees, dtypes, stacked layouts, renames,
transforms and shard sizes, each bit for bit. A small count runs with the suite;
`TREEGLOB_SOAK=5000 python -m pytest tests/checkpoints/test_soak.py` runs as many as asked."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import treeglob as tg

COUNT = int(os.environ.get("TREEGLOB_SOAK", "40"))
DTYPES = [np.float32, np.float16, jnp.bfloat16, np.int8, np.int32, np.uint32, np.bool_, np.float64]


def random_tree(rng):
    """A model of blocks (a list, or stacked on a leading axis), a head, odd keys."""
    depth, stacked = int(rng.integers(1, 4)), bool(rng.integers(2))
    dtype = DTYPES[int(rng.integers(len(DTYPES)))]

    def array(shape):
        values = rng.standard_normal(shape) * 100
        return np.asarray(values).astype(dtype) if dtype is not np.bool_ else values > 0

    dims = [tuple(int(d) for d in rng.integers(1, 5, size=int(rng.integers(0, 3)))) for _ in range(3)]
    block = lambda lead: {f"p{k}": array((*lead, *shape)) for k, shape in enumerate(dims)}  # noqa: E731
    blocks = block((depth,)) if stacked else [block(()) for _ in range(depth)]
    tree = {"blocks": blocks, "head": {"w": array((2, 3)), "conv.1": array((3,))}}
    return tree, {"blocks": 1} if stacked else None


def assert_bits(a, b):
    assert tg.paths(a) == tg.paths(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


@pytest.mark.parametrize("seed", range(COUNT))
def test_save_then_load_is_bit_exact(tmp_path, seed):
    rng = np.random.default_rng(seed)
    tree, stacked = random_tree(rng)
    rules = {}
    if rng.integers(2):  # under other names: a prefix, renamed blocks, a transposed head
        rules = dict(rename=[("^h", "blocks"), ("^lm_head", "head")], transform=[("head.w", "transpose")])
    bfloat16 = any(np.asarray(x).dtype == jnp.bfloat16 for x in jax.tree.leaves(tree))  # not in .npz
    suffix = ".npz" if rng.integers(4) == 0 and not bfloat16 else ".safetensors"
    shard = int(rng.integers(16, 256)) if suffix == ".safetensors" and rng.integers(2) else None
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / f"model{suffix}"
    tg.save(path, tree, stacked=stacked, max_shard_size=shard, **rules)
    zeros = jax.tree.map(np.zeros_like, tree)
    loaded, report = tg.load(zeros, path if shard is None else path.parent, stacked=stacked, **rules)
    assert report.ok
    assert_bits(loaded, tree)
