"""Rules as data: a rule list in a TOML or JSON file, or a dict of the same shape.

    default = "decay"            # optional: the label of leaves no rule matches
    preset = "timm"              # optional: append a preset's rules after these

    [[rules]]
    match = "*.bias"             # a pattern, or a list of them (any of); "re:" for a regex
    label = "no_decay"

    [[rules]]
    type = "equinox.nn.LayerNorm"    # a dotted import path, or a list of them
    ndim = "<=1"                     # an int, or a comparison: "==1", "!=2", "<3", "<=1", ">2", ">=2"
    label = "no_decay"
    optional = true                  # this rule may match nothing

The conditions of an entry (`match`, `type`, `ndim`) are ANDed; each entry
needs at least one. Loading gives exactly the selectors the Python API
builds: `match` -> `glob`/`regex` (`any_of` for a list), `type` -> `inside`,
`ndim` -> `treeglob.ndim` comparison, `optional` -> `treeglob.optional`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pathlib
import re
import tomllib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import optax
from jax.sharding import PartitionSpec

from . import presets
from ._checkpoints.rules import TransferRules, check_rules
from ._core.conditions import COMPARISONS, glob, inside, ndim
from ._core.errors import RulesFileError, suggest
from ._core.rules import MISSING, check_label
from ._core.selector import Selector, all_of, any_of, coerce, optional
from ._training.recipes import relabel

if TYPE_CHECKING:
    from ._training.treatment import Treatment

__all__ = ["RuleConfig", "TransferRules", "load_rules", "load_transfer", "load_treatment"]

#: Turns a label read from a file into the value a rule holds (a schedule, a PartitionSpec).
_Value = Callable[[Any, str], Any]

_ENTRY_KEYS = ("match", "type", "ndim", "label", "optional")
_LABEL_KEYS = ("rules", "default", "preset")
_TRANSFER_KEYS = ("skip", "ignore", "rename", "transform")
# One file may hold both: each reader takes its keys and knows the other's.
_TOP_KEYS = _LABEL_KEYS + _TRANSFER_KEYS
# The operators, longest first so that "<=" is not read as "<".
_COMPARISON = re.compile(
    r"\s*(" + "|".join(map(re.escape, sorted(COMPARISONS, key=len, reverse=True))) + r")?\s*(\d+)\s*"
)


class RuleConfig(NamedTuple):
    """Rules loaded from data: pass `rules` and `default` on to `labels`, `explain`, ..."""

    rules: list[tuple[Selector, Any]]
    default: Any = MISSING


def _unknown_key(key: str, allowed: tuple[str, ...], where: str) -> RulesFileError:
    close = suggest(key, allowed)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return RulesFileError(f"{where}: unknown key {key!r}.{hint} Allowed keys: {', '.join(allowed)}.")


def _import_type(path: Any, where: str) -> type:
    if not isinstance(path, str) or "." not in path:
        raise RulesFileError(
            f"{where}: type must be a dotted import path such as 'equinox.nn.LayerNorm', got {path!r}."
        )
    module_name, _, name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RulesFileError(f"{where}: cannot import the module of type {path!r}: {exc}.") from None
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        found = "it does not exist" if cls is None else f"it is a {type(cls).__name__}, not a class"
        close = suggest(name, [n for n in dir(module) if isinstance(getattr(module, n, None), type)])
        hint = f" Did you mean {module_name}.{close[0]}?" if close else ""
        raise RulesFileError(f"{where}: type {path!r} is not a class: {found}.{hint}")
    return cls


def _ndim(value: Any, where: str) -> Selector:
    if isinstance(value, int) and not isinstance(value, bool):
        return ndim == value
    m = _COMPARISON.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise RulesFileError(
            f"{where}: ndim must be an int or a comparison such as '>=2' or '<=1', got {value!r}."
        )
    return ndim.compare(m.group(1) or "==", int(m.group(2)))


def _entry(entry: Any, where: str, value: _Value | None = None) -> tuple[Selector, Any]:
    if not isinstance(entry, Mapping):
        raise RulesFileError(
            f"{where}: a rule is a table such as {{match = '*.bias', label = 'no_decay'}}, got {entry!r}."
        )
    _check_keys(entry, where, _ENTRY_KEYS)
    if "label" not in entry:
        raise RulesFileError(f'{where}: the rule has no label; add label = "...".')
    parts: list[Selector] = []
    if "match" in entry:
        patterns = entry["match"]
        patterns = patterns if isinstance(patterns, list) else [patterns]
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise RulesFileError(
                f"{where}: match must be a pattern string or a list of them, got {entry['match']!r}."
            )
        try:
            parts.append(coerce(patterns[0]) if len(patterns) == 1 else any_of(*patterns))
        except ValueError as exc:
            raise RulesFileError(f"{where}: bad pattern in match:\n{exc}") from None
    if "type" in entry:
        types_ = entry["type"] if isinstance(entry["type"], list) else [entry["type"]]
        if not types_:
            raise RulesFileError(f"{where}: type must be a dotted import path or a non-empty list of them.")
        parts.append(inside(*(_import_type(t, where) for t in types_)))
    if "ndim" in entry:
        parts.append(_ndim(entry["ndim"], where))
    if not parts:
        raise RulesFileError(
            f'{where}: the rule has no condition; give match, type or ndim (match = "**" selects everything).'
        )
    selector = parts[0] if len(parts) == 1 else all_of(*parts)
    flag = entry.get("optional", False)
    if not isinstance(flag, bool):
        raise RulesFileError(f"{where}: optional must be true or false, got {flag!r}.")
    label = entry["label"] if value is None else value(entry["label"], where)
    try:
        check_label(label, where)
    except TypeError as exc:
        raise RulesFileError(str(exc)) from None
    return (optional(selector) if flag else selector), label


def _check_keys(data: Any, origin: str, keys: tuple[str, ...] = _TOP_KEYS) -> None:
    if not isinstance(data, Mapping):
        raise RulesFileError(f"{origin}: expected a table of rules, got {type(data).__name__}.")
    for key in data:
        if not isinstance(key, str):
            raise RulesFileError(
                f"{origin}: the key {key!r} is not a string; the keys are {', '.join(keys)}."
            )
        if key not in keys:
            raise _unknown_key(key, keys, origin)


def _from_data(
    data: Any, origin: str, value: _Value | None = None, keys: tuple[str, ...] = _TOP_KEYS
) -> RuleConfig:
    _check_keys(data, origin, keys)
    entries = data.get("rules", [])
    if not isinstance(entries, list):
        raise RulesFileError(f"{origin}: `rules` must be a list of rule tables ([[rules]] in TOML).")
    rules = [_entry(e, f"{origin}, rules[{i}]", value) for i, e in enumerate(entries)]
    if "preset" in data:
        name = data["preset"]
        if not isinstance(name, str) or name not in presets.BY_NAME:
            raise RulesFileError(
                f"{origin}: unknown preset {name!r}; the presets are {', '.join(presets.BY_NAME)}."
            )
        rules += presets.BY_NAME[name]
    if not rules:
        raise RulesFileError(f"{origin}: no rules; add [[rules]] entries or a preset.")
    default = data.get("default", MISSING)
    if default is not MISSING and value is not None:
        default = value(default, f"{origin}, default")
    if default is not MISSING:
        try:
            check_label(default, "default")
        except TypeError as exc:
            raise RulesFileError(f"{origin}: {exc}") from None
    return RuleConfig(rules, default)


def _read(source: str | pathlib.Path | Mapping[str, Any], key: str | None) -> tuple[Any, str]:
    """The data of a rules file (or dict), at `key`, and how messages name it."""
    if isinstance(source, Mapping):
        data, origin = source, "<dict>"
    else:
        path = pathlib.Path(source)
        origin = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RulesFileError(f"{origin}: no such rules file.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RulesFileError(f"{origin}: cannot read the rules file: {exc}.") from None
        if path.suffix == ".toml":
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise RulesFileError(f"{origin}: not valid TOML: {exc}.") from None
        elif path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RulesFileError(f"{origin}: not valid JSON: {exc}.") from None
        else:
            raise RulesFileError(
                f"{origin}: rules files are .toml or .json, got {path.suffix or 'no suffix'!r}."
            )
    if key:
        for part in key.split("."):
            if not isinstance(data, Mapping) or part not in data:
                raise RulesFileError(f"{origin}: no table {key!r} (missing {part!r}).")
            data = data[part]
        origin = f"{origin} [{key}]"
    return data, origin


def load_rules(source: str | pathlib.Path | Mapping[str, Any], *, key: str | None = None) -> RuleConfig:
    """Read a rule list from a `.toml` or `.json` file, or from a dict of the same shape.

    Args:
        source: a path, or a dict `{"rules": [...], "default": ..., "preset": ...}`.
        key: a dotted key of the table holding the rules inside a larger
            config file, e.g. `"optimizer.weight_decay"`.

    Returns:
        A `RuleConfig(rules, default)`; `rules` is a list of `(selector, label)`
        pairs, equal to the ones written with the Python API.

    Raises:
        RulesFileError: (a `ValueError`) the file is missing, not valid TOML
            or JSON, or an entry is wrong; the message names the file, the
            entry and the problem.

    Examples:
        >>> import treeglob
        >>> config = treeglob.load_rules({
        ...     "rules": [{"match": "*.bias", "label": "no_decay"}, {"ndim": ">=2", "label": "decay"}],
        ...     "default": "no_decay"})
        >>> config.rules == [(treeglob.glob("*.bias"), "no_decay"), (treeglob.ndim >= 2, "decay")]
        True
        >>> treeglob.load_rules({"rules": [{"match": "*.bias", "lable": "x"}]})
        Traceback (most recent call last):
        ...
        treeglob.RulesFileError: <dict>, rules[0]: unknown key 'lable'. Did you mean 'label'? Allowed keys: match, type, ndim, label, optional.
    """
    data, origin = _read(source, key)
    return _from_data(data, origin)


def _patterns(data: Mapping[str, Any], key: str, origin: str) -> list[str]:
    value = data.get(key, [])
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise RulesFileError(f"{origin}: {key} must be a pattern or a list of patterns, got {value!r}.")
    return value


def _pairs(data: Mapping[str, Any], key: str, origin: str, what: str) -> list[tuple[str, Any]]:
    value = data.get(key, {})
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
        pairs = [tuple(p) for p in value]
    else:
        raise RulesFileError(
            f"{origin}: {key} must be a table {{pattern = {what}}} (kept in order) or a list of "
            f"[pattern, {what}] pairs, got {value!r}."
        )
    for pattern, target in pairs:
        ok = isinstance(target, str) or (
            key in ("rename", "transform")
            and isinstance(target, list)
            and target
            and all(isinstance(t, str) for t in target)
        )
        if not isinstance(pattern, str) or not ok:
            raise RulesFileError(
                f"{origin}: {key} entry {pattern!r} = {target!r}: expected a pattern and {what}."
            )
    return [(p, tuple(t) if isinstance(t, list) else t) for p, t in pairs]


def load_transfer(source: str | pathlib.Path | Mapping[str, Any], *, key: str | None = None) -> TransferRules:
    """Read checkpoint-transfer rules (`skip`, `ignore`, `rename`, `transform`) from a file or dict.

    The file may be the rules file of `load_rules` too: each reader takes
    its own keys. Transforms are named: `"transpose"` or a dtype name, or a list
    of names applied in order (`["transpose", "float32"]`).

        skip = ["head"]                       # model leaves kept from initialisation
        ignore = ["*.attn.masked_bias"]       # checkpoint tensors nothing uses
        [rename]                              # applied in order
        "^transformer.h" = "blocks"
        "attn.c_attn" = ["attn.query_proj", "attn.key_proj", "attn.value_proj"]
        [transform]
        "*.fc.weight" = "transpose"

    Raises:
        RulesFileError: the file is missing or malformed, or a pattern,
            replacement or transform name is wrong; the message names the
            file and the entry.

    Examples:
        >>> import treeglob
        >>> treeglob.load_transfer({"skip": "head", "rename": {"h.{i}": "blocks.{i}"}})
        TransferRules(rename=[('h.{i}', 'blocks.{i}')], skip=['head'], ignore=[], transform=[])
    """
    data, origin = _read(source, key)
    _check_keys(data, origin)
    rules = TransferRules(
        rename=_pairs(data, "rename", origin, "a replacement (or a list of them)"),
        skip=_patterns(data, "skip", origin),
        ignore=_patterns(data, "ignore", origin),
        transform=_pairs(data, "transform", origin, "a transform name (or a list of them, applied in order)"),
    )
    if not any(rules):
        raise RulesFileError(f"{origin}: no transfer rules; give skip, ignore, rename or transform.")
    try:
        check_rules(**rules._asdict())
    except (TypeError, ValueError) as exc:
        raise RulesFileError(f"{origin}: {exc}") from None
    return rules


# ----------------------------------------------------------------------------
# A Treatment: one section of rules per aspect of training

_TREATMENT_KEYS = (
    "learning_rate",
    "lr_scale",
    "layer_decay",
    "weight_decay",
    "unfreeze",
    "sharding",
    "labels",
    "stacked",
    "strict",
)
_ASPECT_KEYS = ("rules", "default", "preset", "values")
_LAYER_DECAY_KEYS = ("decay", "blocks", "layers", "schedule")


def _schedules() -> list[str]:
    return sorted(name.removesuffix("_schedule") for name in dir(optax) if name.endswith("_schedule"))


def _number_or_schedule(value: Any, where: str) -> Any:
    """A number, or a table `{schedule = "<optax name>", <its arguments>}`."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("schedule"), str):
        name = value["schedule"]
        make = getattr(optax, f"{name}_schedule", None)
        if make is None:
            close = suggest(name, _schedules())
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RulesFileError(
                f"{where}: no optax schedule {name!r}.{hint} The schedules: {', '.join(_schedules())}."
            )
        arguments = {k: v for k, v in value.items() if k != "schedule"}
        try:
            return make(**arguments)
        except TypeError as exc:
            raise RulesFileError(f"{where}: optax.{name}_schedule{inspect.signature(make)}: {exc}.") from None
    raise RulesFileError(
        f'{where}: expected a number or a schedule such as {{schedule = "linear", init_value = 0.0, '
        f"end_value = 1.0, transition_steps = 100}}, got {value!r}."
    )


def _step(value: Any, where: str) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    raise RulesFileError(f"{where}: expected the step from which to train (an int, or inf), got {value!r}.")


def _partition_spec(value: Any, where: str) -> PartitionSpec:
    """A list with one entry per dimension: a mesh axis, a list of them, or null (JSON) / ""
    (TOML, which has no null) for a dimension not sharded."""
    entries = value if isinstance(value, list) else None
    ok = entries is not None and all(
        e is None or isinstance(e, str) or (isinstance(e, list) and all(isinstance(n, str) for n in e))
        for e in entries
    )
    if not ok:
        raise RulesFileError(
            f"{where}: a sharding is a list with one entry per dimension, a mesh axis, a list of them, or "
            f'"" (null in JSON) for none, e.g. ["", "model"] or [["data", "fsdp"], ""], got {value!r}.'
        )
    return PartitionSpec(*(tuple(e) if isinstance(e, list) else e or None for e in entries or ()))


def _aspect(data: Any, origin: str, value: _Value | None) -> list[tuple[Any, Any]]:
    """One aspect's rules; with `values = {label = value}`, the labels (a preset's) are names."""
    if not isinstance(data, Mapping):
        raise RulesFileError(f"{origin}: expected a table with rules, default, preset or values.")
    names = data.get("values")
    rest = {k: v for k, v in data.items() if k != "values"}
    config = _from_data(rest, origin, value if names is None else None, _ASPECT_KEYS)
    rules = list(config.rules)
    if config.default is not MISSING:
        rules.append((glob("**"), config.default))
    if names is None:
        return rules
    if not isinstance(names, Mapping):
        raise RulesFileError(f"{origin}: values must be a table {{label = value}}, got {names!r}.")
    converted = {
        label: v if value is None else value(v, f"{origin}, values.{label}") for label, v in names.items()
    }
    try:
        return relabel(rules, converted)
    except ValueError as exc:
        raise RulesFileError(f"{origin}: {exc}") from None


def _layer_decay(data: Any, origin: str) -> Any:
    if isinstance(data, int | float) and not isinstance(data, bool):
        return data
    if not isinstance(data, Mapping):
        raise RulesFileError(
            f"{origin}: layer_decay is a decay such as 0.75, or a table with decay, blocks, layers, schedule."
        )
    _check_keys(data, origin, _LAYER_DECAY_KEYS)
    arguments = {"decay": data.get("decay")}
    if "blocks" in data:
        arguments["blocks"] = data["blocks"]
    if "layers" in data:
        families = [name for name in presets.__all__ if name.endswith("_LAYERS")]
        name = str(data["layers"]).upper()
        if name not in families and f"{name}_LAYERS" not in families:
            raise RulesFileError(
                f"{origin}: unknown layers {data['layers']!r}; the families are {', '.join(families)}."
            )
        arguments["rules"] = getattr(presets, name if name in families else f"{name}_LAYERS")
    if "schedule" in data:
        arguments["schedule"] = _number_or_schedule(data["schedule"], f"{origin}, schedule")
    return arguments


def load_treatment(source: str | pathlib.Path | Mapping[str, Any], *, key: str | None = None) -> Treatment:
    """Read a `treeglob.Treatment` from a `.toml` or `.json` file, or a dict: one section per aspect::

        learning_rate = {schedule = "warmup_cosine_decay", init_value = 0.0, peak_value = 1e-3,
                         warmup_steps = 100, decay_steps = 10000}
        stacked = {blocks = 1}              # optional
        [lr_scale]                          # each aspect: rules, default, preset, values
        rules = [{match = "head", label = 10.0}]
        [layer_decay]
        decay = 0.75                        # also blocks, layers = "timm_convnext", schedule
        [weight_decay]
        preset = "default"
        values = {decay = 0.05, no_decay = 0.0}   # a preset's labels as rates
        [unfreeze]
        rules = [{match = "blocks.{0..5}", label = 1000}]
        [sharding]
        rules = [{match = "*.weight", ndim = 2, label = ["", "model"]}]   # "": not sharded
        [labels]
        preset = "default"

    Rules are written as in `treeglob.load_rules`; a label is a number or a
    schedule (`{schedule = "<optax name>", ...its arguments}`), a step, or a
    `PartitionSpec` as a list, by aspect. `default` adds a last rule for
    every leaf.

    Raises:
        RulesFileError: the file is missing or malformed, or a section,
            schedule or label is wrong; the message names the file and the entry.

    Examples:
        >>> import treeglob
        >>> treatment = treeglob.load_treatment({
        ...     "learning_rate": {"schedule": "linear", "init_value": 0.0, "end_value": 1e-3, "transition_steps": 100},
        ...     "weight_decay": {"preset": "nanogpt", "values": {"decay": 0.1, "no_decay": 0.0}},
        ...     "unfreeze": {"rules": [{"match": "head", "label": 0}], "default": 500}})
        >>> treatment.unfreeze
        [(glob('head'), 0), (glob('**'), 500)]
    """
    from ._training.treatment import Treatment  # the optimizer is built only where a treatment is read

    data, origin = _read(source, key)
    _check_keys(data, origin, _TREATMENT_KEYS)
    arguments: dict[str, Any] = {}
    if "learning_rate" in data:
        arguments["learning_rate"] = _number_or_schedule(data["learning_rate"], f"{origin}, learning_rate")
    converters: dict[str, _Value | None] = {
        "lr_scale": _number_or_schedule,
        "weight_decay": _number_or_schedule,
        "unfreeze": _step,
        "sharding": _partition_spec,
        "labels": None,
    }
    for aspect, value in converters.items():
        if aspect in data:
            arguments[aspect] = _aspect(data[aspect], f"{origin} [{aspect}]", value)
    if "layer_decay" in data:
        arguments["layer_decay"] = _layer_decay(data["layer_decay"], f"{origin} [layer_decay]")
    if "stacked" in data:
        stacked = data["stacked"]
        if not isinstance(stacked, Mapping) or not all(
            isinstance(v, int) and v > 0 for v in stacked.values()
        ):
            raise RulesFileError(
                f"{origin}: stacked is a table {{path = number of layer axes}}, got {stacked!r}."
            )
        arguments["stacked"] = dict(stacked)
    if "strict" in data:
        if not isinstance(data["strict"], bool):
            raise RulesFileError(f"{origin}: strict must be true or false, got {data['strict']!r}.")
        arguments["strict"] = data["strict"]
    try:
        return Treatment(**arguments)
    except (TypeError, ValueError) as exc:
        raise RulesFileError(f"{origin}: {exc}") from None
