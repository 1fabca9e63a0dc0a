"""Where a slice of a C-ordered tensor lies in its bytes: the runs to read or write.

A device's shard of a tensor is a box of index ranges (`shard.index`, a tuple of
slices). In the C-ordered bytes of the whole tensor, the box is a set of equally
long runs: the dimensions after the last one the box cuts are whole, so each run
spans them; there is one run per index of the dimensions before it. A row split
of a matrix is one run, a column split one run per row. Reading or writing
those runs touches exactly the shard's bytes, and no page of the others.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["Box", "box", "byte_runs", "extent", "run_count", "slices", "whole"]

#: Per dimension, `(start, stop)`.
Box = tuple[tuple[int, int], ...]


def box(index: Any, shape: tuple[int, ...]) -> Box:
    """The `(start, stop)` of each dimension that `index` (slices with step 1, as JAX's
    shard indices are, or `Ellipsis`) takes from a tensor of `shape`: hashable, so the
    devices that hold the same slice can share one read."""
    if index is Ellipsis or index == ():
        index = ()
    elif not isinstance(index, tuple):
        index = (index,)
    if len(index) > len(shape):
        raise ValueError(f"a shard index of {len(index)} slices for a tensor of {len(shape)} dimensions")
    out = []
    for size, part in zip(shape, (*index, *[slice(None)] * (len(shape) - len(index))), strict=True):
        if not isinstance(part, slice):
            raise TypeError(f"a shard index is made of slices, got {part!r}")
        start, stop, step = part.indices(size)
        if step != 1:
            raise ValueError(f"a shard index has slices of step 1, got {part!r}")
        out.append((start, max(start, stop)))
    return tuple(out)


def whole(shape: tuple[int, ...]) -> Box:
    """The box of the whole tensor."""
    return tuple((0, n) for n in shape)


def extent(where: Box) -> tuple[int, ...]:
    """The shape of the slice `where`."""
    return tuple(stop - start for start, stop in where)


def slices(where: Box) -> tuple[slice, ...]:
    """`where` as an index for NumPy."""
    return tuple(slice(start, stop) for start, stop in where)


def _cut(shape: tuple[int, ...], where: Box) -> int:
    """The last dimension the slice cuts (-1 for none): those after it lie inside each run."""
    return max((d for d, (start, stop) in enumerate(where) if (start, stop) != (0, shape[d])), default=-1)


def run_count(shape: tuple[int, ...], where: Box) -> int:
    """How many runs `byte_runs` gives, without making them."""
    if 0 in extent(where):
        return 0
    return math.prod(extent(where[: max(_cut(shape, where), 0)]))


def byte_runs(shape: tuple[int, ...], itemsize: int, where: Box) -> tuple[np.ndarray, int]:
    """The byte offsets (from the tensor's first byte, increasing) of the runs that hold the
    slice `where` of a C-ordered tensor of `shape`, and the length of each run. The runs,
    read in order, are the slice's bytes in C order."""
    extents = extent(where)
    if 0 in extents:
        return np.zeros(0, np.int64), 0
    cut = _cut(shape, where)
    if cut < 0:
        return np.zeros(1, np.int64), math.prod(shape) * itemsize
    strides = [math.prod(shape[d + 1 :]) * itemsize for d in range(len(shape))]
    length = extents[cut] * strides[cut]
    offsets = np.full((), where[cut][0] * strides[cut], np.int64)
    for d in range(cut):  # one run per index of the dimensions before the cut
        start, stop = where[d]
        offsets = np.add.outer(offsets, np.arange(start, stop, dtype=np.int64) * strides[d])
    # np.add.outer puts the later dimension last: the runs come out in C order already.
    return offsets.reshape(-1) if offsets.ndim else offsets.reshape(1), length
