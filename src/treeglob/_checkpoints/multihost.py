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
3. Each process writes, at their offsets, the bytes of the shards it holds as
   replica 0 (`shard.replica_id == 0`): every shard is written exactly once, a
   replicated leaf by one device's process. A leaf that spans no processes (a NumPy
   array, an array on one process's devices) is written by process 0. Then each
   process flushes its writes to the disk.
4. Process 0 renames the file to its name: one atomic rename, so a reader sees the
   previous file or the new one, whole.

Every step ends with an exchange of each process's status (a collective), so that
one process's failure is every process's `SaveError`, and process 0 removes the
temporary file. A process that dies mid-save leaves the others waiting at the
next exchange until JAX's coordination service reports it gone; the temporary
file then stays, recognisable by its name, and the next save on process 0's host
removes it once its writer has exited.

The file system must be one that every process sees (a shared file system), and
that lets several processes write one file at disjoint offsets, as POSIX file
systems do.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from .._core.errors import SaveError
from .._core.tree import TreeView
from .base import partial_beside, save_error
from .export import Tensor
from .layout import Box, box, byte_runs
from .safetensors import header, little_endian
from .sharded import remove_stale

__all__ = ["save_from_every_process", "spans_processes"]

_NAME_BYTES = 4096  # the longest temporary file name process 0 sends the others


def spans_processes(leaf: Any) -> bool:
    """Whether no one process holds all of `leaf` (a JAX array over several processes' devices)."""
    return isinstance(leaf, jax.Array) and not leaf.is_fully_addressable


def save_from_every_process(
    target: pathlib.Path, tensors: list[Tensor], view: TreeView, layer_of: Callable[[int], tuple[int, ...]]
) -> None:
    """Write `tensors` to the `.safetensors` file `target` together with every other process
    (each calls this with the same tensors). `layer_of(row)` is the index of a stacked
    row's layer in its leaf (`()` for a leaf of its own).

    Raises:
        SaveError: a process's part failed; the file there before is unchanged.
    """
    start, offsets = header([(t.name, t.shape, t.dtype) for t in tensors])
    first = jax.process_index() == 0
    partial = partial_beside(target) if first else None
    try:
        failure = _attempt(lambda: _create(partial, start, offsets, tensors)) if first else None
        _agree("creating the file", failure, target)
        partial = pathlib.Path(_from_process_0(str(partial or "")))

        def write() -> None:
            with open(partial, "r+b") as f:
                for tensor, offset in zip(tensors, offsets, strict=True):
                    _write_own_part(f.fileno(), offset, tensor, view, layer_of, first)
                os.fsync(f.fileno())

        _agree("writing the shards", _attempt(write), target)
        failure = _attempt(lambda: _commit(partial, target)) if first else None
        _agree("renaming the file", failure, target)
    finally:
        if first and partial is not None:
            partial.unlink(missing_ok=True)


def _create(partial: Any, start: bytes, offsets: list[int], tensors: list[Tensor]) -> None:
    size = offsets[-1] + _nbytes(tensors[-1]) if tensors else len(start)
    with open(partial, "wb") as f:
        f.write(start)
        f.truncate(size)


def _commit(partial: pathlib.Path, target: pathlib.Path) -> None:
    os.replace(partial, target)
    remove_stale(target)  # an earlier sharded save's index would be read instead


def _nbytes(tensor: Tensor) -> int:
    return int(np.prod(tensor.shape, dtype=np.int64)) * np.dtype(tensor.dtype).itemsize


def _attempt(step: Callable[[], None]) -> BaseException | None:
    """Run this process's part of a step; its failure, kept to be reported to every process."""
    try:
        step()
    except Exception as exc:  # any failure: the other processes must hear of it, not wait
        return exc
    return None


def _agree(step: str, failure: BaseException | None, target: pathlib.Path) -> None:
    """Every process learns whether any failed `step`: all raise a `SaveError` if one did."""
    failed = np.asarray(multihost_utils.process_allgather(np.array(failure is not None)))
    if not failed.any():
        return
    which = ", ".join(map(str, np.flatnonzero(failed).tolist()))
    if isinstance(failure, OSError):
        raise save_error(target, failure) from failure
    if failure is not None:
        raise failure
    raise SaveError(
        f"save(): {step} of {str(target)!r} failed on process {which} (its error says why). The file "
        "there before, if any, is unchanged.",
        None,
    )


def _write_own_part(
    fd: int,
    offset: int,
    tensor: Tensor,
    view: TreeView,
    layer_of: Callable[[int], tuple[int, ...]],
    first: bool,
) -> None:
    """Write the bytes of `tensor` that this process holds as replica 0, at their offsets."""
    row = tensor.rows[0]
    leaf = view.leaves[row if view.origin is None else int(view.origin[row])]
    dtype = little_endian(tensor.dtype)
    if not spans_processes(leaf):
        if first:
            _write_runs(fd, offset, tensor.shape, None, np.asarray(tensor.make(), dtype))
        return
    layer = layer_of(row)
    for shard in leaf.addressable_shards:
        if shard.replica_id != 0:
            continue
        where = box(shard.index, leaf.shape)
        if not all(start <= k < stop for k, (start, stop) in zip(layer, where, strict=False)):
            continue  # the shard holds other layers only
        inside = tuple(k - start for k, (start, _) in zip(layer, where, strict=False))
        data = np.asarray(shard.data)[inside]
        _write_runs(fd, offset, tensor.shape, where[len(layer) :], np.asarray(data, dtype))


def _write_runs(fd: int, offset: int, shape: tuple[int, ...], where: Box | None, data: np.ndarray) -> None:
    """Write `data`, the slice `where` (all of it for None) of a tensor of `shape` whose bytes
    start at `offset`."""
    runs, length = byte_runs(shape, data.dtype.itemsize, where or tuple((0, n) for n in shape))
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    for k, run in enumerate(runs.tolist()):
        part, done = flat[k * length : (k + 1) * length], 0
        while done < length:
            done += os.pwrite(fd, part[done:].data, offset + run + done)


def _from_process_0(text: str) -> str:
    """`text` as process 0 has it, on every process."""
    raw = np.zeros(_NAME_BYTES, np.uint8)
    encoded = text.encode()[:_NAME_BYTES]
    raw[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    sent = np.asarray(multihost_utils.broadcast_one_to_all(raw)).astype(np.uint8)  # older JAX widens it
    return sent.tobytes().rstrip(b"\0").decode()
