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
import collections
import os
import pathlib
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._errors import SourceError
from ._safetensors import TensorInfo, read_header
from ._tree import TreeView

__all__ = ["Checkpoint", "is_data", "open_checkpoint"]

_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
SUFFIXES = (".safetensors", ".npz")


def is_data(view: TreeView, row: int) -> bool:
    """Whether a row is an array of numbers: a checkpoint holds those, not Python values
    or PRNG keys (`jax.random.key`, an NNX module's `Rngs`), which transfers leave alone."""
    return view.shapes[row] is not None and not jnp.issubdtype(view.dtypes[row], jax.dtypes.extended)


class Checkpoint(abc.ABC):
    """Tensors by name: `meta[name]` has `shape` and `dtype`; data is read on demand."""

    where: str
    meta: dict[str, Any]

    @abc.abstractmethod
    def read(self, name: str) -> Any:
        """The whole tensor (a NumPy array, or the array itself for a tree in memory)."""

    def read_slice(self, name: str, index: Any) -> np.ndarray:
        """`read(name)[index]`, reading no more than the slice where the format allows."""
        return np.asarray(self.read(name)[index])


class _Safetensors(Checkpoint):
    def __init__(self, path: pathlib.Path):
        self.where, self.path = str(path), path
        self.meta, self.data_start = read_header(path)

    def read(self, name: str) -> np.ndarray:
        info: TensorInfo = self.meta[name]
        out = np.empty(info.shape, info.dtype)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + info.begin)
            if f.readinto(out.reshape(-1).view(np.uint8).data) != info.end - info.begin:
                raise SourceError(f"{self.where}: tensor {name!r} is cut short; the file is truncated.")
        return out

    def read_slice(self, name: str, index: Any) -> np.ndarray:
        info: TensorInfo = self.meta[name]
        if not info.shape or 0 in info.shape:
            return self.read(name)[index]
        mapped = np.memmap(self.path, info.dtype, "r", self.data_start + info.begin, info.shape)
        return np.array(mapped[index])


class _Npz(Checkpoint):
    """An `.npz` archive; members may be compressed, so each is read whole."""

    def __init__(self, path: pathlib.Path):
        self.where, self.path, self.meta, self.members = str(path), path, {}, {}
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
                    name = member[: -len(".npy")]
                    self.meta[name] = jax.ShapeDtypeStruct(shape, dtype)
                    self.members[name] = member
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise SourceError(f"{path}: not a readable .npz file: {exc}") from None

    def read(self, name: str) -> np.ndarray:
        with zipfile.ZipFile(self.path) as archive, archive.open(self.members[name]) as f:
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
        self.where, self.path, self.ocp = str(path), path.resolve(), ocp
        self.checkpointer = ocp.PyTreeCheckpointer()
        try:
            metadata = self.checkpointer.metadata(self.path)
        except Exception as exc:  # orbax raises many kinds for a directory it cannot read
            raise SourceError(
                f"{path}: not a readable orbax checkpoint: {type(exc).__name__}: {exc}"
            ) from None
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)
        view = TreeView(tree)
        self.meta, self.leaf_index, self.tree = {}, {}, tree
        # A Flax NNX Variable is saved as {"value": array}: its path is the Variable's, as
        # in the State it came from (`fc1.kernel`, not `fc1.kernel.value`).
        parents = collections.Counter(s[:-1] for s in view.segments)
        for k, (name, leaf, segments) in enumerate(zip(view.paths, view.leaves, view.segments, strict=True)):
            if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
                if segments[-1] == "value" and parents[segments[:-1]] == 1 and len(segments) > 1:
                    name = name.removesuffix(".value")
                self.meta[name] = jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)
                self.leaf_index[name] = k
        if not self.meta:
            raise SourceError(
                f"{path}: not a readable orbax checkpoint: it holds no array metadata. A "
                "CheckpointManager keeps each step's items below it: pass STEP/ITEM, e.g. ckpt/1/default."
            )

    def read(self, name: str) -> np.ndarray:
        # Every other leaf is a placeholder: orbax reads only this array's files.
        ocp, wanted = self.ocp, self.leaf_index[name]
        leaves, treedef = jax.tree.flatten(self.tree)
        item = treedef.unflatten([leaf if k == wanted else ocp.PLACEHOLDER for k, leaf in enumerate(leaves)])
        restore_args = treedef.unflatten(
            [
                ocp.RestoreArgs(restore_type=np.ndarray) if k == wanted else ocp.PLACEHOLDER
                for k in range(len(leaves))
            ]
        )
        restored = self.checkpointer.restore(
            self.path, args=ocp.args.PyTreeRestore(item, restore_args=restore_args)
        )
        return np.asarray(treedef.flatten_up_to(restored)[wanted])


class _Tree(Checkpoint):
    """A PyTree in memory (another model, a dict of arrays): its leaves by printed path."""

    def __init__(self, tree: Any):
        view = TreeView(tree)
        self.where = "the source tree"
        self.meta = {view.paths[r]: view.leaves[r] for r in range(len(view)) if is_data(view, r)}

    def read(self, name: str) -> Any:
        return self.meta[name]


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
