"""Transforms of checkpoint tensors on their way into a model, and their output without data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .rename import pairs

__all__ = ["output_meta", "parse_transforms", "transform_name"]


@dataclass(frozen=True)
class _Named:
    """A transform given by name: `"transpose"` or a dtype (a cast). Its output's shape
    and dtype are known without running it."""

    __name__: str
    dtype: Any = None  # the cast's dtype; None for the transpose

    def __call__(self, x: Any) -> Any:
        return x.T if self.dtype is None else x.astype(self.dtype)

    def output(self, shape: tuple[int, ...], dtype: Any) -> tuple[tuple[int, ...], Any]:
        return (shape[::-1], dtype) if self.dtype is None else (shape, self.dtype)


def _named_transform(name: str, where: str) -> _Named:
    if name == "transpose":
        return _Named("transpose")
    try:
        dtype = jnp.dtype(name)
    except TypeError:
        raise ValueError(
            f"{where}: unknown transform {name!r}; a named transform is 'transpose' or a dtype name "
            "such as 'float32' or 'bfloat16'. Pass a function for anything else."
        ) from None
    return _Named(f"astype({dtype})", dtype)


def transform_name(fn: Callable[[Any], Any]) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def parse_transforms(transform: Any) -> list[tuple[Any, Callable[[Any], Any]]]:
    """Check a list of `(pattern, function or name)` pairs (or a dict in order)."""
    out = []
    for index, (pattern, fn) in enumerate(
        pairs(transform, "transform", "function", "('*.c_fc.weight', 'transpose')")
    ):
        if isinstance(fn, str):
            fn = _named_transform(fn, f"transform[{index}]")
        if not callable(fn):
            raise TypeError(
                f"transform[{index}]: {fn!r} is not callable; give a function of the array, "
                "'transpose' or a dtype name."
            )
        out.append((pattern, fn))
    return out


def output_meta(
    fn: Callable[[Any], Any], shape: tuple[int, ...], dtype: Any
) -> tuple[tuple[int, ...], Any] | str:
    """The shape and dtype `fn` gives for a tensor, without its data; else why not."""
    if isinstance(fn, _Named):
        return fn.output(shape, dtype)
    # A zero-strided NumPy stand-in of the tensor: no memory for views (.T, slices,
    # np.split, reshape), and NumPy's own dtype rules, which are what `fn` meets when
    # the tensor is loaded.
    try:
        out = fn(np.broadcast_to(np.zeros((), dtype), shape))
        return tuple(np.shape(out)), jnp.dtype(out.dtype)
    except Exception as exc:
        failure = f"{type(exc).__name__}: {exc}"
    # Else traced abstractly (a function of JAX arrays only), where JAX keeps the dtype;
    # through a lambda, since JAX caches traces on a weak reference to the function,
    # which some callables (operator.methodcaller) refuse.
    if jnp.dtype(dtype).itemsize < 8 or jax.config.read("jax_enable_x64"):
        try:
            out = jax.eval_shape(lambda x: fn(x), jax.ShapeDtypeStruct(shape, dtype))
            return tuple(out.shape), jnp.dtype(out.dtype)
        except Exception:
            pass
    return failure
