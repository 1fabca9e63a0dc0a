"""treeglob benchmarks: selection against the cost of flattening, its peers, and the compiled step.

    python benchmarks/run.py            # the full run (several minutes)
    python benchmarks/run.py --quick    # a tiny configuration, to check that it works

Every figure is a median of several repetitions, measured side by side in
one process, and reported as a ratio to a baseline measured the same way:
the machine is shared and noisy, so absolute times vary and ratios are what
to compare. Contenders are interleaved (each repetition runs every contender
once, in turn), all in the same garbage-collector state: collected once
before, paused throughout (as `timeit` pauses it). So each figure is the
contender's own work, none pays for a collection another one's garbage
triggered (nor for the cold caches a full collection before each call
leaves), and treeglob's own pause of the collector changes nothing.

Trees are GPT-shaped Equinox models (embedding, position table, a list of
Transformer blocks, final norm, head) built abstractly with
`eqx.filter_eval_shape`; the deep ones repeat one abstract block, which
flattens exactly like distinct blocks. The NNX models clone one abstract
block. Peers (`benchmarks/peers.py`; penzai and Flax NNX with
`pip install treeglob[bench]`, skipped without) are asserted to select
exactly what treeglob selects before they are timed.

"cold" figures, the import and the command line run in fresh processes;
Python's bytecode caches are written by a first, untimed import (as an
installed package has them).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
import peers  # noqa: E402
from lora_finetune import add_adapters, make_step, split  # noqa: E402
from train_gpt import GPT  # noqa: E402

import treeglob as tg  # noqa: E402
from treeglob._core import pattern as _pattern  # noqa: E402

LEAVES_PER_BLOCK, OTHER_LEAVES = 16, 6
DEFAULT = "other"


def rules() -> list[tuple[Any, str]]:
    """A realistic rule set: globs, a type condition, an integer range, an ndim condition."""
    return [
        (tg.any_of("*.bias", eqx.nn.LayerNorm), "no_decay"),
        ("{embed,pos_embed}", "frozen"),
        ("blocks.{0..3}", "early"),
        ("*.attn.{query,key,value}_proj.weight", "attn"),
        ("head", "head"),
        (tg.ndim >= 2, "decay"),
    ]


RULES = rules()


def gpt(leaves: int, dim: int = 64) -> Any:
    """Abstract params of a GPT with about `leaves` leaves."""
    depth = max(1, round((leaves - OTHER_LEAVES) / LEAVES_PER_BLOCK))
    one = eqx.filter_eval_shape(
        lambda: GPT(vocab=100, dim=dim, depth=1, heads=4, context=64, key=jax.random.key(0))
    )
    model = eqx.tree_at(lambda m: m.blocks, one, [one.blocks[0]] * depth)
    return eqx.filter(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))


def timed(contenders: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Median seconds per contender, interleaved, with the collector collected once before
    and paused throughout (see the module docstring)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeat):
            for name, fn in contenders.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return {name: statistics.median(t) for name, t in times.items()}


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.2f}" if seconds < 0.01 else f"{1e3 * seconds:.1f}"


def table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print(
            "  ".join(
                str(c).rjust(w) if i else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    print()


def fresh_python(code: str) -> dict[str, Any]:
    """Run `code` in a fresh interpreter (bytecode caches allowed) and read the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=HERE, timeout=600
    )
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------
# Baselines written here


def expand_braces(pattern: str) -> list[str]:
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    end = pattern.index("}", start)
    body = pattern[start + 1 : end]
    if ".." in body:
        lo, hi = map(int, body.split(".."))
        options = [str(i) for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    return [x for o in options for x in expand_braces(pattern[:start] + o + pattern[end + 1 :])]


def naive_labels(params: Any) -> Any:
    """fnmatch over `keystr` paths, one leaf and one rule at a time; types from an isinstance flatten."""
    flat, treedef = jtu.tree_flatten_with_path(params)
    paths = [jtu.keystr(kp, simple=True, separator=".") for kp, _ in flat]
    in_norm = []
    for item in jtu.tree_leaves(params, is_leaf=lambda x: isinstance(x, eqx.nn.LayerNorm)):
        n = jtu.tree_structure(item).num_leaves if isinstance(item, eqx.nn.LayerNorm) else 1
        in_norm += [isinstance(item, eqx.nn.LayerNorm)] * n
    globs = {
        "frozen": [g for p in expand_braces("{embed,pos_embed}") for g in (p, p + ".*")],
        "early": [g for p in expand_braces("blocks.{0..3}") for g in (p + ".*",)],
        "attn": [g for p in expand_braces("*.attn.{query,key,value}_proj.weight") for g in (p, p + ".*")],
        "head": ["head", "head.*"],
    }
    out = []
    for path, (_, leaf), norm in zip(paths, flat, in_norm, strict=True):
        if norm or fnmatch.fnmatchcase(path, "*.bias") or fnmatch.fnmatchcase(path, "*.bias.*"):
            out.append("no_decay")
            continue
        for label, patterns in globs.items():
            if any(fnmatch.fnmatchcase(path, g) for g in patterns):
                out.append(label)
                break
        else:
            out.append("decay" if len(leaf.shape) >= 2 else DEFAULT)
    return jtu.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------
# Sections


# The first call in a fresh process, treeglob's (patterns compiled, structure built)
# and the floor's, each in its own process and in the same collector state as the rest.
COLD = """
import gc, json, time, jax.tree_util as jtu
import run, treeglob as tg
from treeglob._core import pattern as _pattern
params = run.gpt({size})
_pattern.compile_glob.cache_clear()  # the rules' patterns compile in the timed call
gc.collect()
gc.disable()
start = time.perf_counter()
if {ours}:
    tg.labels(params, run.rules(), default=run.DEFAULT)
else:
    leaves, treedef = jtu.tree_flatten(params)
    jtu.tree_unflatten(treedef, ["label"] * len(leaves))
print(json.dumps({{"first": time.perf_counter() - start}}))
"""


def first_calls(size: int, repeat: int) -> tuple[float, float]:
    """Median first-call seconds of labels and of the floor, fresh processes interleaved."""
    runs: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeat):
        for ours in runs:
            runs[ours].append(fresh_python(COLD.format(size=size, ours=ours))["first"])
    return statistics.median(runs[True]), statistics.median(runs[False])


def measure_selection(size: int, repeat: int, cold: int) -> dict[str, float]:
    params = gpt(size)
    ours = tg.labels(params, RULES, default=DEFAULT)
    assert naive_labels(params) == ours, "naive baseline disagrees"
    assert peers.seed_mask(params) == tg.mask(params, peers.SEED_SELECTOR), "seed baseline disagrees"
    values = jax.tree.leaves(ours)

    def flatten_unflatten() -> Any:
        leaves, treedef = jtu.tree_flatten(params)
        return jtu.tree_unflatten(treedef, values)

    r = timed(
        {
            "floor": flatten_unflatten,
            "flatten": lambda: jtu.tree_flatten_with_path(params),
            "warm": lambda: tg.labels(params, RULES, default=DEFAULT),
            "naive": lambda: naive_labels(params),
            "seed": lambda: peers.seed_mask(params),
            "ours_seed": lambda: tg.mask(params, peers.SEED_SELECTOR),
        },
        repeat,
    )
    first, first_floor = first_calls(size, cold) if cold else (float("nan"), float("nan"))
    return dict(r, leaves=len(values), cold=first, cold_floor=first_floor)


def selection(
    sizes: list[int], repeat: int, cold_sizes: list[int], cold_repeat: int
) -> dict[int, dict[str, float]]:
    print(
        "## Label building (ms, median; ratios to tree_flatten + tree_unflatten of the result,\n"
        "## what any mask producer pays; cold: first calls, each in a fresh process, patterns compiled)\n"
    )
    results, rows = {}, []
    for size in sizes:
        r = measure_selection(size, repeat, cold_repeat if size in cold_sizes else 0)
        results[r["leaves"]] = r
        floor = r["floor"]
        rows.append(
            [
                f"{r['leaves']:,}",
                ms(floor),
                f"{ms(r['flatten'])} ({r['flatten'] / floor:.2f}x)",
                f"{ms(r['warm'])} ({r['warm'] / floor:.2f}x)",
                f"{ms(r['cold'])} ({r['cold'] / r['cold_floor']:.2f}x)"
                if cold_sizes and size in cold_sizes
                else "-",
                f"{ms(r['naive'])} ({r['naive'] / r['warm']:.1f}x)",
                f"{ms(r['seed'])} ({r['seed'] / r['ours_seed']:.1f}x)",
            ]
        )
    table(
        [
            "leaves",
            "flatten+unflatten",
            "flatten_with_path",
            "labels warm",
            "labels cold",
            "naive fnmatch (x labels)",
            "seed isinstance (x treeglob's)",
        ],
        rows,
    )
    return results


def memory(size: int) -> float:
    params = gpt(size)
    n = len(jax.tree.leaves(params))
    tg.labels(params, RULES, default=DEFAULT)  # warm: patterns and structure cached
    peaks = {}
    for name, fn in [
        ("tree_flatten_with_path", lambda: jtu.tree_flatten_with_path(params)),
        ("labels", lambda: tg.labels(params, RULES, default=DEFAULT)),
    ]:
        gc.collect()
        tracemalloc.start()
        fn()
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print(f"## Peak extra memory, {n:,} leaves (tracemalloc)\n")
    table(["call", "peak MiB"], [[k, f"{v / 2**20:.1f}"] for k, v in peaks.items()])
    return peaks["labels"] / peaks["tree_flatten_with_path"]


def report(sizes: list[int], repeat: int) -> dict[int, dict[str, float]]:
    print("## The report and presets (ms, median; ratios to labels with the same rules)\n")
    results, rows = {}, []
    one_glob = [("*.bias", "no_decay")]
    for size in sizes:
        params = gpt(size)
        r = timed(
            {
                "labels": lambda: tg.labels(params, RULES, default=DEFAULT),  # noqa: B023
                "explain": lambda: tg.explain(params, RULES, default=DEFAULT),  # noqa: B023
                "rows": lambda: tg.explain(params, RULES, default=DEFAULT).rows,  # noqa: B023
                "text": lambda: str(tg.explain(params, RULES, default=DEFAULT)),  # noqa: B023
                "data": lambda: tg.explain(params, RULES, default=DEFAULT).to_dict(),  # noqa: B023
                "one_glob": lambda: tg.labels(params, one_glob, default="decay"),  # noqa: B023
                "preset": lambda: tg.labels(params, tg.presets.DEFAULT),  # noqa: B023
            },
            repeat,
        )
        results[size] = r
        rows.append(
            [f"{len(jax.tree.leaves(params)):,}", ms(r["labels"])]
            + [f"{ms(r[k])} ({r[k] / r['labels']:.2f}x)" for k in ("explain", "rows", "text", "data")]
            + [ms(r["one_glob"]), f"{ms(r['preset'])} ({r['preset'] / r['one_glob']:.2f}x)"]
        )
    table(
        [
            "leaves",
            "labels",
            "explain",
            "+ .rows",
            "+ str()",
            "+ to_dict()",
            "one glob",
            "presets.DEFAULT (x one glob)",
        ],
        rows,
    )
    return results


def peer_table(sizes: list[int], repeat: int) -> dict[tuple[str, int], float]:
    print("## Peers: the same selection written without treeglob (ms, median; checked equal first)\n")
    ratios, rows = {}, []
    for size in sizes:
        candidates = peers.equinox_peers(gpt(size))
        try:
            candidates += peers.nnx_peers(peers.nnx_gpt(size))
        except ImportError:
            pass
        for p in candidates:
            assert p.selected(p.peer()) == p.ours_selected(p.ours()), f"{p.name} disagrees with treeglob"
            r = timed({"peer": p.peer, "ours": p.ours}, repeat)
            ratios[(p.name, size)] = r["peer"] / r["ours"]
            rows.append(
                [p.task, f"{size:,}", p.name, ms(r["peer"]), ms(r["ours"]), f"{r['peer'] / r['ours']:.2f}x"]
            )
    if not any("penzai" in r[2] for r in rows) or not any("nnx" in r[2] for r in rows):
        print("(penzai or Flax NNX missing: pip install treeglob[bench])\n")
    table(["task", "leaves", "peer", "peer ms", "treeglob ms", "peer / treeglob"], rows)
    return ratios


def eager_step(size: int, repeat: int) -> dict[str, float]:
    """One optimizer update outside jit, as in a debugging session or a plain Python loop."""
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), gpt(size, dim=16))
    grads = jax.tree.map(jnp.ones_like, params)
    selector = tg.ndim >= 2
    mask = tg.mask(params, selector)
    label_rules = [(tg.ndim >= 2, "decay")]
    label_tree = tg.labels(params, label_rules, default="other")
    transforms = {"decay": optax.scale(-1e-3), "other": optax.scale(-1e-4)}
    contenders = {
        "optax.masked, precomputed mask": optax.masked(optax.scale(-1e-3), mask),
        "tg.masked": tg.masked(optax.scale(-1e-3), selector),
        "optax.partition, precomputed labels": optax.partition(transforms, lambda _: label_tree),
        "tg.multi_transform": tg.multi_transform(transforms, label_rules, default="other"),
    }
    updates = {}
    for name, tx in contenders.items():
        state = tx.init(params)
        updates[name] = lambda tx=tx, state=state: jax.block_until_ready(tx.update(grads, state, params)[0])
    for ref, ours in [
        ("optax.masked, precomputed mask", "tg.masked"),
        ("optax.partition, precomputed labels", "tg.multi_transform"),
    ]:
        assert jax.tree.all(jax.tree.map(jnp.array_equal, updates[ref](), updates[ours]())), (
            f"{ours} disagrees"
        )
    r = timed(updates, repeat)
    print(f"## Eager optimizer update outside jit, {len(jax.tree.leaves(params)):,} leaves (ms per update)\n")
    rows = [[name, ms(r[name])] for name in contenders]
    table(["transformation", "ms per update"], rows)
    return r


IMPORT = """
import json, time
start = time.perf_counter()
import jax, equinox, optax
base = time.perf_counter()
import treeglob
ours = time.perf_counter()
for name in treeglob.__all__:
    getattr(treeglob, name)
every = time.perf_counter()
print(json.dumps({"base": base - start, "import": ours - base, "every": every - ours}))
"""


def imports(repeat: int, warm_up: bool = True) -> dict[str, float]:
    if warm_up:
        fresh_python(IMPORT)  # writes the bytecode caches
    runs = [fresh_python(IMPORT) for _ in range(repeat)]
    r = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    print("## Import, fresh processes (ms, median)\n")
    table(
        ["import jax, equinox, optax", "then import treeglob", "then every public name"],
        [[ms(r["base"]), f"+{ms(r['import'])}", f"+{ms(r['every'])}"]],
    )
    return r


# The command's time starts once its dependencies are imported (`import treeglob`
# itself leaves equinox, which presets and model factories need, to the command).
CLI = """
import contextlib, io, json, sys, time
start = time.perf_counter()
import jax, equinox, optax, treeglob
imported = time.perf_counter()
from treeglob._cli.main import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    status = main({argv!r})
done = time.perf_counter()
assert status == 0, out.getvalue()[-2000:]
print(json.dumps({{"import": imported - start, "run": done - imported, "bytes": len(out.getvalue())}}))
"""


def write_header(path: pathlib.Path, params: Any) -> None:
    """A .safetensors file of `params`' names and shapes; its data is a hole (the CLI reads headers)."""
    header, offset = {}, 0
    for name, leaf in zip(tg.paths(params), jax.tree.leaves(params), strict=True):
        size = 4 * int(jnp.prod(jnp.array(leaf.shape)))
        header[name] = {"dtype": "F32", "shape": list(leaf.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + offset)


def command_line(size: int, repeat: int, warm_up: bool = True) -> dict[str, tuple[int, float]]:
    params = gpt(size)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "model.safetensors"
        write_header(path, params)
        out, rows = {}, []
        for name, argv in [
            ("explain --preset default", ["explain", str(path), "--preset", "default"]),
            ("explain --preset default --json", ["explain", str(path), "--preset", "default", "--json"]),
        ]:
            if warm_up:
                fresh_python(CLI.format(argv=argv))  # writes the bytecode caches
            runs = [fresh_python(CLI.format(argv=argv)) for _ in range(repeat)]
            run = statistics.median(r["run"] for r in runs)
            out[name] = (len(jax.tree.leaves(params)), run)
            rows.append(
                [name, ms(statistics.median(r["import"] for r in runs)), ms(run), f"{runs[0]['bytes']:,}"]
            )
    print(f"## Command line on a {len(jax.tree.leaves(params)):,}-tensor .safetensors header (ms, median)\n")
    table(["command", "import jax, equinox, optax, treeglob", "then the command", "output bytes"], rows)
    return out


def command_help(repeat: int) -> dict[str, float]:
    """Wall time of the installed `treeglob` script's help, beside a bare interpreter's start."""
    script = shutil.which("treeglob", path=str(pathlib.Path(sys.executable).parent))
    if script is None:
        raise RuntimeError(f"no treeglob script beside {sys.executable}: install the project first.")
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "treeglob --help": [script, "--help"],
        "treeglob explain --help": [script, "explain", "--help"],
        "treeglob load-plan --help": [script, "load-plan", "--help"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeat + 1):  # the first round writes the bytecode caches, and is dropped
        for name, argv in commands.items():  # side by side, round after round
            start = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True, timeout=60)
            times[name].append(time.perf_counter() - start)
    r = {name: statistics.median(t[1:]) for name, t in times.items()}
    print("## Command-line help, fresh processes (ms, median; JAX is not imported)\n")
    table(["command", "wall time"], [[name, ms(seconds)] for name, seconds in r.items()])
    return r


def compiled_step(repeat: int) -> bool:
    params = eqx.filter(
        GPT(vocab=100, dim=64, depth=2, heads=4, context=64, key=jax.random.key(0)), eqx.is_array
    )
    grads = jax.tree.map(jnp.ones_like, params)
    hand = jax.tree.map(lambda p: p.ndim >= 2, params)
    labels = jax.tree.map(lambda p: "decay" if p.ndim >= 2 else "other", params)
    transforms = {"decay": optax.adamw(1e-3, weight_decay=0.1), "other": optax.adam(1e-3)}
    pairs = {
        "decay_mask": (
            optax.adamw(1e-3, weight_decay=0.1, mask=hand),
            optax.adamw(1e-3, weight_decay=0.1, mask=tg.decay_mask(tg.presets.NANOGPT)),
        ),
        "masked": (optax.masked(optax.adam(1e-3), hand), tg.masked(optax.adam(1e-3), tg.ndim >= 2)),
        "multi_transform": (
            optax.partition(transforms, lambda _: labels),
            tg.multi_transform(transforms, [(tg.ndim >= 2, "decay")], default="other"),
        ),
    }
    same = {}
    for name, (ref, ours) in pairs.items():
        state = ref.init(params)
        same[name] = str(jax.make_jaxpr(ours.update)(grads, state, params)) == str(
            jax.make_jaxpr(ref.update)(grads, state, params)
        )
    ref, ours = pairs["decay_mask"]
    state = ref.init(params)
    steps = {}
    for name, tx in [("hand-written mask", ref), ("treeglob decay_mask", ours)]:
        update = jax.jit(tx.update)
        jax.block_until_ready(update(grads, state, params))
        steps[name] = lambda update=update: jax.block_until_ready(update(grads, state, params))
    r = timed(steps, repeat * 10)
    print("## Compiled step (AdamW update, 2-block GPT)\n")
    for name, ok in same.items():
        print(f"jaxpr of {name} identical to the hand-written one: {ok}")
    print()
    table(["mask", "step us"], [[k, f"{1e6 * v:.0f}"] for k, v in r.items()])
    return all(same.values())


def freezing(dim: int, depth: int, repeat: int) -> dict[str, dict[str, float]]:
    """LoRA fine-tuning steps of `examples/lora_finetune.py`, three ways: everything trained,
    frozen on the optimizer side (`tg.freeze`: every gradient computed, the frozen ones
    dropped), frozen on the gradient side (`tg.partition`: only the adapters differentiated).
    Memory is XLA's own account of the compiled step (arguments, outputs and scratch, less
    what outputs reuse of the arguments), the same on every machine; time a median step."""
    model = GPT(vocab=100, dim=dim, depth=depth, heads=4, context=64, key=jax.random.key(0))
    lora = add_adapters(model, rank=8, key=jax.random.key(1))
    x = jax.random.randint(jax.random.key(2), (16, 64), 0, 100)
    out: dict[str, dict[str, float]] = {}
    steps = {}
    for mode in ("full", "optimizer", "gradient"):
        trainable, frozen, static, optimizer = split(lora, mode)
        step = make_step(static, optimizer)
        state = optimizer.init(trainable)
        stats = step.lower(trainable, frozen, state, x, x).compile().memory_analysis()
        total = (
            stats.argument_size_in_bytes
            + stats.output_size_in_bytes
            + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes
        )
        out[mode] = {"total": total, "temp": stats.temp_size_in_bytes, "state": _nbytes(state)}
        jax.block_until_ready(step(trainable, frozen, state, x, x))
        steps[mode] = lambda step=step, a=(trainable, frozen, state, x, x): jax.block_until_ready(step(*a))
    for mode, seconds in timed(steps, repeat).items():
        out[mode]["step"] = seconds
    print(
        f"## Freezing: a LoRA fine-tuning step ({depth}-block GPT, width {dim}, rank-8 adapters on attn.{{q,v}})\n"
    )
    names = {
        "full": "full fine-tuning",
        "optimizer": "optimizer side (tg.freeze)",
        "gradient": "gradient side (tg.partition)",
    }
    full = out["full"]
    table(
        [
            "training",
            "compiled step MB",
            "of which scratch MB",
            "optimizer state MB",
            "step ms",
            "time vs full",
        ],
        [
            [
                names[mode],
                f"{r['total'] / 1e6:.1f}",
                f"{r['temp'] / 1e6:.1f}",
                f"{r['state'] / 1e6:.2f}",
                f"{1e3 * r['step']:.1f}",
                f"{r['step'] / full['step']:.2f}",
            ]
            for mode, r in out.items()
        ],
    )
    weights = _nbytes(eqx.filter(lora, eqx.is_array))
    saved = out["optimizer"]["total"] - out["gradient"]["total"]
    print(
        f"gradient side vs optimizer side: {saved / 1e6:.1f} MB less (the weights: {weights / 1e6:.1f} MB); "
        f"scratch {out['gradient']['temp'] / out['optimizer']['temp']:.2f}x, time {out['gradient']['step'] / out['optimizer']['step']:.2f}x\n"
    )
    return out


def _nbytes(tree: Any) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def loading(count: int, repeat: int) -> float:
    """`tg.load` of `count` small tensors from a `.safetensors` file into a concrete model on
    one device, against a hand-written loader: `safetensors.numpy.load_file`, then each
    array put on the device in the model's leaf order. Returns treeglob's ratio."""
    from safetensors.numpy import load_file

    params = {
        f"layers.{i}": {"w": jnp.full((16, 16), i, jnp.float32), "b": jnp.zeros(16)}
        for i in range(count // 2)
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "model.safetensors"
        tg.save(path, params)
        treedef, names = jtu.tree_structure(params), tg.paths(params)

        def hand_written() -> Any:
            arrays = load_file(path)
            return jax.block_until_ready(
                jtu.tree_unflatten(treedef, [jax.device_put(arrays[n]) for n in names])
            )

        def treeglob_load() -> Any:
            return jax.block_until_ready(tg.load(params, path)[0])

        r = timed({"hand-written loader": hand_written, "treeglob load": treeglob_load}, repeat)
    print(f"## Loading {count:,} small tensors into a model on one device (ms, median)\n")
    base = r["hand-written loader"]
    table(["loader", "ms", "ratio"], [[k, ms(v), f"{v / base:.2f}"] for k, v in r.items()])
    return r["treeglob load"] / base


LARGE_LOAD = """
import json, pathlib, sys, time
import jax, numpy as np
import treeglob as tg
path, shapes, how = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
model = {name: jax.ShapeDtypeStruct(tuple(shape), np.float32) for name, shape in shapes.items()}
files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) starts again from here
    f.write("5")
before = kib("VmRSS:")
start = time.perf_counter()
if how == "read":  # the floor: the same bytes, read in order, 16 MiB at a time, into new arrays
    loaded = [np.empty(f.stat().st_size, np.uint8) for f in files]
    for f, buffer in zip(files, loaded):
        with open(f, "rb", buffering=0) as stream:
            view = memoryview(buffer)
            for at in range(0, len(buffer), 2**24):
                stream.readinto(view[at : at + 2**24])
elif how == "safetensors.numpy":  # the hand-written loader: load_file, then onto the device
    from safetensors.numpy import load_file
    arrays = {k: v for f in files for k, v in load_file(f).items()}
    loaded = jax.block_until_ready({name: jax.device_put(arrays.pop(name)) for name in model})
elif how == "safetensors.flax":
    from safetensors.flax import load_file
    loaded = jax.block_until_ready({k: v for f in files for k, v in load_file(f).items()})
elif how == "orbax":
    import orbax.checkpoint as ocp
    target = {k: ocp.ArrayRestoreArgs(sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])) for k in model}
    loaded = jax.block_until_ready(ocp.PyTreeCheckpointer().restore(path.parent / "orbax", restore_args=target))
else:
    loaded = jax.block_until_ready(tg.load(model, path)[0])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak": (kib("VmHWM:") - before) * 1024}))
"""


def large_loading(total_mib: int, repeat: int) -> dict[str, float]:
    """`tg.load` of a `total_mib` checkpoint (from the page cache) into an abstract model, one
    file and four shards, against a plain sequential read of the same bytes and the peers'
    loaders; each run in a fresh process, which gives its peak memory beyond what it held
    before (the model's bytes are the floor: the loaded arrays; Linux's peak resident size,
    reset before the load). Returns treeglob's throughput and memory ratios."""
    count = 16
    side = int((total_mib * 2**20 / 4 / count) ** 0.5)
    shapes = {f"layers.{i}.w": [side, side] for i in range(count)}
    nbytes = count * side * side * 4
    peers_of = ["safetensors.numpy", "safetensors.flax"]
    out: dict[str, float] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        single, sharded = pathlib.Path(tmp) / "one.safetensors", pathlib.Path(tmp) / "shards"
        sharded.mkdir()
        model = {name: jnp.full(shape, 1.0, jnp.float32) for name, shape in shapes.items()}
        tg.save(single, model)
        tg.save(sharded / "model.safetensors", model, max_shard_size=nbytes // 4 + 1024)
        with contextlib.suppress(ImportError):
            import orbax.checkpoint as ocp

            ocp.PyTreeCheckpointer().save(pathlib.Path(tmp) / "orbax", model)
            peers_of.append("orbax")
        del model
        for label, path in (("one file", single), ("4 shards", sharded)):
            contenders = ["read", "treeglob", *peers_of]
            if label != "one file":
                contenders.remove("orbax") if "orbax" in contenders else None
            runs: dict[str, list[dict[str, float]]] = {how: [] for how in contenders}
            for _ in range(repeat + 1):  # the first fills the page cache, untimed
                for how in contenders:
                    result = subprocess.run(
                        [sys.executable, "-c", LARGE_LOAD, str(path), json.dumps(shapes), how],
                        capture_output=True,
                        text=True,
                        timeout=600,
                    )
                    if result.returncode:
                        raise RuntimeError(result.stderr[-3000:])
                    runs[how].append(json.loads(result.stdout.strip().splitlines()[-1]))
            median = {
                how: {k: statistics.median(r[k] for r in got[1:]) for k in ("seconds", "peak")}
                for how, got in runs.items()
            }
            read = median["read"]["seconds"]
            out[f"{label} throughput"] = read / median["treeglob"]["seconds"]
            out[f"{label} memory"] = median["treeglob"]["peak"] / nbytes
            for how in contenders:
                m = median[how]
                rows.append(
                    [
                        f"{label}: {how}",
                        f"{nbytes / 2**30 / m['seconds']:.2f}",
                        f"{read / m['seconds']:.2f}",
                        f"{m['peak'] / nbytes:.2f}",
                    ]
                )
    print(f"## Loading a {nbytes / 2**20:,.0f} MiB checkpoint from the page cache into an abstract model\n")
    table(["source: loader", "GiB/s", "x read", "peak/model"], rows)
    return out


def measure_layer_decay(depth: int, repeat: int) -> list[str]:
    params = eqx.filter(
        GPT(vocab=100, dim=64, depth=depth, heads=4, context=64, key=jax.random.key(0)), eqx.is_array
    )
    grads = jax.tree.map(jnp.ones_like, params)
    layer_rules = [("{embed,pos_embed}", 0), ("ln_f", -2)]
    ids = tg.layer_ids(params, rules=layer_rules)
    one = optax.chain(optax.adamw(1e-3), tg.layer_decay(0.75, rules=layer_rules))
    per_layer = optax.multi_transform(
        {i: optax.adamw(1e-3 * 0.75 ** (depth + 1 - i)) for i in set(jax.tree.leaves(ids))}, lambda _: ids
    )
    row, steps = [str(depth)], {}
    for name, tx in (("one", one), ("per layer", per_layer)):
        state = tx.init(params)
        start = time.perf_counter()
        update = jax.jit(tx.update).lower(grads, state, params).compile()
        row.append(f"{time.perf_counter() - start:.2f}")
        steps[name] = lambda update=update, state=state: jax.block_until_ready(update(grads, state, params))
    r = timed(steps, repeat * 5)
    return [row[0], row[1], f"{1e6 * r['one']:.0f}", row[2], f"{1e6 * r['per layer']:.0f}"]


def layer_decay(depths: list[int], repeat: int) -> None:
    print("## Layer-wise LR decay: one transform vs one optimizer per layer (multi_transform)\n")
    rows = [measure_layer_decay(depth, repeat) for depth in depths]
    table(["layers", "one: compile s", "one: step us", "per layer: compile s", "per layer: step us"], rows)


def adversarial() -> None:
    print("## Adversarial patterns (s, one run each)\n")
    cases = [
        ("'*a' x 100 + 'b' vs 2000 chars", "*a" * 100 + "b", ("a" * 2000,)),
        ("100 x '**' vs 500 segments", ".".join(["**"] * 100) + ".b", ("aaa",) * 500),
        ("{a,b} x 25 in one segment", "{a,b}" * 25, ("ab" * 12 + "a",)),
        ("{0..1000000000}", "{0..1000000000}", ("x",) * 200 + ("999999999",)),
        ("'?' x 3000", "?" * 3000, ("a" * 2000,)),
    ]
    rows = []
    for name, pattern, path in cases:
        _pattern.compile_glob.cache_clear()
        start = time.perf_counter()
        _pattern.compile_glob(pattern).match(path)
        rows.append([name, f"{time.perf_counter() - start:.4f}"])
    for name, pattern in [
        ("{a.x,b.y} x 25 (rejected)", ".".join(["{a.x,b.y}"] * 25)),
        ("'{' x 5000 (rejected)", "{" * 5000),
    ]:
        start = time.perf_counter()
        with contextlib.suppress(ValueError):
            tg.glob(pattern)
        rows.append([name, f"{time.perf_counter() - start:.4f}"])
    table(["pattern", "time"], rows)


def main(quick: bool = False) -> None:
    print(
        f"treeglob {tg.__version__}, jax {jax.__version__}, equinox {eqx.__version__}, optax {optax.__version__}\n"
    )
    # The quick configuration checks that every section runs, on small trees.
    sizes = [150, 1_200] if quick else [150, 1_200, 12_000, 120_000]
    mid_size = 1_200 if quick else 12_000
    peer_sizes = [150] if quick else [1_200, 12_000]
    repeat = 3 if quick else 9
    results = selection(
        sizes, repeat, cold_sizes=sizes[-1:] if quick else sizes[-2:], cold_repeat=1 if quick else 3
    )
    memory_ratio = None if quick else memory(120_000)
    reports = report([mid_size], repeat)
    ratios = peer_table(peer_sizes, repeat)
    eager = eager_step(150 if quick else 1_200, repeat)
    imported = imports(1 if quick else 7, warm_up=not quick)
    cli = command_line(150 if quick else 12_000, 1 if quick else 5, warm_up=not quick)
    helps = command_help(1 if quick else 9)
    same = compiled_step(repeat)
    freezing(*((32, 1) if quick else (256, 6)), repeat)
    load_ratio = loading(200 if quick else 2_000, repeat)
    large = large_loading(64 if quick else 1_024, 1 if quick else 3)
    layer_decay([2] if quick else [12, 48], repeat)
    adversarial()

    print("## Targets\n")
    counts = sorted(results)
    mid = min(counts, key=lambda n: abs(n - mid_size))
    checks = []
    for n in counts[-2:]:
        r = results[n]
        checks.append(
            (f"labels at most 1.1x flatten+unflatten ({n:,} leaves, warm)", r["warm"] / r["floor"], 1.1)
        )
        if r["cold"] == r["cold"]:  # measured (not NaN)
            checks.append(
                (
                    f"labels at most 1.5x flatten+unflatten ({n:,} leaves, cold)",
                    r["cold"] / r["cold_floor"],
                    1.5,
                )
            )
    rep = reports[mid_size]
    checks += [
        (f"explain at most 2x labels ({mid:,} leaves)", rep["explain"] / rep["labels"], 2.0),
        (
            f"labels(presets.DEFAULT) at most 1.2x one glob ({mid:,} leaves)",
            rep["preset"] / rep["one_glob"],
            1.2,
        ),
    ]
    for size in peer_sizes:
        key = ("nnx.map_state, a plain lambda", size)
        if key in ratios:
            checks.append(
                (f"mask of an NNX State at most 1x nnx.map_state ({size:,} leaves)", 1 / ratios[key], 1.0)
            )
    checks.append(("import treeglob at most 20 ms over jax, equinox, optax", 1e3 * imported["import"], 20.0))
    for name, (tensors, seconds) in cli.items():
        checks.append(
            (f"treeglob {name}: at most 150 ms after the imports ({tensors:,} tensors)", 1e3 * seconds, 150.0)
        )
    for name, seconds in helps.items():
        if name.startswith("treeglob"):
            checks.append((f"{name}: at most 300 ms, wall", 1e3 * seconds, 300.0))
    if memory_ratio is not None:
        checks.append(
            ("peak memory of labels at most 1.05x tree_flatten_with_path's (120k)", memory_ratio, 1.05)
        )
    checks.append(("load of small tensors at most 1.2x a hand-written loader", load_ratio, 1.2))
    for label in ("one file", "4 shards"):
        # Throughput at least 0.8x a sequential read: read time over load time, inverted for "at most".
        checks.append(
            (
                f"large load ({label}): read time / load time at least 0.8",
                1 / large[f"{label} throughput"],
                1.25,
            )
        )
        checks.append(
            (f"large load ({label}): peak memory at most 1.1x the model", large[f"{label} memory"], 1.1)
        )
    if len(counts) >= 2:
        small, big = counts[-2], counts[-1]
        growth = (results[big]["warm"] / results[small]["warm"]) / (big / small) * 10
        checks.append((f"linear: time per 10x leaves ({small:,} -> {big:,})", growth, 11.0))
    rows = [
        [name, "yes" if value <= bound else "NO", f"{value:.2f}", f"{bound:g}"]
        for name, value, bound in checks
    ]
    rows.append(
        [
            "jaxpr of every optimizer wrapper identical to the hand-written one",
            "yes" if same else "NO",
            str(same),
            "True",
        ]
    )
    rows.append(
        [
            "eager tg.masked update, ms (optax.masked with a precomputed mask)",
            "-",
            f"{1e3 * eager['tg.masked']:.2f}",
            f"({1e3 * eager['optax.masked, precomputed mask']:.2f})",
        ]
    )
    table(["target", "met", "measured", "bound"], rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny configuration, to check that the script works"
    )
    main(**vars(parser.parse_args()))
