"""The checkpoint formats treeglob reads and writes, in one registry.

Each format is one module (`safetensors.py`, `npz.py`, `orbax.py`) and one
`Format` entry here: how it is recognised (a file suffix, or a directory),
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
from . import npz, safetensors
from .base import Checkpoint, TreeCheckpoint

__all__ = ["FORMATS", "Format", "format_for_writing", "is_checkpoint", "open_checkpoint", "readable"]

#: A writer: `write(path, [(name, shape, dtype), ...], read)`, `read(k)` giving the k-th tensor.
Writer = Callable[
    [str | os.PathLike[str], list[tuple[str, tuple[int, ...], Any]], Callable[[int], np.ndarray]], None
]


def _orbax(path: pathlib.Path) -> Checkpoint:
    from .orbax import OrbaxCheckpoint  # imports orbax (an extra) only when asked for

    return OrbaxCheckpoint(path)


@dataclass(frozen=True)
class Format:
    """One checkpoint format.

    Attributes:
        name: how messages name it.
        suffix: the file suffix, or "" for a format stored as a directory.
        open: the reader: a path to a `Checkpoint` of its metadata.
        write: the writer, or None where treeglob does not write the format.
    """

    name: str
    suffix: str
    open: Callable[[pathlib.Path], Checkpoint]
    write: Writer | None = None

    def describe(self) -> str:
        return f"{self.suffix} file" if self.suffix else f"{self.name} checkpoint directory"


FORMATS: tuple[Format, ...] = (
    Format("safetensors", ".safetensors", safetensors.SafetensorsCheckpoint, safetensors.write),
    Format("npz", ".npz", npz.NpzCheckpoint, npz.write),
    Format("orbax", "", _orbax),
)

_BY_SUFFIX = {f.suffix: f for f in FORMATS if f.suffix}
_DIRECTORY = next(f for f in FORMATS if not f.suffix)


def readable() -> str:
    """`a .safetensors or .npz file, or an orbax checkpoint directory`: for help and messages."""
    files = [f.suffix for f in FORMATS if f.suffix]
    return f"a {' or '.join(files)} file, or an {_DIRECTORY.describe()}"


def is_checkpoint(path: pathlib.Path) -> bool:
    """Whether `path` names a checkpoint by its form (a known suffix, or a directory)."""
    return path.suffix in _BY_SUFFIX or path.is_dir()


def open_checkpoint(source: Any) -> Checkpoint:
    """A checkpoint of a registered format, or a PyTree in memory."""
    if isinstance(source, Checkpoint):
        return source
    if not isinstance(source, (str, os.PathLike)):
        return TreeCheckpoint(source)
    path = pathlib.Path(source)
    if path.is_dir():
        if path.suffix in _BY_SUFFIX:
            raise SourceError(f"{source}: is a directory, not a {path.suffix} file.")
        return _DIRECTORY.open(path)
    if not path.exists():
        raise SourceError(f"{source}: no such file or directory.")
    found = _BY_SUFFIX.get(path.suffix)
    if found is None:
        raise SourceError(
            f"{source}: treeglob reads {readable()}, not {path.suffix or 'a file without a suffix'}."
        )
    return found.open(path)


def format_for_writing(path: pathlib.Path, caller: str) -> Format:
    """The format `path`'s suffix names, if treeglob writes it."""
    found = _BY_SUFFIX.get(path.suffix)
    if found is None or found.write is None:
        written = " or ".join(f.suffix for f in FORMATS if f.write is not None)
        raise ValueError(
            f"{caller}(): {str(path)!r} does not end in {written}, the formats {caller}() writes "
            "(chosen by the suffix)."
        )
    return found
