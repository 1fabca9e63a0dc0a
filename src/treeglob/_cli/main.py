"""`treeglob` / `python -m treeglob`: dry-run an optimizer configuration before training.

    treeglob paths SOURCE [--filter PATTERN] [--json]
    treeglob explain SOURCE --rules FILE | --rule LABEL=PATTERN ... | --preset NAME [--summary] [--json]
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
import os
import sys

from .._checkpoints.formats import readable

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="treeglob",
        description="Check parameter-selection rules against a checkpoint or a model before training.",
        epilog="Exit status: 0 fine, 1 the rules do not fit the tree, 2 bad input.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The options several commands take, each defined once: their help reads the same everywhere.
    source = _options()
    source.add_argument("source", metavar="SOURCE", help=f"{readable()}, or module:function")
    listed = _options()
    listed.add_argument("--filter", metavar="PATTERN", help="show only the leaves this pattern selects")
    tree = _options()
    tree.add_argument(
        "--stacked",
        metavar="PATH=AXES",
        action="append",
        default=[],
        help="a subtree with stacked layer axes",
    )
    tree.add_argument(
        "--variables",
        metavar="TYPES",
        default="Param",
        help="for a Flax NNX model: the Variable types to read, comma-separated, or 'all' (default: Param)",
    )
    output = _options()
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")
    output.add_argument("--width", type=int, help="fit tables to this many columns (default: the terminal's)")
    output.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    no_strict = _options()
    no_strict.add_argument("--no-strict", action="store_true", help="allow rules that match nothing")

    commands.add_parser(
        "paths",
        parents=[source, listed, tree, output],
        help="list the array leaves: path, shape, dtype, size",
    )
    ex = commands.add_parser(
        "explain",
        parents=[source, listed, tree, output, no_strict],
        help="which leaf gets which label, and why",
    )
    ex.add_argument("--rules", metavar="FILE", help="a rules file (.toml or .json)")
    ex.add_argument("--key", metavar="KEY", help="the dotted key of the rules table inside FILE")
    ex.add_argument(
        "--rule", metavar="LABEL=PATTERN", action="append", default=[], help="a rule (repeatable)"
    )
    ex.add_argument(
        "--preset",
        metavar="NAME",
        help="append a weight-decay preset's rules: default, nanogpt, timm or hf (treeglob.presets.BY_NAME)",
    )
    ex.add_argument("--default", metavar="LABEL", help="the label of leaves no rule matches")
    ex.add_argument(
        "--summary", action="store_true", help="only the rules' hits and problems and the counts per label"
    )
    ex.add_argument(
        "--expand-presets", action="store_true", help="write out the presets' rules shown by name"
    )

    tr = commands.add_parser(
        "treatment",
        parents=[source, tree, output],
        help="every leaf's learning rate, weight decay, unfreezing and sharding at given steps",
    )
    tr.add_argument("--rules", metavar="FILE", required=True, help="a treatment file (.toml or .json)")
    tr.add_argument("--key", metavar="KEY", help="the dotted key of the treatment table inside FILE")
    tr.add_argument("--steps", metavar="STEPS", default="0", help="comma-separated steps (default: 0)")

    transfer = _options()
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
        "--allow-missing", action="store_true", help="model leaves without a tensor are fine"
    )
    transfer.add_argument("--allow-unused", action="store_true", help="unused checkpoint tensors are fine")
    transfer.add_argument(
        "--cast", action="store_true", help="cast floating tensors to the model's floating dtypes"
    )
    commands.add_parser(
        "load-plan",
        parents=[transfer, no_strict, tree, output],
        help="dry-run loading a checkpoint into a model: what loads, what not",
    )
    cv = commands.add_parser(
        "convert",
        parents=[transfer, no_strict, tree, output],
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


def _options() -> argparse.ArgumentParser:
    """A group of options that several commands share (argparse's `parents=`)."""
    return argparse.ArgumentParser(add_help=False)


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
    # Imported once the command line is read: `--help` and a usage error answer without JAX.
    from .commands import run

    return run(args)
