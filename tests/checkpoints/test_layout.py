"""The byte runs of a slice of a C-ordered tensor, and slices read by them: exactly the
slice's bytes, one read per run."""

import os
import pathlib

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

import treeglob as tg
from treeglob._checkpoints import safetensors
from treeglob._checkpoints.layout import box, byte_runs, extent, run_count, slices, whole


@pytest.mark.parametrize(
    ("shape", "index", "offsets", "length"),
    [
        ((4, 6), (slice(0, 2), slice(None)), [0], 48),  # rows: one run
        ((4, 6), (slice(2, 4), slice(None)), [48], 48),
        ((4, 6), (slice(None), slice(3, 6)), [12, 36, 60, 84], 12),  # columns: a run per row
        ((4, 6), (slice(1, 3), slice(0, 2)), [24, 48], 8),
        ((2, 3, 4), (slice(None), slice(1, 2), slice(None)), [16, 64], 16),
        ((2, 3, 4), (slice(1, 2),), [48], 48),  # missing dimensions are whole
        ((4, 6), Ellipsis, [0], 96),
        ((), (), [0], 4),
        ((4, 6), (slice(2, 2), slice(None)), [], 0),  # empty
    ],
)
def test_byte_runs(shape, index, offsets, length):
    got, run = byte_runs(shape, 4, box(index, shape))
    assert (got.tolist(), run) == (offsets, length)
    assert got.dtype == np.int64  # offsets past 2 GiB fit


@pytest.mark.parametrize(
    ("index", "shape", "where"),
    [
        ((slice(1, 3), slice(2, 6)), (4, 6), ((1, 3), (2, 6))),
        (slice(1, 3), (4, 6), ((1, 3), (0, 6))),  # one slice, not in a tuple
        (Ellipsis, (4, 6), ((0, 4), (0, 6))),
        ((slice(3, 1),), (4,), ((3, 3),)),  # an empty slice stays empty
    ],
)
def test_a_box_and_its_extent_and_slices(index, shape, where):
    assert box(index, shape) == where
    assert extent(where) == tuple(stop - start for start, stop in where)
    assert np.zeros(shape)[slices(where)].shape == extent(where)
    assert box(slices(where), shape) == where
    assert extent(whole(shape)) == shape and box(Ellipsis, shape) == whole(shape)


@st.composite
def slices_of(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=4)))
    index = []
    for size in shape:
        start = draw(st.integers(0, size))
        index.append(slice(start, draw(st.integers(start, size))))
    return shape, tuple(index)


@settings(max_examples=300, deadline=None)
@given(slices_of())
def test_the_runs_read_in_order_are_the_slice_in_c_order(case):
    shape, index = case
    tensor = np.arange(int(np.prod(shape)), dtype=np.int16).reshape(shape)
    raw = tensor.tobytes()
    offsets, length = byte_runs(shape, 2, box(index, shape))
    assert run_count(shape, box(index, shape)) == len(offsets)
    assert b"".join(raw[o : o + length] for o in offsets.tolist()) == tensor[index].tobytes()


def test_a_shard_index_with_a_step_is_refused():
    with pytest.raises(ValueError, match=r"a shard index has slices of step 1, got slice\(None, None, 2\)"):
        box((slice(None, None, 2),), (4,))
    with pytest.raises(TypeError, match="a shard index is made of slices, got 1"):
        box((1,), (4,))
    with pytest.raises(ValueError, match="a shard index of 3 slices for a tensor of 2 dimensions"):
        box((slice(None),) * 3, (4, 6))


def bytes_read() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="reads /proc/self/io (Linux)")
@pytest.mark.parametrize(
    "index", [(slice(0, 128), slice(None)), (slice(None), slice(32, 64)), (slice(64, 256), slice(8, 40))]
)
def test_a_slice_reads_only_its_bytes(tmp_path, index, monkeypatch):
    tensor = np.random.default_rng(0).normal(size=(256, 64)).astype(np.float32)
    path = tmp_path / "m.safetensors"
    tg.save(path, {"x": tensor})
    checkpoint = safetensors.SafetensorsCheckpoint(pathlib.Path(path))
    start = bytes_read()
    part = checkpoint.read_slice("x", index)
    read = bytes_read() - start
    np.testing.assert_array_equal(part, tensor[index])
    assert part.nbytes <= read < part.nbytes + 4096  # (+ this file's own /proc read)
    # Past MAX_RUNS runs, the slice is read through the memory map: the same values.
    monkeypatch.setattr(safetensors, "MAX_RUNS", 1)
    np.testing.assert_array_equal(checkpoint.read_slice("x", index), tensor[index])
