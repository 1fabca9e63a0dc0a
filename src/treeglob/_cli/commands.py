"""The command line's commands, on arguments `main._parser` has read."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from typing import Any, NamedTuple

import treeglob as tg

from .._checkpoints.formats import format_for_writing, open_checkpoint
from .._checkpoints.rules import check_rules
from .._checkpoints.sources import load_source
from .._core.table import painter, render_table

__all__ = ["run"]


class _BadInput(Exception):
    """The command line is wrong (exit status 2)."""


def _stacked(items: list[str]) -> dict[str, int] | None:
    out = {}
    for item in items:
        path, sep, axes = item.rpartition("=")
        if not sep or not path or not axes.isdecimal() or int(axes) < 1:
            raise _BadInput(f"--stacked {item!r}: write PATH=AXES, e.g. --stacked blocks=1.")
        out[path] = int(axes)
    return out or None


def _declared(by_model: dict[str, int] | None, by_user: dict[str, int] | None) -> dict[str, int] | None:
    """The stacked layers a model declares (a penzai LayerStack), then those --stacked names."""
    return {**(by_model or {}), **(by_user or {})} or None


def _rules(args: argparse.Namespace) -> tg.RuleConfig:
    rules: list[tuple[Any, Any]] = []
    for item in args.rule:
        label, sep, pattern = item.partition("=")
        if not sep or not label or not pattern:
            raise _BadInput(f"--rule {item!r}: write LABEL=PATTERN, e.g. --rule 'no_decay=*.bias'.")
        rules.append((tg.any_of(pattern), label))
    if args.key and not args.rules:
        raise _BadInput("--key needs --rules FILE.")
    config = tg.load_rules(args.rules, key=args.key) if args.rules else tg.RuleConfig([])
    rules += config.rules
    if args.preset:
        preset = tg.presets.BY_NAME.get(args.preset)
        if preset is None:
            raise _BadInput(f"--preset {args.preset!r}: the presets are {', '.join(tg.presets.BY_NAME)}.")
        rules += preset
    if not rules:
        raise _BadInput("explain needs rules: --rules FILE, --rule LABEL=PATTERN or --preset NAME.")
    return tg.RuleConfig(rules, config.default if args.default is None else args.default)


def _check(
    args: argparse.Namespace,
    stacked: Any,
    config: tg.RuleConfig | None,
    selector: tg.Selector | None,
    tree: Any,
    width: int | None,
    color: bool,
) -> dict[str, Any]:
    """The rules against the tree: errors here mean they do not fit (status 1). `paths` is
    the report of no rules: every leaf with its shape, dtype and size."""
    rules, default = ([], "") if config is None else config
    strict = not getattr(args, "no_strict", False)  # `paths` has no rules to be strict about
    report = tg.explain(tree, rules, default=default, strict=strict, stacked=stacked)
    if selector is not None:
        report = report.filter(selector)
    if config is None:
        result = _paths(report)
        if not args.json:
            _print_paths(result, width, color)
        return result
    if not args.json:
        print(report.format(width=width, color=color, leaves=not args.summary, expand=args.expand_presets))
        return {}
    data = report.to_dict(rows=[])
    if args.expand_presets:
        for rule in data["rules"]:
            rule["selector"] = rule["expanded"] or rule["selector"]
    if args.summary:
        del data["leaves"]
    else:  # the leaves as columns, as the report holds them: no dict per leaf (in its place, first)
        data["leaves"] = _Columns([f.name for f in fields(tg.LeafRow)], report.columns)
    return data


def _paths(report: tg.Explanation) -> dict[str, Any]:
    path, shape, dtype, size = report.columns[:4]
    rows = [
        {"path": p, "shape": list(s), "dtype": d, "size": n}
        for p, s, d, n in zip(path, shape, dtype, size, strict=True)
        if s is not None
    ]
    return {"leaves": rows, "count": len(rows), "elements": sum(r["size"] for r in rows)}


def _print_paths(result: dict[str, Any], width: int | None, color: bool) -> None:
    table = [("path", "shape", "dtype", "size")]
    table += [(r["path"], str(tuple(r["shape"])), r["dtype"], f"{r['size']:,}") for r in result["leaves"]]
    print("\n".join(render_table(table, right={3}, long=0, width=width, paint=painter(color))))
    print(f"\n{result['count']} array leaves, {result['elements']:,} elements")


def _read_inputs(args: argparse.Namespace) -> tuple[Any, tg.RuleConfig | None, tg.Selector | None, Any]:
    """Everything the command line names: errors here are bad input (status 2)."""
    stacked = _stacked(args.stacked)
    config = _rules(args) if args.command == "explain" else None
    # A malformed pattern is caught before the source is read.
    selector = None if args.filter is None else tg.any_of(args.filter)
    source = load_source(args.source, args.variables)
    return _declared(source.stacked, stacked), config, selector, source.tree


def _outside_parentheses(text: str, char: str) -> list[int]:
    """Where `char` stands in `text` outside parentheses: a pattern may hold "=" ("re:(?=...)"),
    and so may a transform's arguments ("split(3, 0, axis=1)"), which also hold commas."""
    found, depth = [], 0
    for i, c in enumerate(text):
        depth += (c == "(") - (c == ")")
        if c == char and depth == 0:
            found.append(i)
    return found


def _pairs(items: list[str], option: str, example: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        cut = max(_outside_parentheses(item, "="), default=-1)  # the last "=" outside parentheses
        pattern, value = item[: max(cut, 0)], item[cut + 1 :]
        if cut < 0 or not pattern or not value:
            raise _BadInput(f"{option} {item!r}: write {example}.")
        out.append((pattern, value))
    return out


def _in_order(text: str) -> str | tuple[str, ...]:
    """`transpose,float32`: transforms applied in order, split at the commas outside
    parentheses (`split(3, 0, axis=1)` is one)."""
    bounds = [-1, *_outside_parentheses(text, ","), len(text)]
    parts = [text[a + 1 : b].strip() for a, b in zip(bounds, bounds[1:], strict=False)]
    return parts[0] if len(parts) == 1 else tuple(parts)


def _transfer_rules(args: argparse.Namespace) -> tg.TransferRules:
    """The load-plan rules: the command line's, then the file's; checked before anything is read."""
    rename = _pairs(args.rename, "--rename", "FROM=TO, e.g. --rename 'h.{i}=blocks.{i}'")
    transform = _pairs(
        args.transform, "--transform", "PATTERN=NAME, e.g. --transform '*.c_fc.weight=transpose'"
    )
    transform = [(p, _in_order(n)) for p, n in transform]
    rules = tg.TransferRules(rename, list(args.skip), list(args.ignore), transform)
    if args.rules:
        data = tg.load_transfer(args.rules, key=args.key)
        rules = tg.TransferRules(
            *(list(mine) + list(theirs) for mine, theirs in zip(rules, data, strict=True))
        )
    elif args.key:
        raise _BadInput("--key needs --rules FILE.")
    check_rules(**rules._asdict())
    return rules


class _Transfer(NamedTuple):
    """What load-plan and convert read from the command line: the model, the checkpoint and
    the arguments of `tg.load`."""

    model: Any
    checkpoint: Any
    options: dict[str, Any]


def _transfer(args: argparse.Namespace) -> _Transfer:
    rules = _transfer_rules(args)
    source = load_source(args.model, args.variables)
    checkpoint = open_checkpoint(args.checkpoint)
    options = dict(
        **rules._asdict(),
        # Only what --stacked names: a transfer moves whole tensors unless asked to split
        # them by layer, whatever the model declares (tg.load_plan does the same).
        stacked=_stacked(args.stacked),
        strict=not args.no_strict,
        allow_missing=args.allow_missing,
        allow_unused=args.allow_unused,
        cast=args.cast,
    )
    return _Transfer(source.tree, checkpoint, options)


def _size(text: str | None) -> int | None:
    """`--max-shard-size`: bytes, or a number with kB, MB, GB, TB (powers of 1000, as Hugging
    Face writes them) or KiB, MiB, GiB, TiB."""
    if text is None:
        return None
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", text, re.IGNORECASE)
    size = 0
    if found is not None:
        unit = (1024 if found[3] else 1000) ** " kmgt".index(found[2].lower() or " ")
        size = int(float(found[1]) * unit)
    if size <= 0:
        raise _BadInput(f"--max-shard-size {text!r}: write a size such as 5GB, 500MB or 1000000.")
    return size


def _load_plan(args: argparse.Namespace, width: int | None) -> int:
    try:
        transfer = _transfer(args)
    except (_BadInput, ValueError, TypeError) as exc:
        return _fail(args, 2, type(exc).__name__, str(exc))
    try:
        report = tg.load_plan(transfer.model, transfer.checkpoint, **transfer.options)
    except (ValueError, TypeError) as exc:
        return _fail(args, 1, type(exc).__name__, str(exc))
    if args.json:
        print(
            json.dumps(
                {"source": args.checkpoint, "model": args.model, **report.to_dict()}, default=str, indent=1
            )
        )
    else:
        print(report.format(width=width))
    try:
        report.check("load_plan")
    except ValueError as exc:
        if not args.json:
            print(f"\ntreeglob load-plan: {exc}", file=sys.stderr)
        return 1
    return 0


def _convert(args: argparse.Namespace) -> int:
    try:
        transfer = _transfer(args)
        shard = _size(args.max_shard_size)
        # What only the write would find, found before anything is loaded.
        out = pathlib.Path(args.out)
        if format_for_writing(out, "convert").name != "safetensors" and shard is not None:
            raise _BadInput(f"--max-shard-size writes .safetensors shards; {args.out} is not one.")
        if not out.parent.is_dir():
            raise _BadInput(f"{args.out}: the directory {str(out.parent)!r} does not exist.")
        if args.export_key and not args.export_rules:
            raise _BadInput("--export-key needs --export-rules FILE.")
        export = tg.load_transfer(args.export_rules, key=args.export_key) if args.export_rules else None
    except (_BadInput, ValueError, TypeError) as exc:
        return _fail(args, 2, type(exc).__name__, str(exc))
    show = importlib.util.find_spec("tqdm") is not None  # a bar on a terminal, for anything large
    try:
        model, report = tg.load(transfer.model, transfer.checkpoint, **transfer.options, progress=show)
        names = tg.save(
            args.out,
            model,
            stacked=transfer.options["stacked"],
            strict=transfer.options["strict"],
            max_shard_size=shard,
            progress=show,
            **(export._asdict() if export else {}),
        )
    except (ValueError, TypeError, OSError) as exc:
        return _fail(args, 1, type(exc).__name__, str(exc))
    if args.json:
        print(_json({"source": args.checkpoint, "out": args.out, "counts": report.counts, "written": names}))
    else:
        print(report.summary())
        print(f"\nwrote {len(names)} tensors to {args.out}")
    return 0


def _steps(text: str) -> list[int]:
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdecimal() for part in parts):
        raise _BadInput(f"--steps {text!r}: write steps from 0, comma-separated, e.g. --steps 0,1000,5000.")
    return [int(part) for part in parts]


def _treatment(args: argparse.Namespace, width: int | None, color: bool) -> int:
    try:
        treatment = tg.load_treatment(args.rules, key=args.key)
        steps = _steps(args.steps)
        source = load_source(args.source, args.variables)
        # The model's own declaration, then the file's, then the command line's.
        stacked = _declared(_declared(source.stacked, treatment.stacked), _stacked(args.stacked))
        treatment = replace(treatment, stacked=stacked)
    except (_BadInput, ValueError, TypeError) as exc:
        return _fail(args, 2, type(exc).__name__, str(exc))
    try:
        table = treatment.table(source.tree, steps)
    except (ValueError, TypeError) as exc:
        return _fail(args, 1, type(exc).__name__, str(exc))
    if args.json:
        print(_json({"source": args.source, **table.to_dict()}))
    else:
        print(table.format(width=width, color=color))
    return 0


class _Columns(NamedTuple):
    """Records (a report's leaves) as one list per field."""

    names: list[str]
    columns: Sequence[list[Any]]


def _json(data: dict[str, Any]) -> str:
    """`data` as JSON, one line per key and per item of a list (a leaf, a rule).

    `json.dumps(indent=...)` runs the pure-Python encoder, five times slower
    than the C one for a checkpoint of 12k tensors; one line per leaf keeps
    the C encoder, and reads (and greps) better.
    """
    encode = json.JSONEncoder(default=str).encode
    lines = []
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            if all(item.keys() == value[0].keys() for item in value):  # records: as columns
                value = _Columns(list(value[0]), [[item[name] for item in value] for name in value[0]])
        if isinstance(value, _Columns):
            items = ",\n".join(_records(value, encode))
            lines.append(f" {encode(key)}: [\n{items}\n ]" if items else f" {encode(key)}: []")
        else:
            lines.append(f" {encode(key)}: {encode(value)}")
    return "{\n" + ",\n".join(lines) + "\n}"


def _records(records: _Columns, encode: Callable[[Any], str]) -> list[str]:
    """Each record as a JSON object on one line, encoded column by column and each distinct
    value once: the leaves of a report repeat a few shapes, dtypes, labels and (long) selectors."""
    columns = []
    for name, values in zip(records.names, records.columns, strict=True):
        prefix, done, texts = f"{encode(name)}: ", {}, []
        for value in values:
            # Only types whose equal values encode alike (not 0.0 and -0.0); 1 and True kept apart.
            if type(value) not in _SAME_TEXT:
                texts.append(prefix + encode(value))
                continue
            text = done.get((type(value), value))
            if text is None:
                text = done[(type(value), value)] = prefix + encode(value)
            texts.append(text)
        columns.append(texts)
    return ["  {" + ", ".join(cells) + "}" for cells in zip(*columns, strict=True)]


_SAME_TEXT = {str, int, bool, type(None), tuple}


def _fail(args: argparse.Namespace, status: int, kind: str, message: str) -> int:
    if args.json:
        source = getattr(args, "source", None) or args.checkpoint
        print(json.dumps({"source": source, "error": {"kind": kind, "message": message}}, indent=1))
    else:
        print(f"treeglob {args.command}: {message}", file=sys.stderr)
    return status


def run(args: argparse.Namespace) -> int:
    """Carry out the command `args` names; the exit status."""
    tty = sys.stdout.isatty()
    width = args.width or (shutil.get_terminal_size().columns if tty else None)
    color = args.color == "always" or (args.color == "auto" and tty and "NO_COLOR" not in os.environ)
    if args.command == "load-plan":
        return _load_plan(args, width)
    if args.command == "convert":
        return _convert(args)
    if args.command == "treatment":
        return _treatment(args, width, color)
    try:
        inputs = _read_inputs(args)
    except (_BadInput, ValueError, TypeError) as exc:
        return _fail(args, 2, type(exc).__name__, str(exc))
    try:
        result = _check(args, *inputs, width, color)
    except (ValueError, TypeError) as exc:
        return _fail(args, 1, type(exc).__name__, str(exc))
    if args.json:
        print(_json({"source": args.source, **result}))
    return 0
