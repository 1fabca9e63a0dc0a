"""A checkpoint as a flat `{name: metadata}` dict whose tensors are read one at a time.

Opening a checkpoint reads its metadata only; a tensor's data is read when
`read(name)` or `read_slice(name, index)` asks for it, so loading a model
never holds more than the tensor at hand. Each file format subclasses
`Checkpoint` in its own module and registers in `formats.py`; a PyTree in
memory is a checkpoint too (`TreeCheckpoint`).
"""

from __future__ import annotations

import abc
import contextlib
import errno
import functools
import os
import pathlib
import re
import secrets
import socket
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from .._core.errors import SaveError
from .._core.tree import TreeView

__all__ = [
    "Checkpoint",
    "TreeCheckpoint",
    "partial_beside",
    "save_error",
    "tensor_to_write",
    "written_beside",
]


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

    def read_placed(self, path: str, sharding: jax.sharding.Sharding) -> jax.Array | None:
        """The tensor as a JAX array on `sharding`, where the format places tensors itself
        (orbax); None where treeglob reads the slices."""
        return None

    @abc.abstractmethod
    def _read(self, row: int, path: str) -> Any: ...


class TreeCheckpoint(Checkpoint):
    """A PyTree in memory (another model, a dict of arrays): its leaves by printed path."""

    def __init__(self, tree: Any):
        super().__init__("the source tree", tree)
        arrays = (jax.Array, np.ndarray, np.generic)
        self.abstract = frozenset(p for p, leaf in self.meta.items() if not isinstance(leaf, arrays))

    def _read(self, row: int, path: str) -> Any:
        return self.view.leaves[row]


# ----------------------------------------------------------------------------
# What every writer shares


@contextlib.contextmanager
def written_beside(path: str | os.PathLike[str]) -> Iterator[pathlib.Path]:
    """A file beside `path` to write, renamed to `path` when the block ends: a reader never
    sees half a file, and a failed write leaves nothing behind (the previous file, if any,
    stays whole).

    Raises:
        SaveError: (an `OSError`) the write failed: the file, the cause, what to do.
    """
    target = pathlib.Path(path)
    partial = partial_beside(target)
    try:
        yield partial
        os.replace(partial, target)
    except OSError as exc:
        raise save_error(target, exc) from exc
    finally:
        partial.unlink(missing_ok=True)


def partial_beside(target: pathlib.Path) -> pathlib.Path:
    """The name to write `target` under until it is complete: `target`'s, then the writer's
    process id, a random token and host, then `.partial`. Two processes saving the same
    path never share one, and what a writer killed on this host left is removed here."""
    _remove_abandoned(target)
    return target.with_name(f"{target.name}.{os.getpid()}-{secrets.token_hex(4)}.{_HOST}.partial")


def save_error(target: pathlib.Path, exc: OSError) -> SaveError:
    """The `SaveError` for a write of `target` that failed with `exc`."""
    return SaveError(
        f"save(): writing {str(target)!r} failed: {exc.strerror or exc} "
        f"({errno.errorcode.get(exc.errno or 0, 'no errno')}). {_fix(exc.errno)} "
        "The file there before, if any, is unchanged.",
        exc.errno,
    )


_HOST = socket.gethostname()


def _fix(code: int | None) -> str:
    if code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return "The disk, the quota or the file-size limit is full: free space, or save elsewhere."
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "The directory is not writable: save elsewhere, or change its permissions."
    return "Check the directory and the disk."


def _remove_abandoned(target: pathlib.Path) -> None:
    """Remove the `.partial` files of saves to `target` whose writer, a process on this host,
    is gone (killed mid-save): a live writer's, or another host's, are left alone."""
    pattern = re.compile(re.escape(target.name) + r"\.(\d+)-[0-9a-f]+\.(.+)\.partial")
    with contextlib.suppress(OSError):
        for leftover in target.parent.iterdir():
            found = pattern.fullmatch(leftover.name)
            if found and found[2] == _HOST and not _alive(int(found[1])):
                leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def tensor_to_write(
    read: Callable[[int], Any], k: int, name: str, shape: tuple[int, ...], dtype: Any
) -> np.ndarray:
    """The `k`-th tensor to write, C-ordered in `dtype`, checked against the shape announced."""
    array = np.asarray(read(k), dtype=dtype, order="C")
    if array.shape != tuple(shape):
        raise ValueError(
            f"tensor {name!r}: expected {np.dtype(dtype)} of shape {tuple(shape)}, "
            f"got {array.dtype} of shape {array.shape}."
        )
    return array
