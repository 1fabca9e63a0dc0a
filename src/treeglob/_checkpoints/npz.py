"""The `.npz` format: each member's `.npy` header read for the metadata, members read
whole (they may be compressed), and archives written one member at a time."""

from __future__ import annotations

import os
import pathlib
import weakref
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from .._core.errors import SourceError
from .base import Checkpoint, tensor_to_write, written_beside

__all__ = ["NpzCheckpoint", "write"]

_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


@dataclass(frozen=True)
class _Member:
    """One array of an `.npz` archive: its metadata and where it is."""

    shape: tuple[int, ...]
    dtype: np.dtype
    member: str


class NpzCheckpoint(Checkpoint):
    """An `.npz` archive; members may be compressed, so each is read whole."""

    def __init__(self, path: pathlib.Path):
        self.path, members = path, {}
        try:
            # The archive stays open from its directory to its last member: a file replaced
            # at `path` meanwhile (a new save renamed over it) is not read, the one planned from is.
            file = open(path, "rb")  # noqa: SIM115 (closed by the finalizer, with the checkpoint)
            weakref.finalize(self, file.close)
            self._archive = zipfile.ZipFile(file)
            for member in self._archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with self._archive.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read = _NPY_HEADER_READERS.get(version)
                    if read is None:
                        raise ValueError(
                            f"{member} uses .npy format version {version}, which treeglob cannot read"
                        )
                    shape, _, dtype = read(f)
                members[member[: -len(".npy")]] = _Member(tuple(shape), dtype, member)
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise SourceError(f"{path}: not a readable .npz file: {exc}") from None
        super().__init__(str(path), members)

    def _read(self, row: int, path: str) -> np.ndarray:
        with self._archive.open(self.view.leaves[row].member) as f:
            return np.lib.format.read_array(f, allow_pickle=False)


def write(
    path: str | os.PathLike[str],
    tensors: list[tuple[str, tuple[int, ...], Any]],
    read: Callable[[int], np.ndarray],
) -> None:
    """Write an `.npz` archive of `tensors` (name, shape, dtype), in that order, one member
    at a time from `read(k)`; it appears complete or not at all (written beside, then renamed).

    NumPy's format has no bfloat16 or other extended types (it would store them as
    raw bytes that load back as void): such a tensor is refused before anything is written.
    """
    for name, _, dtype in tensors:
        if jax.numpy.issubdtype(dtype, jax.dtypes.extended) or np.dtype(dtype).kind == "V":
            raise TypeError(
                f"tensor {name!r} has the dtype {dtype}, which .npz cannot store (it would load back as "
                "raw bytes); save to a .safetensors file, or cast it, e.g. to float32."
            )
        if np.dtype(dtype).kind == "O":  # loading it would need pickle, which runs code
            raise TypeError(
                f"tensor {name!r} holds Python objects (dtype object), which .npz stores only by "
                "pickling; save arrays of numbers."
            )
    with written_beside(path) as partial, zipfile.ZipFile(partial, "w", allowZip64=True) as archive:
        for k, (name, shape, dtype) in enumerate(tensors):
            array = tensor_to_write(read, k, name, shape, dtype)
            with archive.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, array, allow_pickle=False)
