"""Sharded `.safetensors` checkpoints: several files read as one.

Hugging Face publishes a model above a few GB as `model-00001-of-0000N.safetensors`
files beside `model.safetensors.index.json`, whose `weight_map` names the file of
each tensor. Such a checkpoint is opened from its index file, from the directory
that holds it, or from a list of `.safetensors` files (a directory of them without
an index is that list). Only the headers are read on opening; a tensor's bytes
are read from its own shard when a load asks for it. The shards' tensors form one
flat dict, so the missing and unused checks of a load span every shard.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._core.errors import SourceError
from .base import Checkpoint, written_beside
from .formats import INDEX_SUFFIX
from .safetensors import SafetensorsCheckpoint, TensorInfo, write

__all__ = [
    "ShardedCheckpoint",
    "holds_shards",
    "open_files",
    "open_index",
    "open_path",
    "remove_stale",
    "write_sharded",
]


class ShardedCheckpoint(Checkpoint):
    """Several `.safetensors` files as one checkpoint: each tensor read from its own file."""

    slices = True

    def __init__(self, shards: Sequence[SafetensorsCheckpoint], where: str):
        self.shards = list(shards)
        tree: dict[str, TensorInfo] = {}
        owner: dict[str, SafetensorsCheckpoint] = {}
        for shard in self.shards:
            for name, info in shard.tree.items():
                if name in owner:
                    raise SourceError(
                        f"{where}: the tensor {name!r} is in two shards, {owner[name].where} and {shard.where}; "
                        "a sharded checkpoint holds each tensor once."
                    )
                tree[name], owner[name] = info, shard
        super().__init__(where, tree)
        # The leaves are the dict's values in key order, as JAX flattens a dict.
        self._owners = [owner[name] for name in sorted(tree)]
        self._names = sorted(tree)

    def _read(self, row: int, path: str) -> np.ndarray:
        return self._owners[row].read_tensor(self.view.leaves[row], self._names[row])

    def read_slice(self, path: str, index: Any) -> np.ndarray:
        row = self.rows[path]
        return self._owners[row].read_tensor_slice(self.view.leaves[row], self._names[row], index)


def open_path(path: pathlib.Path) -> ShardedCheckpoint:
    """A sharded checkpoint from its index file, or from the directory of its shards."""
    return open_directory(path) if path.is_dir() else open_index(path)


def open_files(files: Sequence[str | os.PathLike[str]], where: str | None = None) -> ShardedCheckpoint:
    """The `.safetensors` files `files` as one checkpoint."""
    paths = list(dict.fromkeys(pathlib.Path(f).resolve() for f in files))  # each file once
    if not paths:
        raise SourceError(f"{where or 'the list of files'}: no .safetensors files to read.")
    for path in paths:
        if path.suffix != ".safetensors":
            raise SourceError(
                f"{path}: a list of files is read as the shards of one checkpoint, which must all be "
                ".safetensors files."
            )
        if not path.is_file():
            raise SourceError(f"{path}: no such file (a shard of {where or 'the list of files'}).")
    described = where or f"{len(paths)} .safetensors files ({paths[0].name}, ...)"
    return ShardedCheckpoint([SafetensorsCheckpoint(p) for p in paths], described)


def open_index(index: pathlib.Path) -> ShardedCheckpoint:
    """The checkpoint a Hugging Face index file describes; its `weight_map` is checked
    against the shards' own headers."""
    where = str(index)
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{where}: not a readable index file: {exc}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SourceError(
            f'{where}: not a safetensors index file: it needs a "weight_map" object mapping each tensor '
            "name to the file that holds it."
        )
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise SourceError(
            f"{where}: the shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} named in its weight_map "
            f"{'are' if len(missing) > 1 else 'is'} not in {index.parent}."
        )
    checkpoint = open_files([index.parent / f for f in files], where)
    for name, file in weight_map.items():
        at = (index.parent / file).resolve()
        shard = next((s for s in checkpoint.shards if s.path == at), None)
        if shard is None or name not in shard.tree:
            raise SourceError(
                f"{where}: its weight_map puts the tensor {name!r} in {file}, which does not hold it."
            )
    unlisted = sorted(set(checkpoint.tree) - set(weight_map))
    if unlisted:
        raise SourceError(
            f"{where}: the shards hold tensors its weight_map does not list: {', '.join(unlisted[:5])}"
            f"{', ...' if len(unlisted) > 5 else ''}."
        )
    return checkpoint


def holds_shards(directory: pathlib.Path) -> bool:
    """Whether a directory is a sharded checkpoint: an index file, or `.safetensors` files."""
    return any(directory.glob("*" + INDEX_SUFFIX)) or any(directory.glob("*.safetensors"))


def open_directory(directory: pathlib.Path) -> ShardedCheckpoint:
    """The sharded checkpoint in a directory: by its index file, else all its `.safetensors` files."""
    indexes = sorted(directory.glob("*" + INDEX_SUFFIX))
    if len(indexes) > 1:
        raise SourceError(
            f"{directory}: holds several index files ({', '.join(i.name for i in indexes)}); name the one to "
            "read."
        )
    if indexes:
        return open_index(indexes[0])
    return open_files(sorted(directory.glob("*.safetensors")), str(directory))


def write_sharded(
    path: pathlib.Path,
    tensors: list[tuple[str, tuple[int, ...], Any]],
    read: Callable[[int], np.ndarray],
    max_shard_size: int,
) -> list[pathlib.Path]:
    """Write `tensors` as Hugging Face does above `max_shard_size` bytes: for `model.safetensors`,
    `model-00001-of-0000N.safetensors` files of at most that size each (a larger tensor
    alone in its file), then `model.safetensors.index.json`; a single file where all fit.
    The index is written last, so a reader never sees one that names a missing shard.
    Where an earlier save left files of those names, this save's shards are named
    `model-<token>-00001-of-0000N.safetensors` (readers follow the index's `weight_map`):
    the index is the one commit of a sharded save. Returns the files written."""
    shards: list[list[int]] = [[]]
    size = 0
    for k, (_, shape, dtype) in enumerate(tensors):
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    index = path.with_name(path.name + INDEX_SUFFIX.removeprefix(".safetensors"))
    stale = _listed(index)
    if len(shards) == 1:
        write(path, tensors, read)
        _remove(stale, index, keep=[path])
        return [path]
    # The index is the commit: the shards of this save never take the names of files an
    # earlier save's index still names, so that until the new index is in place the old
    # checkpoint is whole (a failure, or a kill, between two shards leaves it as it was).
    stem = path.name.removesuffix(".safetensors")
    files = [
        path.with_name(f"{stem}-{k:05d}-of-{len(shards):05d}.safetensors") for k in range(1, len(shards) + 1)
    ]
    if any(file in stale or file.exists() for file in files):
        token = secrets.token_hex(4)
        files = [file.with_name(f"{stem}-{token}{file.name.removeprefix(stem)}") for file in files]
    weight_map: dict[str, str] = {}
    try:
        for file, members in zip(files, shards, strict=True):
            write(file, [tensors[k] for k in members], lambda j, members=members: read(members[j]))
            weight_map |= dict.fromkeys((tensors[k][0] for k in members), file.name)
        total = sum(math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype in tensors)
        with written_beside(index) as partial:
            partial.write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
    except BaseException:
        _remove(files, None, keep=[])  # this save's shards: the old checkpoint stays as it was
        raise
    _remove([*stale, path], None, keep=files)  # what an earlier save left at `path`
    return [*files, index]


def _listed(index: pathlib.Path) -> list[pathlib.Path]:
    """The shards an existing index file names (none where there is no readable index)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({index.parent / file for file in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def remove_stale(path: pathlib.Path) -> None:
    """After a single `.safetensors` file is written at `path`: the index and shards of an
    earlier sharded save there would be read instead of it (a directory is read by its
    index), so they go: the index first, so that no reader sees it name a removed shard."""
    index = path.with_name(path.name + INDEX_SUFFIX.removeprefix(".safetensors"))
    _remove(_listed(index), index, keep=[path])


def _remove(shards: list[pathlib.Path], index: pathlib.Path | None, keep: list[pathlib.Path]) -> None:
    if index is not None:
        index.unlink(missing_ok=True)
    for shard in shards:
        if shard not in keep:
            shard.unlink(missing_ok=True)
