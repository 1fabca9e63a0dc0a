"""Sharding rules: `PartitionSpec` labels checked against the leaves and the mesh."""

from __future__ import annotations

import math
from typing import Any

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._core.resolve import Options, resolve

__all__ = ["shardings"]

_REPLICATED = PartitionSpec()


def _check_spec(path: str, shape: tuple[int, ...], spec: Any, mesh: Mesh) -> None:
    # Written out, not repr(): its form differs between JAX versions.
    where = f"The PartitionSpec P({', '.join(map(repr, spec))}) of {path} (shape {shape})"
    if len(spec) > len(shape):
        raise ValueError(
            f"{where} names {len(spec)} dimensions but the array has {len(shape)}. Use at most one "
            "entry per dimension (trailing dimensions are replicated)."
        )
    for dim, (size, entry) in enumerate(zip(shape, spec, strict=False)):
        if entry is None:
            continue
        names = entry if isinstance(entry, tuple) else (entry,)
        unknown = [n for n in names if n not in mesh.shape]
        if unknown:
            raise ValueError(
                f"{where} uses the mesh axis {unknown[0]!r}, which the mesh lacks; its axes are "
                f"{list(mesh.axis_names)!r}."
            )
        parts = math.prod(mesh.shape[n] for n in names)
        if size % parts:
            raise ValueError(
                f"{where} splits dimension {dim} of size {size} over {entry!r} ({parts} devices), "
                f"which does not divide it. Shard another dimension or replicate this one (None)."
            )


def shardings(
    tree: Any,
    rules: Any,
    mesh: Mesh,
    *,
    default: PartitionSpec = _REPLICATED,
    stacked: Any = None,
    strict: bool = True,
) -> Any:
    """A tree of `NamedSharding` from `(selector, PartitionSpec)` rules.

    For `jax.device_put(params, shardings(...))` and the `in_shardings` /
    `out_shardings` of `jax.jit`. The rules follow `treeglob.labels` (first
    match wins, `default` for the rest, replicated unless given). Every spec
    is checked against its leaf: one entry per dimension at most, mesh axes
    that exist, sizes the mesh axes divide. Under `stacked`, specs describe
    one layer: the stacked axes are prepended, unsharded.

    Args:
        tree: the params (array leaves only, e.g. `eqx.filter(model, eqx.is_array)`).
        rules: `(selector, PartitionSpec)` pairs or a dict `{spec: selector}`.
        mesh: the `jax.sharding.Mesh`.
        default: the spec of leaves no rule matches; `PartitionSpec()` replicates.
        stacked: `{path: axes}` for stacked layers (see `treeglob.mask`).
        strict: as in `treeglob.labels`.

    Examples:
        >>> import jax, numpy as np, treeglob
        >>> from jax.sharding import PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("model",))
        >>> params = {"fc": {"weight": np.zeros((4, 8)), "bias": np.zeros(4)}}
        >>> specs = treeglob.shardings(params, [("*.weight", P(None, "model"))], mesh)
        >>> specs["fc"]["weight"].spec == P(None, "model"), specs["fc"]["bias"].spec == P()
        (True, True)
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh(...)), got {type(mesh).__name__}."
        )
    resolution = resolve(tree, rules, Options(default, strict, stacked), caller="shardings")
    view = resolution.view
    out = []
    for leaf, path, shape, stack, spec in zip(
        view.leaves, view.leaf_paths, view.leaf_shapes, view.leaf_stacks, resolution.values, strict=True
    ):
        if not isinstance(spec, PartitionSpec):
            raise TypeError(f"The label of {path} is {spec!r}; shardings() needs PartitionSpec labels.")
        if shape is None:
            raise TypeError(
                f"{path} is not an array ({type(leaf).__name__}); shardings() places arrays only. "
                "Filter the tree first: eqx.filter(model, eqx.is_array)."
            )
        full = PartitionSpec(*(None,) * len(stack), *spec)
        _check_spec(path, shape, full, mesh)
        out.append(NamedSharding(mesh, full))
    return view.unflatten(out)
