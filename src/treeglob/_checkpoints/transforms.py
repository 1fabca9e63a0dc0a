"""Transforms of checkpoint tensors on their way into a model, and their output without data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .rename import pairs

__all__ = ["cast_after", "output_meta", "parse_transforms", "transform_name"]


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


@dataclass(frozen=True)
class _Chain:
    """Transforms applied in order, written as a tuple: `("transpose", "float32")`."""

    steps: tuple[Callable[[Any], Any], ...]

    @property
    def __name__(self) -> str:  # type: ignore[override]
        return " then ".join(map(transform_name, self.steps))

    def __call__(self, x: Any) -> Any:
        for step in self.steps:
            x = step(x)
        return x


def _transform(fn: Any, where: str) -> Callable[[Any], Any]:
    """A rule's transform: a function, a name, or a tuple of these applied in order."""
    if isinstance(fn, str):
        return _named_transform(fn, where)
    if isinstance(fn, tuple | list):
        if not fn:
            raise ValueError(f"{where}: an empty tuple of transforms; give at least one.")
        return _Chain(tuple(_transform(step, f"{where}[{k}]") for k, step in enumerate(fn)))
    if not callable(fn):
        raise TypeError(
            f"{where}: {fn!r} is not callable; give a function of the array, 'transpose', a dtype "
            "name, or a tuple of these applied in order."
        )
    return fn


def cast_after(fn: Callable[[Any], Any] | None, dtype: Any) -> Callable[[Any], Any]:
    """`fn` (or nothing), then a cast to `dtype`: the dtype policy's own transform."""
    cast = _Named(f"astype({jnp.dtype(dtype)})", jnp.dtype(dtype))
    return cast if fn is None else _Chain((fn, cast))


def transform_name(fn: Callable[[Any], Any]) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def parse_transforms(transform: Any) -> list[tuple[Any, Callable[[Any], Any]]]:
    """Check a list of `(pattern, function or name)` pairs (or a dict in order)."""
    out = []
    for index, (pattern, fn) in enumerate(
        pairs(transform, "transform", "function", "('*.c_fc.weight', 'transpose')")
    ):
        fn = _transform(fn, f"transform[{index}]")
        out.append((pattern, fn))
    return out


def output_meta(
    fn: Callable[[Any], Any], shape: tuple[int, ...], dtype: Any
) -> tuple[tuple[int, ...], Any] | str:
    """The shape and dtype `fn` gives for a tensor, without its data; else why not."""
    if isinstance(fn, _Named):
        return fn.output(shape, dtype)
    if isinstance(fn, _Chain):
        for step in fn.steps:
            out = output_meta(step, shape, dtype)
            if isinstance(out, str):
                return f"{transform_name(step)}: {out}"
            shape, dtype = out
        return shape, dtype
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
