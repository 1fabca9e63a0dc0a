"""The checkpoint formats treeglob reads and writes, in one registry.

Each format is one module (`safetensors.py`, `npz.py`, `sharded.py`, `orbax.py`)
and one `Format` entry here: how it is recognised (a file suffix, or a directory),
how it is opened, and how it is written where treeglob writes it. Opening,
`treeglob.save`, the command line's help and every message about formats are
rendered from `FORMATS`, so adding a format is one module and one entry.
"""

from __future__ import annotations

import importlib
import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._core.errors import SourceError

if TYPE_CHECKING:
    import numpy as np

    from .base import Checkpoint

__all__ = [
    "FORMATS",
    "INDEX_SUFFIX",
    "Format",
    "format_for_writing",
    "is_checkpoint",
    "open_checkpoint",
    "readable",
]

#: How the index of a Hugging Face sharded checkpoint is named: `model.safetensors.index.json`.
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class Format:
    """One checkpoint format.

    Its module is imported on first use, so that the registry itself (the command line's
    help, messages about formats) costs no import of NumPy, JAX or orbax (an extra).

    Attributes:
        name: how messages name it.
        suffix: how the name of its file ends, or "" for a format stored only as a directory.
        module: the module under `treeglob._checkpoints` that reads (and writes) it.
        reader: the module's function or class from a path (a file with `suffix`, or a
            directory it claims) to a `Checkpoint` of its metadata.
        writer: the module's writer, `write(path, [(name, shape, dtype), ...], read)` with
            `read(k)` giving the k-th tensor; "" where treeglob does not write the format.
        claims: the module's test of whether it reads a directory (asked in `FORMATS`
            order), or "" where it reads no directory.
        any_directory: it reads every directory no format before it claims.
        directory: how help and messages name such a directory.
    """

    name: str
    suffix: str
    module: str
    reader: str
    writer: str = ""
    claims: str = ""
    any_directory: bool = False
    directory: str = ""

    def _attribute(self, name: str) -> Any:
        return getattr(importlib.import_module(f".{self.module}", __package__), name)

    def open(self, path: pathlib.Path) -> Checkpoint:
        return self._attribute(self.reader)(path)

    def write(
        self,
        path: str | os.PathLike[str],
        listed: list[tuple[str, tuple[int, ...], Any]],
        read: Callable[[int], np.ndarray],
    ) -> None:
        if not self.writer:
            raise TypeError(f"treeglob does not write {self.name} checkpoints.")
        self._attribute(self.writer)(path, listed, read)

    def reads_directory(self, path: pathlib.Path) -> bool:
        return self.any_directory or (bool(self.claims) and self._attribute(self.claims)(path))


FORMATS: tuple[Format, ...] = (
    Format("safetensors", ".safetensors", "safetensors", "SafetensorsCheckpoint", "write"),
    Format("npz", ".npz", "npz", "NpzCheckpoint", "write"),
    Format(
        "sharded safetensors",
        INDEX_SUFFIX,
        "sharded",
        "open_path",
        claims="holds_shards",
        directory="a directory of .safetensors shards",
    ),
    Format(
        "orbax", "", "orbax", "OrbaxCheckpoint", any_directory=True, directory="an orbax checkpoint directory"
    ),
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
    from . import sharded
    from .base import Checkpoint, TreeCheckpoint

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
        return next(f for f in FORMATS if f.reads_directory(path)).open(path)
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
    if found is None or not found.writer:
        written = " or ".join(f.suffix for f in FORMATS if f.writer)
        raise ValueError(
            f"{caller}(): {str(path)!r} does not end in {written}, the formats {caller}() writes "
            "(chosen by the suffix)."
        )
    return found
