"""The checkpoint formats treeglob reads and writes, in one registry.

Each format is one module (`safetensors.py`, `npz.py`, `sharded.py`, `orbax.py`)
and one `Format` entry here: how it is recognised (a file suffix, or a directory),
how it is opened, and how it is written where treeglob writes it. Opening,
`treeglob.save`, the command line's help and every message about formats are
rendered from `FORMATS`, so adding a format is one module and one entry.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._core.errors import SourceError
from . import npz, safetensors, sharded
from .base import Checkpoint, TreeCheckpoint

__all__ = ["FORMATS", "Format", "format_for_writing", "is_checkpoint", "open_checkpoint", "readable"]

#: A writer: `write(path, [(name, shape, dtype), ...], read)`, `read(k)` giving the k-th tensor.
Writer = Callable[
    [str | os.PathLike[str], list[tuple[str, tuple[int, ...], Any]], Callable[[int], np.ndarray]], None
]


def _orbax(path: pathlib.Path) -> Checkpoint:
    from .orbax import OrbaxCheckpoint  # imports orbax (an extra) only when asked for

    return OrbaxCheckpoint(path)


def _sharded(path: pathlib.Path) -> Checkpoint:
    return sharded.open_directory(path) if path.is_dir() else sharded.open_index(path)


@dataclass(frozen=True)
class Format:
    """One checkpoint format.

    Attributes:
        name: how messages name it.
        suffix: how the name of its file ends, or "" for a format stored only as a directory.
        open: the reader: a path (a file with `suffix`, or a directory it `claims`) to a
            `Checkpoint` of its metadata.
        write: the writer, or None where treeglob does not write the format.
        claims: the directories it reads (asked in `FORMATS` order), or None.
        directory: how help and messages name such a directory.
    """

    name: str
    suffix: str
    open: Callable[[pathlib.Path], Checkpoint]
    write: Writer | None = None
    claims: Callable[[pathlib.Path], bool] | None = None
    directory: str = ""


FORMATS: tuple[Format, ...] = (
    Format("safetensors", ".safetensors", safetensors.SafetensorsCheckpoint, safetensors.write),
    Format("npz", ".npz", npz.NpzCheckpoint, npz.write),
    Format(
        "sharded safetensors",
        sharded.INDEX_SUFFIX,
        _sharded,
        claims=sharded.holds_shards,
        directory="a directory of .safetensors shards",
    ),
    Format("orbax", "", _orbax, claims=lambda path: True, directory="an orbax checkpoint directory"),
)


def _by_suffix(path: pathlib.Path) -> Format | None:
    """The format whose suffix ends the file's name (the longest: `.safetensors.index.json`)."""
    found = [f for f in FORMATS if f.suffix and path.name.endswith(f.suffix)]
    return max(found, key=lambda f: len(f.suffix), default=None)


def readable() -> str:
    """`a .safetensors, .npz or ... file, ..., or an orbax checkpoint directory`: for help and messages."""
    files = [f.suffix for f in FORMATS if f.suffix]
    directories = [f.directory for f in FORMATS if f.directory]
    return (
        f"a {', '.join(files[:-1])} or {files[-1]} file, {', '.join(directories[:-1])}, or {directories[-1]}"
    )


def is_checkpoint(path: pathlib.Path) -> bool:
    """Whether `path` names a checkpoint by its form (a known suffix, or a directory)."""
    return _by_suffix(path) is not None or path.is_dir()


def open_checkpoint(source: Any) -> Checkpoint:
    """A checkpoint of a registered format, the shards of one (a list of file names), or a
    PyTree in memory."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, list | tuple) and source and all(isinstance(s, str | os.PathLike) for s in source):
        return sharded.open_files(source)
    if not isinstance(source, (str, os.PathLike)):
        return TreeCheckpoint(source)
    path = pathlib.Path(source)
    if path.is_dir():
        named = _by_suffix(path)
        if named is not None:
            raise SourceError(f"{source}: is a directory, not a {named.suffix} file.")
        return next(f for f in FORMATS if f.claims is not None and f.claims(path)).open(path)
    if not path.exists():
        raise SourceError(f"{source}: no such file or directory.")
    found = _by_suffix(path)
    if found is None:
        raise SourceError(
            f"{source}: treeglob reads {readable()}, not {path.suffix or 'a file without a suffix'}."
        )
    return found.open(path)


def format_for_writing(path: pathlib.Path, caller: str) -> Format:
    """The format `path`'s suffix names, if treeglob writes it."""
    found = _by_suffix(path)
    if found is None or found.write is None:
        written = " or ".join(f.suffix for f in FORMATS if f.write is not None)
        raise ValueError(
            f"{caller}(): {str(path)!r} does not end in {written}, the formats {caller}() writes "
            "(chosen by the suffix)."
        )
    return found
