"""`treeglob` / `python -m treeglob`: dry-run an optimizer configuration before training.

    treeglob paths SOURCE [--filter PATTERN] [--json]
    treeglob explain SOURCE --rules FILE | --rule LABEL=PATTERN ... | --preset NAME [--json]
    treeglob load-plan MODEL CHECKPOINT [--rename FROM=TO ...] [--skip PATTERN ...] [--rules FILE] [--json]
    treeglob convert MODEL CHECKPOINT OUT [load-plan's rules] [--export-rules FILE] [--max-shard-size 5GB]
    treeglob treatment SOURCE --rules FILE [--steps 0,1000,...] [--json]

SOURCE (and MODEL) is a `.safetensors` or `.npz` checkpoint or an orbax
checkpoint directory (metadata only), or a `module:function` /
`file.py:function` model factory (evaluated abstractly); CHECKPOINT is a
checkpoint. `load-plan` dry-runs `treeglob.load` without reading tensor data;
`convert` loads and writes the model again (other names, other shards), with
progress on a terminal when tqdm is installed.
Exit status: 0 fine; 1 the rules do not fit the tree (a rule or the filter
matches nothing, a leaf is left uncovered; for load-plan, a model leaf
without a tensor, an unused tensor, a shape mismatch); 2 bad input (a missing or
unreadable file, a malformed rules file or pattern, a factory that fails or
returns no arrays); 141 the output pipe was closed early (`| head`).
"""

from __future__ import annotations

import argparse
import gc
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

from .._checkpoints.formats import format_for_writing, open_checkpoint, readable
from .._checkpoints.rules import check_rules
from .._checkpoints.sources import load_source
from .._core.table import painter, render_table

__all__ = ["main"]


class _BadInput(Exception):
    """The command line is wrong (exit status 2)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="treeglob",
        description="Check parameter-selection rules against a checkpoint or a model before training.",
        epilog="Exit status: 0 fine, 1 the rules do not fit the tree, 2 bad input.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("source", metavar="SOURCE", help=f"{readable()}, or module:function")
    common.add_argument("--filter", metavar="PATTERN", help="show only the leaves this pattern selects")
    common.add_argument(
        "--stacked",
        metavar="PATH=AXES",
        action="append",
        default=[],
        help="a subtree with stacked layer axes",
    )
    common.add_argument(
        "--variables",
        metavar="TYPES",
        default="Param",
        help="for a Flax NNX model: the Variable types to list, comma-separated, or 'all' (default: Param)",
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    common.add_argument("--width", type=int, help="fit tables to this many columns (default: the terminal's)")
    common.add_argument("--color", choices=("auto", "always", "never"), default="auto")

    commands.add_parser("paths", parents=[common], help="list the array leaves: path, shape, dtype, size")
    ex = commands.add_parser("explain", parents=[common], help="which leaf gets which label, and why")
    ex.add_argument("--rules", metavar="FILE", help="a rules file (.toml or .json)")
    ex.add_argument("--key", metavar="KEY", help="the dotted key of the rules table inside FILE")
    ex.add_argument(
        "--rule", metavar="LABEL=PATTERN", action="append", default=[], help="a rule (repeatable)"
    )
    ex.add_argument(
        "--preset", choices=sorted(tg.presets.BY_NAME), help="append a weight-decay preset's rules"
    )
    ex.add_argument("--default", metavar="LABEL", help="the label of leaves no rule matches")
    ex.add_argument("--no-strict", action="store_true", help="allow rules that match nothing")

    tr = commands.add_parser(
        "treatment", help="every leaf's learning rate, weight decay, unfreezing and sharding at given steps"
    )
    tr.add_argument("source", metavar="SOURCE", help=f"{readable()}, or module:function")
    tr.add_argument("--rules", metavar="FILE", required=True, help="a treatment file (.toml or .json)")
    tr.add_argument("--key", metavar="KEY", help="the dotted key of the treatment table inside FILE")
    tr.add_argument("--steps", metavar="STEPS", default="0", help="comma-separated steps (default: 0)")
    tr.add_argument("--stacked", metavar="PATH=AXES", action="append", default=[], help="stacked layers")
    tr.add_argument(
        "--variables", metavar="TYPES", default="Param", help="for a Flax NNX model (default: Param)"
    )
    tr.add_argument("--json", action="store_true", help="print JSON instead of a table")
    tr.add_argument("--width", type=int, help="fit tables to this many columns (default: the terminal's)")
    tr.add_argument("--color", choices=("auto", "always", "never"), default="auto")

    transfer = argparse.ArgumentParser(add_help=False)
    transfer.add_argument(
        "model", metavar="MODEL", help="module:function (or a checkpoint) giving the model's leaves"
    )
    transfer.add_argument("checkpoint", metavar="CHECKPOINT", help=readable())
    transfer.add_argument(
        "--rename", metavar="FROM=TO", action="append", default=[], help="a rename rule, in order"
    )
    transfer.add_argument(
        "--skip", metavar="PATTERN", action="append", default=[], help="keep these model leaves"
    )
    transfer.add_argument(
        "--ignore", metavar="PATTERN", action="append", default=[], help="leave these tensors out"
    )
    transfer.add_argument(
        "--transform",
        metavar="PATTERN=NAME",
        action="append",
        default=[],
        help="a transform written as data (transpose, split(3, 0, axis=1), a dtype name, ...), "
        "or several applied in order: 'transpose,float32'",
    )
    transfer.add_argument("--rules", metavar="FILE", help="a rules file with skip, ignore, rename, transform")
    transfer.add_argument("--key", metavar="KEY", help="the dotted key of the rules table inside FILE")
    transfer.add_argument(
        "--stacked", metavar="PATH=AXES", action="append", default=[], help="stacked layers"
    )
    transfer.add_argument(
        "--variables", metavar="TYPES", default="Param", help="for a Flax NNX model (default: Param)"
    )
    transfer.add_argument(
        "--allow-missing", action="store_true", help="model leaves without a tensor are fine"
    )
    transfer.add_argument("--allow-unused", action="store_true", help="unused checkpoint tensors are fine")
    transfer.add_argument(
        "--cast", action="store_true", help="cast floating tensors to the model's floating dtypes"
    )
    transfer.add_argument("--no-strict", action="store_true", help="allow rules that match nothing")
    transfer.add_argument("--json", action="store_true", help="print JSON instead of a table")
    transfer.add_argument(
        "--width", type=int, help="fit tables to this many columns (default: the terminal's)"
    )
    transfer.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    commands.add_parser(
        "load-plan",
        parents=[transfer],
        help="dry-run loading a checkpoint into a model: what loads, what not",
    )
    cv = commands.add_parser(
        "convert",
        parents=[transfer],
        help="load a checkpoint into a model by rules and write it out: other names, other shards",
        description="Load CHECKPOINT into MODEL by the rules (as load-plan shows), then write the "
        "model to OUT: in the model's names, or under a checkpoint's names with --export-rules "
        "(the rules that load that checkpoint, undone). The whole model is held in memory. MODEL is "
        "built abstractly, so every leaf must load: --skip and --allow-missing leave no values to keep.",
    )
    cv.add_argument("out", metavar="OUT", help="the .safetensors or .npz file to write")
    cv.add_argument("--export-rules", metavar="FILE", help="write OUT under the names these load rules read")
    cv.add_argument("--export-key", metavar="KEY", help="the dotted key of the rules table inside that FILE")
    cv.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="write Hugging Face shards of at most SIZE each (bytes, or 500MB, 5GB, 4GiB)",
    )
    return parser


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
        rules += tg.presets.BY_NAME[args.preset]
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
        print(report.format(width=width, color=color))
        return {}
    # The leaves as columns, as the report holds them: no dict per leaf.
    return {
        **report.to_dict(rows=[]),
        "leaves": _Columns([f.name for f in fields(tg.LeafRow)], report.columns),
    }


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


def main(argv: list[str] | None = None) -> int:
    # One short run that allocates a few objects per tensor and no cycles: the
    # cyclic collector would only walk JAX's own objects again and again (a
    # third of the time of `explain` on a 12k-tensor checkpoint).
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`treeglob ... | head`): stop quietly, as a
        # process killed by SIGPIPE would, without a traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        if was_enabled:
            gc.enable()


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
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
