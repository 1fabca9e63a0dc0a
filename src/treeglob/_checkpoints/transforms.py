"""Transforms of checkpoint tensors on their way into a model, their output without data, and
what undoes them on the way out (export)."""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .rename import pairs

__all__ = [
    "Impossible",
    "Named",
    "Undo",
    "cast_after",
    "checked_axis",
    "combines",
    "output_meta",
    "parse_transforms",
    "transform_name",
    "undo",
]


class Impossible(str):
    """Why a transform written as data cannot apply to a tensor: certain, unlike a function
    whose output cannot be known without the data."""


Shape = tuple[int, ...]


@dataclass(frozen=True)
class Named:
    """A transform written as data (`"transpose"`, `"split(3, 0, axis=1)"`, a dtype name):
    what it does to an array, and to a shape and dtype without data. A combining one
    (`concat`, `stack`) takes the list of tensors renamed onto one leaf."""

    label: str
    apply: Callable[[Any], Any]
    output: Callable[[Shape, Any], tuple[Shape, Any]]
    # What undoes it on export: a function giving the inverse (None: nothing to undo, as
    # for a cast, whose export writes the model's dtype), or why it cannot be undone.
    inverse: Callable[[], Named | None] | str = "it has no inverse"
    combines: tuple[str, int, tuple[int, ...] | None] | None = None  # (how, axis, sizes)
    splits: tuple[int, int, int] | None = None  # (parts, take, axis) for `split`

    @property
    def __name__(self) -> str:  # type: ignore[override]
        return self.label

    def __call__(self, x: Any) -> Any:
        return self.apply(x)


def checked_axis(axis: int, ndim: int, name: str) -> int:
    """`axis` of `ndim` dimensions as a non-negative index; out of range, a ValueError naming `name`."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: axis {axis} is out of range for {ndim} dimensions")
    return axis % ndim


def _transpose(*axes: int) -> Named:
    name = f"transpose({', '.join(map(str, axes))})" if axes else "transpose"

    def output(shape: Shape, dtype: Any) -> tuple[Shape, Any]:
        if axes and sorted(axes) != list(range(len(shape))):
            raise ValueError(f"{name}: the axes are not a permutation of the {len(shape)} dimensions")
        return tuple(shape[a] for a in axes) if axes else shape[::-1], dtype

    inverse = lambda: _transpose(*np.argsort(axes).tolist()) if axes else _transpose()  # noqa: E731
    return Named(name, lambda x: np.transpose(x, axes or None), output, inverse)


def _reshape(*dims: int) -> Named:
    name = f"reshape({', '.join(map(str, dims))})"

    def output(shape: Shape, dtype: Any) -> tuple[Shape, Any]:
        size, known = int(np.prod(shape)), int(np.prod([d for d in dims if d != -1]))
        unknown = dims.count(-1)
        if unknown > 1 or (unknown and (known == 0 or size % known)) or (not unknown and known != size):
            raise ValueError(f"{name}: {size} elements do not fit the shape {dims}")
        return tuple(size // known if d == -1 else d for d in dims), dtype

    return Named(
        name,
        lambda x: np.reshape(x, dims),
        output,
        "the checkpoint tensor's shape before the reshape is not known on export",
    )


def _split(parts: int, take: int, axis: int = 0) -> Named:
    name = f"split({parts}, {take}, axis={axis})"
    if not 0 <= take < parts:
        raise ValueError(f"{name}: the part taken must be in 0..{parts - 1}")

    def output(shape: Shape, dtype: Any) -> tuple[Shape, Any]:
        a = checked_axis(axis, len(shape), name)
        if shape[a] % parts:
            raise ValueError(
                f"{name}: axis {axis} of size {shape[a]} does not split into {parts} equal parts"
            )
        return (*shape[:a], shape[a] // parts, *shape[a + 1 :]), dtype

    # Undone on export by joining the parts that the other leaves of the same tensor hold.
    return Named(name, lambda x: np.split(x, parts, axis=axis)[take], output, splits=(parts, take, axis))


def _squeeze(axis: int) -> Named:
    name = f"squeeze({axis})"

    def output(shape: Shape, dtype: Any) -> tuple[Shape, Any]:
        a = checked_axis(axis, len(shape), name)
        if shape[a] != 1:
            raise ValueError(f"{name}: axis {axis} has size {shape[a]}, not 1")
        return (*shape[:a], *shape[a + 1 :]), dtype

    return Named(name, lambda x: np.squeeze(x, axis), output, lambda: _expand(axis))


def _expand(axis: int) -> Named:
    name = f"expand({axis})"

    def output(shape: Shape, dtype: Any) -> tuple[Shape, Any]:
        a = checked_axis(axis, len(shape) + 1, name)
        return (*shape[:a], 1, *shape[a:]), dtype

    return Named(name, lambda x: np.expand_dims(x, axis), output, lambda: _squeeze(axis))


def _astype(dtype: Any) -> Named:
    kind = jnp.dtype(dtype)
    if not (kind.kind in "biufc" or jnp.issubdtype(kind, jnp.floating)):  # numbers (bfloat16 too)
        raise TypeError(f"{kind} is not a dtype of numbers")
    return Named(
        f"astype({kind})", lambda x: np.asarray(x).astype(kind), lambda shape, _: (shape, kind), lambda: None
    )


def _combine(how: str, axis: int, sizes: tuple[int, ...] | None = None) -> Named:
    """`concat` / `stack`: the tensors renamed onto one leaf, in the order of their rename rules.
    `sizes` (concat only) are the tensors' sizes along `axis`: checked on load, and how export
    splits the leaf again."""
    name = f"{how}(axis={axis}" + (f", sizes={sizes})" if sizes is not None else ")")
    join = np.concatenate if how == "concat" else np.stack
    if sizes is not None and (how != "concat" or not sizes or min(sizes) < 1):
        raise ValueError(f"{name}: sizes are for concat, one positive size per tensor")

    def output(shape: Shape, dtype: Any) -> tuple[Shape, Any]:  # for one tensor; see `combined_meta`
        return combined_meta(how, axis, [(shape, dtype)], name, sizes)

    def apply(xs: Any) -> Any:
        dtype = promoted([x.dtype for x in xs])
        return join([np.asarray(x, dtype) for x in xs], axis=axis)

    return Named(name, apply, output, combines=(how, axis, sizes))


def promoted(dtypes: list[Any]) -> np.dtype:
    """The dtype that `concat`/`stack` give tensors of these dtypes: JAX's promotion, not
    NumPy's (int32 with float32 is float32, not float64), and with 64-bit types kept as
    they are: `jnp.result_type` would make float64 tensors float32 without `jax_enable_x64`,
    whatever the model's leaf holds."""
    return functools.reduce(jnp.promote_types, dtypes)


def combined_meta(
    how: str, axis: int, inputs: list[tuple[Shape, Any]], name: str, sizes: tuple[int, ...] | None = None
) -> tuple[Shape, Any]:
    """The shape and dtype `concat`/`stack` give for tensors of these shapes and dtypes."""
    shapes = [s for s, _ in inputs]
    dtype = promoted([d for _, d in inputs])
    first = shapes[0]
    if how == "stack":
        if any(s != first for s in shapes):
            raise ValueError(f"{name}: the tensors have different shapes {shapes}")
        a = checked_axis(axis, len(first) + 1, name)
        return (*first[:a], len(shapes), *first[a:]), dtype
    a = checked_axis(axis, len(first), name)
    if any(len(s) != len(first) or s[:a] + s[a + 1 :] != first[:a] + first[a + 1 :] for s in shapes):
        raise ValueError(f"{name}: the tensors' shapes {shapes} differ off axis {axis}")
    if sizes is not None and tuple(s[a] for s in shapes) != sizes:
        raise ValueError(f"{name}: the tensors' sizes along axis {axis} are {tuple(s[a] for s in shapes)}")
    return (*first[:a], sum(s[a] for s in shapes), *first[a + 1 :]), dtype


#: The transforms a rules file, the command line or Python name: `name` or `name(args)`.
NAMED: dict[str, Callable[..., Named]] = {
    "transpose": _transpose,
    "reshape": _reshape,
    "split": _split,
    "squeeze": _squeeze,
    "expand": _expand,
    "astype": _astype,
    "concat": lambda axis=0, sizes=None: _combine("concat", axis, None if sizes is None else tuple(sizes)),
    "stack": lambda axis=0: _combine("stack", axis),
}

_USAGE = (
    "transpose, transpose(1, 0, 2), reshape(4, -1), split(parts, take, axis=0), squeeze(axis), "
    "expand(axis), astype(float32) or a dtype name, and for several tensors onto one leaf "
    "concat(axis=0) (with sizes=(...) to export it), stack(axis=0)"
)


def _integers(value: Any) -> bool:
    """An int, or a tuple of them (concat's sizes)."""
    return type(value) is int or (isinstance(value, tuple | list) and all(type(v) is int for v in value))


def _named_transform(text: str, where: str) -> Named:
    """A transform written as data: `name`, `name(args)` (literal ints, and a dtype name
    for astype), or a dtype name (a cast)."""
    try:
        call = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        call = None
    if isinstance(call, ast.Name) and call.id in NAMED and call.id != "astype":
        call = ast.Call(call, [], [])
    if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in NAMED:
        try:
            if call.func.id == "astype":
                (arg,) = call.args
                return _astype(ast.unparse(arg).strip("'\""))
            args = [ast.literal_eval(a) for a in call.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg}
            if not all(_integers(v) for v in [*args, *kwargs.values()]):
                raise TypeError("takes integers")
            return NAMED[call.func.id](*args, **kwargs)
        except (TypeError, ValueError, SyntaxError) as exc:
            raise ValueError(
                f"{where}: the transform {text!r} is malformed ({exc}); write one of {_USAGE}."
            ) from None
    try:
        return _astype(text)
    except TypeError:
        raise ValueError(
            f"{where}: unknown transform {text!r}; a named transform is one of {_USAGE}. Pass a "
            "function for anything else."
        ) from None


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
        steps = tuple(_transform(step, f"{where}[{k}]") for k, step in enumerate(fn))
        if any(combines(step) for step in steps[1:]):
            raise ValueError(
                f"{where}: concat and stack take the tensors renamed onto a leaf, so they come first "
                "in a tuple of transforms."
            )
        return _Chain(steps)
    if not callable(fn):
        raise TypeError(
            f"{where}: {fn!r} is not callable; give a function of the array, 'transpose', a dtype "
            "name, or a tuple of these applied in order."
        )
    return fn


def _steps(fn: Callable[[Any], Any] | None) -> tuple[Callable[[Any], Any], ...]:
    """The single steps of `fn`, chains within chains flattened."""
    if fn is None:
        return ()
    return tuple(s for step in fn.steps for s in _steps(step)) if isinstance(fn, _Chain) else (fn,)


def cast_after(fn: Callable[[Any], Any] | None, dtype: Any) -> Callable[[Any], Any]:
    """`fn` (or nothing), then a cast to `dtype`: the dtype policy's own transform."""
    cast = _astype(dtype)
    steps = _steps(fn)
    return _Chain((*steps, cast)) if steps else cast


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


class Undo(NamedTuple):
    """How export undoes a leaf's transform. `steps` (inverses, in order) take the leaf's value
    back to where the transform split or combined (`joint`): there the part a `split` took
    is joined with the parts the tensor's other leaves hold, then `rest` is applied; or the
    value a `concat`/`stack` built is split into its tensors. Without a joint, `steps` undo
    it all."""

    steps: tuple[Named, ...] = ()
    joint: Named | None = None
    rest: tuple[Named, ...] = ()


def undo(fn: Callable[[Any], Any] | None) -> Undo:
    """How export undoes `fn` (a rule's transform, or None).

    Raises:
        ValueError: why it cannot be undone (a Python function, a reshape, two splits).
    """
    steps = _steps(fn)
    for step in steps:
        if not isinstance(step, Named):
            raise ValueError(
                f"the function {transform_name(step)} has no inverse; write the transform as data "
                "(transpose, split, squeeze, expand, a dtype name, ...)"
            )
    named: tuple[Named, ...] = steps  # type: ignore[assignment]
    joints = [k for k, step in enumerate(named) if step.splits or step.combines]
    if len(joints) > 1:
        raise ValueError("it splits or combines twice, and only one of them can be undone")

    def inverses(part: tuple[Named, ...]) -> tuple[Named, ...]:
        out = []
        for step in reversed(part):
            if isinstance(step.inverse, str):
                raise ValueError(f"{step.label} cannot be undone: {step.inverse}")
            if (inverse := step.inverse()) is not None:
                out.append(inverse)
        return tuple(out)

    if not joints:
        return Undo(inverses(named))
    j = joints[0]
    return Undo(inverses(named[j + 1 :]), named[j], inverses(named[:j]))


def combines(fn: Callable[[Any], Any] | None) -> bool:
    """Whether `fn` takes the list of tensors renamed onto one leaf (`concat`, `stack`, or a
    tuple of transforms that starts with one)."""
    first = next(iter(_steps(fn)), None)
    return isinstance(first, Named) and first.combines is not None


def output_meta(
    fn: Callable[[Any], Any], shape: Shape | list[Shape], dtype: Any | list[Any]
) -> tuple[Shape, Any] | str:
    """The shape and dtype `fn` gives for a tensor (or, for a combining `fn`, for the
    tensors with these shapes and dtypes), without data: else why not, an `Impossible`
    where it is certain to fail."""
    if isinstance(fn, _Chain):
        meta: tuple[Shape, Any] | None = None
        for step in fn.steps:
            out = output_meta(step, shape, dtype) if meta is None else output_meta(step, *meta)
            if isinstance(out, str):
                text = f"{transform_name(step)}: {out}" if not isinstance(step, Named) else out
                return Impossible(text) if isinstance(out, Impossible) else text
            meta = out
        assert meta is not None
        return meta
    if isinstance(fn, Named):
        try:
            if isinstance(shape, list):
                if fn.combines is None:
                    return Impossible(f"{fn.__name__} takes one tensor, not {len(shape)}")
                how, axis, sizes = fn.combines
                return combined_meta(how, axis, list(zip(shape, dtype, strict=True)), fn.__name__, sizes)
            return fn.output(shape, dtype)  # a combining one's too: of one tensor
        except ValueError as exc:
            return Impossible(str(exc))
    assert not isinstance(shape, list)
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
