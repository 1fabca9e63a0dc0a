"""Checkpoints as flat `{name: metadata}` dicts whose tensors are read one at a time.

Opening a checkpoint reads its metadata only (a `.safetensors` header, each
`.npz` member's `.npy` header, an orbax checkpoint's metadata). A tensor's
data is read when `read(name)` or `read_slice(name, index)` asks for it, so
loading a model never holds more than the tensor at hand; `read_slice` of a
`.safetensors` tensor maps the file and copies only the slice (one device's
shard).
"""

from __future__ import annotations

import abc
import functools
import os
import pathlib
import zipfile
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from ._errors import SourceError
from ._frameworks import stored_wrapper
from ._safetensors import TensorInfo, read_header
from ._tree import TreeView

__all__ = ["Checkpoint", "open_checkpoint"]

_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
SUFFIXES = (".safetensors", ".npz")


class Checkpoint(abc.ABC):
    """A checkpoint's tensors by path, data read on demand.

    `tree` is its structure as stored (a flat dict of names for a file, nested
    for orbax or a tree in memory), `view` the `TreeView` patterns match, and
    `meta` maps the printed path of each array to its metadata (`shape`,
    `dtype`). Paths are never split again after printing, so keys that need
    quoting (`"conv.1"`) stay one segment.
    """

    #: Whether `read_slice` reads only the slice (else the whole tensor each time).
    slices: bool = False
    #: The paths that have metadata but no values (a `ShapeDtypeStruct` in a tree).
    abstract: frozenset[str] = frozenset()

    def __init__(self, where: str, tree: Any):
        self.where, self.tree = where, tree

    # Built on first use: listing a checkpoint (`treeglob paths`, `explain`) needs only `tree`.
    @functools.cached_property
    def view(self) -> TreeView:
        return TreeView(self.tree)

    @functools.cached_property
    def rows(self) -> dict[str, int]:
        view = self.view
        return {view.paths[r]: r for r in view.data_rows}

    @functools.cached_property
    def meta(self) -> dict[str, Any]:
        return {path: self.view.leaves[r] for path, r in self.rows.items()}

    def read(self, path: str) -> Any:
        """The whole tensor (a NumPy array, or the array itself for a tree in memory)."""
        return self._read(self.rows[path], path)

    def read_slice(self, path: str, index: Any) -> np.ndarray:
        """`read(path)[index]`."""
        return np.asarray(self.read(path)[index])

    @abc.abstractmethod
    def _read(self, row: int, path: str) -> Any: ...


class _Safetensors(Checkpoint):
    slices = True

    def __init__(self, path: pathlib.Path):
        self.path = path
        header, self.data_start = read_header(path)
        super().__init__(str(path), header)

    def _read(self, row: int, path: str) -> np.ndarray:
        info: TensorInfo = self.view.leaves[row]
        out = np.empty(info.shape, info.dtype)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + info.begin)
            if f.readinto(out.reshape(-1).view(np.uint8).data) != info.end - info.begin:
                raise SourceError(f"{self.where}: tensor {path!r} is cut short; the file is truncated.")
        return out

    def read_slice(self, path: str, index: Any) -> np.ndarray:
        info: TensorInfo = self.meta[path]
        if not info.shape or 0 in info.shape:
            return self.read(path)[index]
        # Mapped, so that only the pages of the slice are read.
        mapped = np.memmap(self.path, info.dtype, "r", self.data_start + info.begin, info.shape)
        return np.array(mapped[index])


@dataclass(frozen=True)
class _Member:
    """One array of an `.npz` archive: its metadata and where it is."""

    shape: tuple[int, ...]
    dtype: np.dtype
    member: str


class _Npz(Checkpoint):
    """An `.npz` archive; members may be compressed, so each is read whole."""

    def __init__(self, path: pathlib.Path):
        self.path, members = path, {}
        try:
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if not member.endswith(".npy"):
                        continue
                    with archive.open(member) as f:
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
        with zipfile.ZipFile(self.path) as archive, archive.open(self.view.leaves[row].member) as f:
            return np.lib.format.read_array(f, allow_pickle=False)


class _Orbax(Checkpoint):
    """An orbax PyTree checkpoint directory; each tensor restored on its own."""

    def __init__(self, path: pathlib.Path):
        try:
            import orbax.checkpoint as ocp
        except ImportError:
            raise SourceError(
                f"{path}: reading an orbax checkpoint needs orbax-checkpoint: pip install 'treeglob[orbax]'."
            ) from None
        self.path, self.ocp = path.resolve(), ocp
        self.checkpointer = ocp.PyTreeCheckpointer()
        try:
            metadata = self.checkpointer.metadata(self.path)
        except Exception as exc:  # orbax raises many kinds for a directory it cannot read
            raise SourceError(
                f"{path}: not a readable orbax checkpoint: {type(exc).__name__}: {exc}"
            ) from None
        stored = getattr(metadata, "item_metadata", metadata)
        self.stored = getattr(stored, "tree", stored)
        # A Variable's path is the Variable's, as in the State it came from (`fc1.kernel`,
        # not `fc1.kernel.value`); each holds one leaf, so the leaf order is unchanged.
        tree = jax.tree.map(
            lambda n: n["value"] if stored_wrapper(n) else n, self.stored, is_leaf=stored_wrapper
        )
        super().__init__(str(path), tree)
        if not self.meta:
            raise SourceError(
                f"{path}: not a readable orbax checkpoint: it holds no array metadata. A "
                "CheckpointManager keeps each step's items below it: pass STEP/ITEM, e.g. ckpt/1/default."
            )

    def _read(self, row: int, path: str) -> np.ndarray:
        # Every other leaf is a placeholder: orbax reads only this array's files.
        ocp = self.ocp
        leaves, treedef = jax.tree.flatten(self.stored)
        item = treedef.unflatten([leaf if k == row else ocp.PLACEHOLDER for k, leaf in enumerate(leaves)])
        restore_args = treedef.unflatten(
            [
                ocp.RestoreArgs(restore_type=np.ndarray) if k == row else ocp.PLACEHOLDER
                for k in range(len(leaves))
            ]
        )
        restored = self.checkpointer.restore(
            self.path, args=ocp.args.PyTreeRestore(item, restore_args=restore_args)
        )
        return np.asarray(treedef.flatten_up_to(restored)[row])


class _Tree(Checkpoint):
    """A PyTree in memory (another model, a dict of arrays): its leaves by printed path."""

    def __init__(self, tree: Any):
        super().__init__("the source tree", tree)
        arrays = (jax.Array, np.ndarray, np.generic)
        self.abstract = frozenset(p for p, leaf in self.meta.items() if not isinstance(leaf, arrays))

    def _read(self, row: int, path: str) -> Any:
        return self.view.leaves[row]


def open_checkpoint(source: Any) -> Checkpoint:
    """A `.safetensors` or `.npz` file, an orbax checkpoint directory, or a PyTree in memory."""
    if isinstance(source, Checkpoint):
        return source
    if not isinstance(source, (str, os.PathLike)):
        return _Tree(source)
    path = pathlib.Path(source)
    if path.is_dir():
        if path.suffix in SUFFIXES:
            raise SourceError(f"{source}: is a directory, not a {path.suffix} file.")
        return _Orbax(path)
    if not path.exists():
        raise SourceError(f"{source}: no such file or directory.")
    if path.suffix == ".safetensors":
        return _Safetensors(path)
    if path.suffix == ".npz":
        return _Npz(path)
    raise SourceError(
        f"{source}: treeglob reads .safetensors and .npz files and orbax checkpoint directories, "
        f"not {path.suffix or 'a file without a suffix'}."
    )
