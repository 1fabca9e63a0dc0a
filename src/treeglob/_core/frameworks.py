"""What treeglob knows of each framework, one adapter per framework, in one place.

An adapter says, for the trees of its framework:

* which node types wrap one leaf and add no segment to its path (`wrappers`):
  a Flax NNX `Variable` (`head.kernel`, not `head.kernel.value`), a penzai
  `ParameterValue`;
* how a wrapper's own label becomes its path (`label_segments`): penzai's
  parameter labels (`block_0/attn/query.weights`) in place of a position;
* how a model becomes the parameters training reads (`parameters`), for the
  command line: an NNX module's State of `nnx.Param`, a penzai model's
  frozen parameters (what penzai's trainer hands optax);
* how its checkpoints store a wrapper (`stored_wrapper`): orbax writes an NNX
  Variable as `{"value": ...}`;
* where a model marks its stacked layers (`stacked_layers`, `stack_mark`): a
  penzai `LayerStack` names its layer axis;
* what to say when a type selector matches nothing on its trees (`type_hint`);
* whether its models change in place when a module is replaced (`in_place`,
  `assign`): an NNX module is a mutable object graph that an `nnx.Optimizer`
  and other references hold, so its attributes are set, as NNX's own
  documentation does (`model.linear = nnx.LoRA(...)`); every other tree is
  rebuilt (Equinox and penzai models are immutable).

Dict keys that are paths (`/`-joined Haiku module names and
`flatten_dict(sep="/")`, tuple keys of `flatten_dict`) are split the same way
for every framework (`KEY_SEPARATOR`, see `structure.py`). An adapter never
imports its framework: it recognises classes by their module, and uses the
framework only on a model that is already one of its own (`sys.modules`).

Adding a framework means writing one adapter here, adding it to `ADAPTERS`,
and testing it in `tests/frameworks/`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax.tree_util as jtu

from .keys import quote

__all__ = [
    "ADAPTERS",
    "KEY_SEPARATOR",
    "Adapter",
    "in_place",
    "is_wrapper",
    "label_segments",
    "parameters",
    "parameters_elsewhere",
    "stack_mark",
    "stacked_layers",
    "stored_wrapper",
    "type_hint",
]

#: The separator of dict keys that are paths: Haiku's module names
#: (`encoder/block_0/linear`) and Flax's `flatten_dict(sep="/")`.
KEY_SEPARATOR = "/"


def _defined_in(kind: type, package: str, names: tuple[str, ...]) -> bool:
    return any(
        base.__module__.startswith(package) and base.__name__ in names
        for base in getattr(kind, "__mro__", ())
    )


class Adapter:
    """One framework's conventions; the defaults are those of a plain PyTree."""

    name = ""
    package = ""  # the module prefix of the framework's classes
    wrappers: tuple[str, ...] = ()

    def is_wrapper(self, kind: type) -> bool:
        return bool(self.wrappers) and _defined_in(kind, self.package, self.wrappers)

    def label_segments(self, node_data: Any) -> tuple[str, ...] | None:
        """The segments a wrapper's own label gives its leaf, or None to keep its key."""
        return None

    def parameters(self, model: Any, variables: str) -> Any:
        """The parameters training reads from `model`, or None when it is not this framework's."""
        return None

    def stored_wrapper(self, node: Any) -> bool:
        """Whether a checkpoint's node stores one wrapper of this framework (its leaf in `"value"`)."""
        return False

    def type_hint(self, tree_types: set[type]) -> str:
        """Why a type selector may find nothing in a tree whose nodes have `tree_types`."""
        return ""

    def stacked_layers(self, model: Any) -> dict[str, int] | None:
        """The `stacked=` of the parameters training reads, as the model marks it, or None
        when the model is not this framework's."""
        return None

    def stack_mark(
        self, tree_types: set[type], segments: set[str], inner_paths: Callable[[], list[tuple[str, ...]]]
    ) -> str:
        """Why a tree cannot be resolved without `stacked=`, or "": from its node types, its
        distinct segment texts, and (asked only when needed) the paths of its inner nodes."""
        return ""

    def parameters_elsewhere(self, leaf_types: set[type]) -> str:
        """Why a tree whose leaves have `leaf_types` holds no parameter arrays to save or load
        (they live in objects of the framework's), or ""."""
        return ""

    def random_state(self) -> tuple[type, ...]:
        """The wrapper types by which the framework marks random state (PRNG keys and their
        counters), which a checkpoint of parameters need not hold."""
        return ()

    def in_place(self, tree: Any) -> bool:
        """Whether a module of `tree` is replaced by assigning to its parent, not by rebuilding."""
        return False

    def assign(self, parent: Any, key: Any, value: Any) -> None:
        """Put `value` in `parent` at the JAX key `key` (for `in_place` trees)."""
        raise NotImplementedError


_NNX_STATE_HINT = (
    "This is a Flax NNX State: it holds the Variables, not the modules, so module types "
    "(nnx.Linear, nnx.LayerNorm, ...) select nothing in it. Pass the model they live on: "
    "types_from=model (e.g. treeglob.mask(nnx.state(model, nnx.Param), nnx.LayerNorm, "
    "types_from=model)); Variable types (nnx.Param, nnx.LoRAParam) select on the State itself."
)

_LAYER_STACK_MARK = (
    "This penzai model stacks layers (a LayerStack), which its parameters cannot show once "
    "unbound. Select on the parameters training reads, with the stacked layers the model "
    "declares: params = pz.freeze_params(pz.unbind_params(model)[1]), then "
    "stacked=treeglob.stacked_layers(model)."
)


class _FlaxNNX(Adapter):
    name, package = "Flax NNX", "flax.nnx"
    wrappers = ("Variable", "VariableState")

    def parameters(self, model: Any, variables: str) -> Any:
        nnx = sys.modules.get("flax.nnx")
        if nnx is None or not isinstance(model, nnx.Module):
            return None
        if variables == "all":
            return nnx.state(model)
        kinds = []
        for name in variables.split(","):
            kind = getattr(nnx, name.strip(), None)
            if not (isinstance(kind, type) and issubclass(kind, nnx.Variable)):
                known = sorted(
                    n
                    for n in dir(nnx)
                    if isinstance(getattr(nnx, n), type) and issubclass(getattr(nnx, n), nnx.Variable)
                )
                raise ValueError(
                    f"{name.strip()!r} is not a Flax NNX Variable type; "
                    f"give names such as {', '.join(known[:8])}, ... or 'all'."
                )
            kinds.append(kind)
        return nnx.state(model, nnx.Any(*kinds))

    def stored_wrapper(self, node: Any) -> bool:
        return isinstance(node, dict) and len(node) == 1 and hasattr(node.get("value"), "shape")

    def random_state(self) -> tuple[type, ...]:
        nnx = sys.modules.get("flax.nnx")
        return () if nnx is None else (nnx.RngState,)  # RngKey, RngCount

    def type_hint(self, tree_types: set[type]) -> str:
        return _NNX_STATE_HINT if any(_defined_in(t, "flax.nnx", ("State",)) for t in tree_types) else ""

    def in_place(self, tree: Any) -> bool:
        nnx = sys.modules.get("flax.nnx")
        return nnx is not None and isinstance(tree, nnx.Module)

    def assign(self, parent: Any, key: Any, value: Any) -> None:
        if isinstance(key, jtu.GetAttrKey):
            setattr(parent, key.name, value)  # a module's attribute
        elif isinstance(key, jtu.SequenceKey | jtu.DictKey) and hasattr(parent, "__setitem__"):
            parent[key.idx if isinstance(key, jtu.SequenceKey) else key.key] = value  # nnx.List, nnx.Dict
        else:
            raise TypeError(
                f"Cannot put a new module into a {type(parent).__name__} at {key}: Flax NNX modules "
                "are changed in place, and this container cannot be assigned to. Keep submodules "
                "in module attributes, nnx.List or nnx.Dict."
            )


def _label_path(label: str) -> tuple[str, ...]:
    """A penzai label (`mlp/Affine_0/Linear.weights`) as segments: `/` and `.` both separate."""
    return tuple(label.replace(KEY_SEPARATOR, ".").split("."))


class _Penzai(Adapter):
    name, package = "penzai", "penzai.core"
    wrappers = ("ParameterValue", "StateVariableValue")

    def label_segments(self, node_data: Any) -> tuple[str, ...] | None:
        # A parameter's label as its path, in place of its position in the tuple penzai's
        # trainer hands optax.
        label = getattr(node_data[1], "static_fields", {}).get("label")
        return _label_path(label) if isinstance(label, str) and label else None

    def parameters(self, model: Any, variables: str) -> Any:
        pz = sys.modules.get("penzai.pz")
        if pz is None or not isinstance(model, pz.nn.Layer):
            return None
        # What penzai's StatefulTrainer hands optax: the frozen values of the unbound parameters.
        return pz.freeze_params(pz.unbind_params(model)[1])

    def stacked_layers(self, model: Any) -> dict[str, int] | None:
        pz = sys.modules.get("penzai.pz")
        if pz is None or not isinstance(model, pz.nn.Layer):
            return None
        from penzai.nn.layer_stack import LayerStackGetAttrKey, layerstack_axes_from_keypath

        kinds = (pz.Parameter, pz.ParameterValue)
        stacks: dict[tuple[Any, ...], list[tuple[str, ...]]] = {}  # a LayerStack's key path -> its params
        axes_of: dict[tuple[Any, ...], int] = {}
        unstacked: list[tuple[str, ...]] = []
        for keypath, leaf in jtu.tree_flatten_with_path(model, is_leaf=lambda x: isinstance(x, kinds))[0]:
            if not isinstance(leaf, kinds):
                continue
            path = _label_path(leaf.label)
            axes = list(layerstack_axes_from_keypath(keypath))
            if not axes:
                unstacked.append(path)
                continue
            _check_leading(path, axes, leaf.value)
            last = max(i for i, key in enumerate(keypath) if isinstance(key, LayerStackGetAttrKey))
            stacks.setdefault(tuple(keypath[: last + 1]), []).append(path)
            axes_of[tuple(keypath[: last + 1])] = len(axes)
        out: dict[str, int] = {}
        for stack, members in stacks.items():
            # The stack as one subtree (`transformer.blocks`, its layers `transformer.blocks.0...`,
            # as a scanned Equinox model's), where its parameters' labels share a prefix that
            # no other parameter has; else each parameter on its own.
            prefix = _common_prefix([m[:-1] for m in members])
            others = unstacked + [m for s, ms in stacks.items() if s != stack for m in ms]
            if prefix and not any(p[: len(prefix)] == prefix for p in others):
                out[".".join(map(quote, prefix))] = axes_of[stack]
            else:
                out.update({".".join(map(quote, m)): axes_of[stack] for m in members})
        return out

    def stack_mark(
        self, tree_types: set[type], segments: set[str], inner_paths: Callable[[], list[tuple[str, ...]]]
    ) -> str:
        return (
            _LAYER_STACK_MARK if any(_defined_in(t, "penzai.nn", ("LayerStack",)) for t in tree_types) else ""
        )

    def parameters_elsewhere(self, leaf_types: set[type]) -> str:
        if any(_defined_in(t, "penzai.core", ("Parameter", "StateVariable")) for t in leaf_types):
            return (
                "This penzai model keeps its parameters in Parameter objects, not as arrays in the tree. "
                "Use the parameters training reads: values = pz.freeze_params(pz.unbind_params(model)[1]) "
                "(with stacked=treeglob.stacked_layers(model) for one tensor per layer)."
            )
        return ""


def _check_leading(path: tuple[str, ...], axes: list[Any], value: Any) -> None:
    """A stacked parameter's array must lead with the stack axes, as `stacked=` reads them."""
    named = list(getattr(value, "named_axes", {}))
    data = getattr(value, "data_array", None)
    # A NamedArray keeps its positional axes first, then its named axes in order.
    if data is None or data.ndim != len(named) or named[: len(axes)] != axes:
        where = ".".join(map(quote, path))
        raise ValueError(
            f"The parameter {where} lies in a penzai LayerStack over {axes}, but its array does not "
            f"lead with that axis (named axes {named}), so its layers cannot be told apart. "
            "Order its axes with the stack axis first (e.g. value.order_as(...)), or pass stacked= "
            "yourself."
        )


def _common_prefix(paths: list[tuple[str, ...]]) -> tuple[str, ...]:
    first = paths[0]
    n = len(first)
    for path in paths[1:]:
        n = next(
            (i for i, (a, b) in enumerate(zip(first[:n], path, strict=False)) if a != b), min(n, len(path))
        )
    return first[:n]


class _Haiku(Adapter):
    """Haiku params are dicts keyed by `/`-joined module names (split with `KEY_SEPARATOR`);
    `hk.layer_stack` names the module that holds its stacked layers `__layer_stack_...`."""

    name, package = "Haiku", "haiku"

    def stacked_layers(self, model: Any) -> dict[str, int] | None:
        if not isinstance(model, Mapping):
            return None
        found = {}
        for key in model:
            parts = _label_path(str(key))  # a module's name, or a checkpoint's tensor name
            stack = next((i for i, part in enumerate(parts) if part.startswith(_HAIKU_STACK)), None)
            if stack is not None:
                found[".".join(map(quote, parts[: stack + 1]))] = 1
        return found or None

    def stack_mark(
        self, tree_types: set[type], segments: set[str], inner_paths: Callable[[], list[tuple[str, ...]]]
    ) -> str:
        if not any(s.startswith(_HAIKU_STACK) for s in segments):
            return ""
        stacks = {".".join(map(quote, p)): 1 for p in inner_paths() if p[-1].startswith(_HAIKU_STACK)}
        return (
            "This Haiku model stacks layers with hk.layer_stack: the parameters below "
            f"{', '.join(stacks)} carry a leading layer axis, so a stacked norm scale would pass for a "
            f"matrix. Declare them: stacked={stacks!r}, which treeglob.stacked_layers(params) gives."
        )


#: The prefix of the module `hk.layer_stack` keeps its stacked parameters in.
_HAIKU_STACK = "__layer_stack"


class _FlaxLinen(Adapter):
    """Linen params are nested dicts (or `flatten_dict` tuple keys): plain PyTrees."""

    name, package = "Flax Linen", "flax.linen"


ADAPTERS: tuple[Adapter, ...] = (_FlaxNNX(), _Penzai(), _Haiku(), _FlaxLinen())


@functools.cache
def _wrapping(kind: type) -> Adapter | None:
    """The adapter whose framework `kind` is a wrapper of, found once per type."""
    return next((adapter for adapter in ADAPTERS if adapter.is_wrapper(kind)), None)


def is_wrapper(kind: type) -> bool:
    """Whether `kind` wraps one leaf that stands for it (an NNX Variable, a penzai
    ParameterValue): the leaf's path is the wrapper's, and outputs put a value in its place."""
    return _wrapping(kind) is not None


def label_segments(kind: type, node_data: Any) -> tuple[str, ...] | None:
    """The segments a wrapper's own label gives its leaf, or None."""
    adapter = _wrapping(kind)
    return None if adapter is None else adapter.label_segments(node_data)


def parameters(model: Any, variables: str = "Param") -> Any:
    """The parameters training reads from a model: what its framework's optimizer gets, or the
    model itself (an Equinox model, a dict of parameters)."""
    for adapter in ADAPTERS:
        params = adapter.parameters(model, variables)
        if params is not None:
            return params
    return model


def stacked_layers(model: Any) -> dict[str, int]:
    """The `stacked=` mapping a model declares for the parameters training reads.

    A penzai `LayerStack` names the axis its layers are stacked along; once
    the parameters are unbound (the tuple of `ParameterValue` objects penzai's
    trainer hands optax) nothing in them says so, and a stacked norm scale of
    shape `(layers, dim)` would pass for a matrix. Haiku's `hk.layer_stack`
    keeps its stacked parameters under a module named `__layer_stack_...`.
    Pass the result as `stacked=` to any treeglob function on those
    parameters. A model that declares no stacked layers gives `{}`.

    Raises:
        ValueError: a stacked parameter whose array does not lead with the stack axis.

    Examples:
        >>> import treeglob
        >>> treeglob.stacked_layers({"w": 1})
        {}
    """
    for adapter in ADAPTERS:
        found = adapter.stacked_layers(model)
        if found is not None:
            return found
    return {}


def stack_mark(
    tree_types: set[type], segments: set[str], inner_paths: Callable[[], list[tuple[str, ...]]]
) -> str:
    """Why a tree needs `stacked=` to be resolved, or "" (see `Adapter.stack_mark`)."""
    return "\n".join(m for a in ADAPTERS if (m := a.stack_mark(tree_types, segments, inner_paths)))


def parameters_elsewhere(leaf_types: set[type]) -> str:
    """Why a tree holds no parameter arrays to save or load, or "" (see `Adapter.parameters_elsewhere`)."""
    return "\n".join(m for a in ADAPTERS if (m := a.parameters_elsewhere(leaf_types)))


def random_state() -> tuple[type, ...]:
    """The wrapper types that mark random state, in the frameworks imported so far."""
    return tuple(kind for adapter in ADAPTERS for kind in adapter.random_state())


def in_place(tree: Any) -> Adapter | None:
    """The adapter whose models change in place when a module is replaced, or None (rebuild)."""
    return next((adapter for adapter in ADAPTERS if adapter.in_place(tree)), None)


def stored_wrapper(node: Any) -> bool:
    """Whether a checkpoint's node stores one framework wrapper, its leaf in `"value"`."""
    return any(adapter.stored_wrapper(node) for adapter in ADAPTERS)


def type_hint(tree_types: set[type]) -> str:
    """What the frameworks of a tree's node types say about a type selector that selects nothing."""
    return "\n".join(h for a in ADAPTERS if (h := a.type_hint(tree_types)))
