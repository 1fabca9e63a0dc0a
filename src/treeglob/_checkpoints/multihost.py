"""Saving from every JAX process at once: each shard written once, by a process that
holds it, into one `.safetensors` file.

A model whose arrays span several processes (one process per host, a global mesh)
cannot be saved by one of them: no process can fetch the others' shards. Every
process calls `save` with the same model, and they write one file together:

1. Each process plans the same tensors, names, shapes and byte offsets, from the
   model's metadata alone.
2. Process 0 creates a temporary file beside the target (named by its process id,
   a random token and its host, as a single process's save is), writes the header,
   and sizes the file. The name goes to every process.
3. A tensor whose leaf some process holds whole (a NumPy array, an array on its own
   devices) is written by the first such process, through its export transform if
   any. Of the others, each process writes, at their offsets, the bytes of the
   shards it holds as replica 0 (`shard.replica_id == 0`): every shard is written
   exactly once, a replicated leaf by one device's process. Then each process flushes
   its writes to the disk.
4. Process 0 renames the file to its name: one atomic rename, so a reader sees the
   previous file or the new one, whole.

Planning, and every step after it, ends with an exchange of each process's status
(a collective), so that one process's failure is an error on every process (and no
process waits for the others at a step they never reach); process 0 then removes
the temporary file. A process that dies mid-save leaves the others waiting at the
next exchange until JAX's coordination service reports it gone; the temporary
file then stays, recognisable by its name, and the next save on process 0's host
removes it once its writer has exited.

The file system must be one that every process sees (a shared file system), and
that lets several processes write one file at disjoint offsets, as POSIX file
systems do.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from .._core.errors import SaveError, listing
from .._core.tree import TreeView
from .base import partial_beside, save_error
from .export import Tensor
from .layout import Box, box, byte_runs, whole
from .safetensors import header, little_endian
from .sharded import remove_stale

__all__ = [
    "WHOLE_VALUE_ACROSS_PROCESSES",
    "agreed",
    "holds_whole",
    "save_from_every_process",
    "spans_processes",
]

_NAME_BYTES = 4096  # the longest temporary file name process 0 sends the others


def spans_processes(leaf: Any) -> bool:
    """Whether `leaf` is a JAX array on the devices of several processes: the same answer on
    every process (unlike `is_fully_addressable`, which a process answers for itself)."""
    return isinstance(leaf, jax.Array) and len({d.process_index for d in leaf.sharding.device_set}) > 1


@contextlib.contextmanager
def agreed(step: str, target: pathlib.Path) -> Iterator[None]:
    """Run this process's part of `step`, then learn every other's: a failure on any
    process is an error on all of them (its own on the process that failed), so that no
    process goes on to a collective the others never reach."""
    try:
        yield
    except Exception as exc:
        _agree(step, exc, target)
        raise
    _agree(step, None, target)


def save_from_every_process(
    target: pathlib.Path, tensors: list[Tensor], view: TreeView, layer_of: Callable[[int], tuple[int, ...]]
) -> None:
    """Write `tensors` to the `.safetensors` file `target` together with every other process
    (each calls this with the same tensors). `layer_of(row)` is the index of a stacked
    row's layer in its leaf (`()` for a leaf of its own).

    A tensor is written whole by the first process that holds all of its leaf (a NumPy
    array, an array on that process's devices), through its export transform if any;
    else each process writes the shards it holds as replica 0.

    Raises:
        SaveError: a process's part failed; the file there before is unchanged.
        ValueError: a tensor that needs a whole value no process holds.
    """
    start, offsets, size = header([(t.name, t.shape, t.dtype) for t in tensors])
    writers = _whole_writers(tensors, view)
    refused = [
        f"{view.paths[t.rows[0]]}: {WHOLE_VALUE_ACROSS_PROCESSES}"
        for t, writer in zip(tensors, writers, strict=True)
        if writer < 0 and not t.verbatim
    ]
    if refused:  # the same on every process: each raises it
        raise ValueError(
            f"save(): {len(refused)} tensors cannot be written from their shards:\n{listing(refused)}"
        )
    me = jax.process_index()
    partial = partial_beside(target) if me == 0 else None
    try:
        with agreed("creating the file", target):
            if partial is not None:
                with open(partial, "wb") as f:
                    f.write(start)
                    f.truncate(size)
        partial = pathlib.Path(_from_process_0(os.fsencode(partial) if partial is not None else b""))
        with agreed("writing the shards", target), open(partial, "r+b") as f:
            for tensor, offset, writer in zip(tensors, offsets, writers, strict=True):
                if writer == me:
                    value = np.asarray(tensor.make(), tensor.dtype)
                    _write_runs(f.fileno(), offset, tensor.shape, whole(tensor.shape), value)
                elif writer < 0:
                    _write_own_shards(f.fileno(), offset, tensor, view, layer_of)
            os.fsync(f.fileno())
        with agreed("renaming the file", target):
            if me == 0:
                os.replace(partial, target)
                remove_stale(target)  # an earlier sharded save's index would be read instead
    finally:
        if me == 0 and partial is not None:
            partial.unlink(missing_ok=True)


#: Why a tensor cannot be written from the shards of its leaf.
WHOLE_VALUE_ACROSS_PROCESSES = (
    "it lies on other JAX processes' devices, and writing it needs its whole value on one process (the "
    "rules transform, join or compare it): save it under the model's own names, or gather it first "
    "(jax.experimental.multihost_utils.process_allgather)"
)


def holds_whole(leaf: Any) -> bool:
    """Whether this process can read all of `leaf` (a NumPy array, or a JAX array on its devices)."""
    return not isinstance(leaf, jax.Array) or leaf.is_fully_addressable


def _whole_writers(tensors: list[Tensor], view: TreeView) -> list[int]:
    """Per tensor, the first process that holds all of its leaves, or -1 where none does."""
    if not tensors:
        return []
    mine = np.array([all(holds_whole(view.leaves[view.leaf_of(r)]) for r in t.rows) for t in tensors], bool)
    held = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(tensors))
    return [int(np.argmax(column)) if column.any() else -1 for column in held.T]


def _agree(step: str, failure: BaseException | None, target: pathlib.Path) -> None:
    """Every process learns whether any failed `step`: all raise if one did, the process
    that failed its own error (a `SaveError` for a file system's), the others a `SaveError`
    naming it."""
    failed = np.asarray(multihost_utils.process_allgather(np.array(failure is not None))).reshape(-1)
    if not failed.any():
        return
    if isinstance(failure, OSError) and not isinstance(failure, SaveError):
        raise save_error(target, failure) from failure
    if failure is not None:
        raise failure
    which = ", ".join(map(str, np.flatnonzero(failed).tolist()))
    raise SaveError(
        f"save(): {step} of {str(target)!r} failed on process {which} (its error says why). The file "
        "there before, if any, is unchanged.",
        None,
    )


def _write_own_shards(
    fd: int, offset: int, tensor: Tensor, view: TreeView, layer_of: Callable[[int], tuple[int, ...]]
) -> None:
    """Write the bytes of `tensor` that this process holds as replica 0, at their offsets."""
    row = tensor.rows[0]
    leaf = view.leaves[view.leaf_of(row)]
    layer = layer_of(row)
    for shard in leaf.addressable_shards:
        if shard.replica_id != 0:
            continue
        where = box(shard.index, leaf.shape)
        if not all(start <= k < stop for k, (start, stop) in zip(layer, where, strict=False)):
            continue  # the shard holds other layers only
        inside = tuple(k - start for k, (start, _) in zip(layer, where, strict=False))
        # A stacked leaf's layer is sliced on the device first: only it is fetched.
        data = np.asarray(shard.data[inside] if inside else shard.data)
        _write_runs(fd, offset, tensor.shape, where[len(layer) :], data.astype(tensor.dtype, copy=False))


def _write_runs(fd: int, offset: int, shape: tuple[int, ...], where: Box, data: Any) -> None:
    """Write `data`, the slice `where` of a tensor of `shape` whose bytes start at `offset`,
    in the file's byte order."""
    array = np.ascontiguousarray(data, dtype=little_endian(np.asarray(data).dtype))
    runs, length = byte_runs(shape, array.dtype.itemsize, where)
    flat = array.reshape(-1).view(np.uint8)
    for k, run in enumerate(runs.tolist()):
        part, done = flat[k * length : (k + 1) * length], 0
        while done < length:
            done += os.pwrite(fd, part[done:].data, offset + run + done)


def _from_process_0(name: bytes) -> str:
    """The file name process 0 has, on every process."""
    raw = np.zeros(_NAME_BYTES, np.uint8)
    raw[: len(name)] = np.frombuffer(name[:_NAME_BYTES], np.uint8)
    sent = np.asarray(multihost_utils.broadcast_one_to_all(raw)).astype(np.uint8)  # older JAX widens it
    return os.fsdecode(sent.tobytes().rstrip(b"\0"))
