"""Trees of `jax.ShapeDtypeStruct` from checkpoints and model factories, without loading arrays.

* `.safetensors`: the header only, read by the `safetensors` package
  (`pip install "treeglob[safetensors]"`); tensor names split on `.`.
* `.npz`: each member's `.npy` header only; names split on `/`.
* `module:function` or `path/to/file.py:function`: the function is called
  under `eqx.filter_eval_shape`, so no parameter is ever allocated.

Names become nested dicts, so `blocks.3.attn.qkv.weight` in a checkpoint
has the same path, and matches the same patterns, as in the model.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys
import zipfile
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._errors import SourceError

__all__ = ["load_source"]

_SAFETENSORS_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _nest(entries: dict[str, Any], sep: str, origin: str) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name in sorted(entries):
        *parents, leaf = name.split(sep)
        node = tree
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SourceError(
                    f"{origin}: the tensor {sep.join(parents[: i + 1])!r} is also the parent of {name!r}; "
                    "such names cannot form one tree."
                )
        if leaf in node:
            raise SourceError(f"{origin}: {name!r} is both a tensor and the parent of other tensors.")
        node[leaf] = entries[name]
    return tree


def _safetensors(path: pathlib.Path) -> dict[str, Any]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise SourceError(
            f'{path}: reading .safetensors needs the safetensors package: pip install "treeglob[safetensors]".'
        ) from None
    entries = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                tensor = f.get_slice(name)
                kind = tensor.get_dtype()
                if kind not in _SAFETENSORS_DTYPES:
                    raise SourceError(
                        f"{path}: tensor {name!r} has the dtype {kind}, which treeglob does not know."
                    )
                entries[name] = jax.ShapeDtypeStruct(
                    tuple(tensor.get_shape()), jnp.dtype(_SAFETENSORS_DTYPES[kind])
                )
    except SourceError:
        raise
    except Exception as exc:  # the package raises its own error types for a bad header
        raise SourceError(f"{path}: not a readable .safetensors file: {exc}") from None
    return _nest(entries, ".", str(path))


def _npz(path: pathlib.Path) -> dict[str, Any]:
    entries = {}
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
                entries[member[: -len(".npy")]] = jax.ShapeDtypeStruct(shape, dtype)
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise SourceError(f"{path}: not a readable .npz file: {exc}") from None
    return _nest(entries, "/", str(path))


def _factory(spec: str) -> Any:
    target, _, name = spec.rpartition(":")
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
    try:
        model = eqx.filter_eval_shape(fn)
    except Exception as exc:
        raise SourceError(f"{spec}: calling {name}() failed: {type(exc).__name__}: {exc}") from exc
    return eqx.filter(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))


def load_source(source: str) -> Any:
    """A tree whose array leaves are `jax.ShapeDtypeStruct`s, from a file or a factory."""
    path = pathlib.Path(source)
    if path.suffix in (".safetensors", ".npz"):
        if not path.is_file():
            raise SourceError(f"{source}: no such file.")
        return _safetensors(path) if path.suffix == ".safetensors" else _npz(path)
    if ":" in source:
        return _factory(source)
    raise SourceError(
        f"{source}: not a .safetensors or .npz file, nor a module:function factory (e.g. mypkg.models:build)."
    )
