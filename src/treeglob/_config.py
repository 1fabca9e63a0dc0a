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
import json
import pathlib
import re
import tomllib
from collections.abc import Mapping
from typing import Any, NamedTuple

from . import presets
from ._checkpoints.rules import TransferRules, check_rules
from ._core.conditions import COMPARISONS, inside, ndim
from ._core.errors import RulesFileError, suggest
from ._core.rules import MISSING, check_label
from ._core.selector import Selector, all_of, any_of, coerce, optional

__all__ = ["RuleConfig", "TransferRules", "load_rules", "load_transfer"]

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


def _entry(entry: Any, where: str) -> tuple[Selector, Any]:
    if not isinstance(entry, Mapping):
        raise RulesFileError(
            f"{where}: a rule is a table such as {{match = '*.bias', label = 'no_decay'}}, got {entry!r}."
        )
    for key in entry:
        if not isinstance(key, str):
            raise RulesFileError(
                f"{where}: the key {key!r} is not a string; the keys are {', '.join(_ENTRY_KEYS)}."
            )
        if key not in _ENTRY_KEYS:
            raise _unknown_key(key, _ENTRY_KEYS, where)
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
    label = entry["label"]
    try:
        check_label(label, where)
    except TypeError as exc:
        raise RulesFileError(str(exc)) from None
    return (optional(selector) if flag else selector), label


def _check_keys(data: Any, origin: str) -> None:
    if not isinstance(data, Mapping):
        raise RulesFileError(f"{origin}: expected a table of rules, got {type(data).__name__}.")
    for key in data:
        if not isinstance(key, str):
            raise RulesFileError(
                f"{origin}: the key {key!r} is not a string; the keys are {', '.join(_TOP_KEYS)}."
            )
        if key not in _TOP_KEYS:
            raise _unknown_key(key, _TOP_KEYS, origin)


def _from_data(data: Any, origin: str) -> RuleConfig:
    _check_keys(data, origin)
    entries = data.get("rules", [])
    if not isinstance(entries, list):
        raise RulesFileError(f"{origin}: `rules` must be a list of rule tables ([[rules]] in TOML).")
    rules = [_entry(e, f"{origin}, rules[{i}]") for i, e in enumerate(entries)]
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
            key == "rename"
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
    its own keys. Transforms are named: `"transpose"` or a dtype name.

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
        transform=_pairs(data, "transform", origin, "a transform name"),
    )
    if not any(rules):
        raise RulesFileError(f"{origin}: no transfer rules; give skip, ignore, rename or transform.")
    try:
        check_rules(**rules._asdict())
    except (TypeError, ValueError) as exc:
        raise RulesFileError(f"{origin}: {exc}") from None
    return rules
