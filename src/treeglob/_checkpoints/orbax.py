"""orbax checkpoint directories (`treeglob[orbax]`): the metadata, and each tensor restored
on its own, every other leaf a placeholder."""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np

from .._core.errors import SourceError
from .._core.frameworks import stored_wrapper
from .base import Checkpoint

__all__ = ["OrbaxCheckpoint"]


class OrbaxCheckpoint(Checkpoint):
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
        return np.asarray(self._restore(row, self.ocp.RestoreArgs(restore_type=np.ndarray)))

    def read_placed(self, path: str, sharding: jax.sharding.Sharding) -> jax.Array:
        # orbax restores an array onto a sharding itself: each process reads its shards' chunks.
        row = self.rows[path]
        shape = tuple(self.meta[path].shape)
        return self._restore(row, self.ocp.ArrayRestoreArgs(sharding=sharding, global_shape=shape))

    def _restore(self, row: int, args: Any) -> Any:
        # Every other leaf is a placeholder: orbax reads only this array's files.
        ocp = self.ocp
        leaves, treedef = jax.tree.flatten(self.stored)
        item = treedef.unflatten([leaf if k == row else ocp.PLACEHOLDER for k, leaf in enumerate(leaves)])
        restore_args = treedef.unflatten([args if k == row else ocp.PLACEHOLDER for k in range(len(leaves))])
        restored = self.checkpointer.restore(
            self.path, args=ocp.args.PyTreeRestore(item, restore_args=restore_args)
        )
        return treedef.flatten_up_to(restored)[row]
