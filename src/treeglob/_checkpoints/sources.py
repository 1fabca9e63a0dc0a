"""Trees of array metadata from checkpoints and model factories, without loading arrays.

* `.safetensors`, `.npz`, an orbax checkpoint directory: metadata only
  (see `formats.py`).
* `module:function` or `path/to/file.py:function`: the function is called
  under `eqx.filter_eval_shape`, so no parameter is ever allocated. A Flax
  NNX module is reduced to the State of its parameters (`nnx.Param`), a penzai
  model to its frozen parameters: what training reads (`_core/frameworks.py`).

A checkpoint is a flat dict `{tensor name: metadata}`, exactly what loading
it in Python gives, so its names split into segments as in memory (on `.` in
a flat dict, and on `/`): `blocks.3.attn.qkv.weight` in a checkpoint has the
same path, and matches the same patterns, as in the model.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys
from typing import Any, NamedTuple

import equinox as eqx
import jax

from .._core.errors import SourceError
from .._core.frameworks import parameters, stacked_layers
from .formats import is_checkpoint, open_checkpoint, readable

__all__ = ["Source", "load_source"]


class Source(NamedTuple):
    """What the command line reads: a tree of array metadata, and the stacked layers its
    model declares (a penzai LayerStack), or None."""

    tree: Any
    stacked: dict[str, int] | None = None


def _factory(spec: str, variables: str) -> Source:
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise SourceError(
            f"{spec}: a model factory is written module:function or path/to/file.py:function, "
            "e.g. mypkg.models:build."
        )
    if target.endswith(".py") or "/" in target:
        path = pathlib.Path(target)
        if not path.is_file():
            raise SourceError(f"{spec}: no such file {target!r}.")
        sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise SourceError(f"{spec}: {target} cannot be imported as a Python module.")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module  # dataclasses (eqx.Module) look their module up there
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise SourceError(f"{spec}: importing {target} failed: {type(exc).__name__}: {exc}") from exc
    else:
        sys.path.insert(0, ".")
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise SourceError(f"{spec}: cannot import {target!r}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise SourceError(f"{spec}: {target} has no function {name!r}.")
    failed: list[str] = []
    declared: list[dict[str, int]] = []

    def build() -> Any:
        # The parameters are taken inside the trace: a penzai model keeps them in mutable
        # Parameter objects, which an abstract evaluation of the model alone would leave
        # holding tracers.
        # Either's error is bad input, said as such (not as a failed factory).
        model = fn()
        try:
            declared.append(stacked_layers(model))
        except ValueError as exc:
            failed.append(str(exc))
            return model
        try:
            return parameters(model, variables)
        except ValueError as exc:
            failed.append(f"--variables {variables!r}: {exc}")
            return model

    try:
        model = eqx.filter_eval_shape(build)
    except (Exception, SystemExit) as exc:  # a factory that exits is a failed factory, not our exit
        raise SourceError(f"{spec}: calling {name}() failed: {type(exc).__name__}: {exc}") from exc
    if failed:
        raise SourceError(f"{spec}: {failed[0]}")
    params = eqx.filter(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    if not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
        shown = repr(model)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise SourceError(
            f"{spec}: {name}() returned {type(model).__name__} {shown}, which holds no array. "
            "A factory returns the model (or a PyTree of its parameters)."
        )
    return Source(params, declared[0] if declared and declared[0] else None)


def load_source(source: str, variables: str = "Param") -> Source:
    """A tree of array metadata (shape, dtype) from a file or a factory, with the stacked
    layers the factory's model declares.

    `variables` chooses the Variable types of a Flax NNX module a factory
    returns: comma-separated names (`"Param"`, `"Param,BatchStat"`) or `"all"`.
    """
    path = pathlib.Path(source)
    if is_checkpoint(path):
        tree = open_checkpoint(path).tree
        return Source(tree, stacked_layers(tree) or None)
    if ":" in source:
        return _factory(source, variables)
    raise SourceError(f"{source}: not {readable()}, nor a module:function factory (e.g. mypkg.models:build).")
