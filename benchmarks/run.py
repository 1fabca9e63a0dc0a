"""treeglob benchmarks: selection against the cost of flattening, and the compiled step.

    python benchmarks/run.py            # the full run (a few minutes)
    python benchmarks/run.py --quick    # a tiny configuration, to check that it works

Every figure is a median of several repetitions, measured side by side in
one process, and reported as a ratio to a baseline measured the same way:
the machine is shared and noisy, so absolute times vary and ratios are what
to compare. Trees are GPT-shaped Equinox models (embedding, position table,
a list of Transformer blocks, final norm, head) built abstractly with
`eqx.filter_eval_shape`; the deep ones repeat one abstract block, which
flattens exactly like distinct blocks.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import pathlib
import statistics
import sys
import time
import tracemalloc

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
from train_gpt import GPT  # noqa: E402

import treeglob as tg  # noqa: E402
from treeglob import _pattern, _structure  # noqa: E402

LEAVES_PER_BLOCK, OTHER_LEAVES = 14, 6

#: A realistic rule set: globs, a type condition, an integer range, an ndim condition.
RULES = [
    (tg.any_of("*.bias", eqx.nn.LayerNorm), "no_decay"),
    ("{embed,pos_embed}", "frozen"),
    ("blocks.{0..3}", "early"),
    ("*.attn.{query,key,value}_proj.weight", "attn"),
    ("head", "head"),
    (tg.ndim >= 2, "decay"),
]
DEFAULT = "other"


def gpt(leaves: int, dim: int = 64):
    """Abstract params of a GPT with about `leaves` leaves."""
    depth = max(1, round((leaves - OTHER_LEAVES) / LEAVES_PER_BLOCK))
    one = eqx.filter_eval_shape(
        lambda: GPT(vocab=100, dim=dim, depth=1, heads=4, context=64, key=jax.random.key(0))
    )
    model = eqx.tree_at(lambda m: m.blocks, one, [one.blocks[0]] * depth)
    return eqx.filter(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def clear_caches() -> None:
    """Forget compiled patterns and structures: the next call is a cold one."""
    _pattern.compile_glob.cache_clear()
    _pattern.compile_regex.cache_clear()
    _structure._CACHE.clear()


# ----------------------------------------------------------------------------
# Baselines written here


def seed_mask(params):
    """The seed's hand-written selection: Linear layers decayed whole, LayerNorm only its bias."""

    def is_layer(x):
        return isinstance(x, eqx.nn.Linear) or isinstance(x, eqx.nn.LayerNorm)

    def set_mask(x):
        if isinstance(x, eqx.nn.Linear):
            return jtu.tree_map(lambda _: True, x)
        elif isinstance(x, eqx.nn.LayerNorm):
            mask = jtu.tree_map(lambda _: False, x)
            return eqx.tree_at(lambda m: m.bias, mask, True)
        else:
            return jtu.tree_map(lambda _: False, x)

    return jtu.tree_map(set_mask, params, is_leaf=is_layer)


SEED_SELECTOR = tg.inside(eqx.nn.Linear) | (tg.inside(eqx.nn.LayerNorm) & tg.glob("bias"))


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


def naive_labels(params):
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


def measure_selection(size: int, repeat: int) -> dict[str, float]:
    params = gpt(size)
    assert naive_labels(params) == tg.labels(params, RULES, default=DEFAULT), "naive baseline disagrees"
    assert seed_mask(params) == tg.mask(params, SEED_SELECTOR), "seed baseline disagrees"
    flatten = median_time(lambda: jtu.tree_flatten_with_path(params), repeat)
    clear_caches()
    start = time.perf_counter()
    tg.labels(params, RULES, default=DEFAULT)
    cold = time.perf_counter() - start
    return dict(
        leaves=len(jax.tree.leaves(params)),
        flatten=flatten,
        cold=cold,
        warm=median_time(lambda: tg.labels(params, RULES, default=DEFAULT), repeat),
        naive=median_time(lambda: naive_labels(params), max(1, repeat // 2)),
        seed=median_time(lambda: seed_mask(params), repeat),
        ours_seed=median_time(lambda: tg.mask(params, SEED_SELECTOR), repeat),
    )


def selection(sizes: list[int], repeat: int) -> dict[int, dict[str, float]]:
    print("## Label building (ms, median; ratios to tree_flatten_with_path on the same tree)\n")
    results, rows = {}, []
    for size in sizes:
        r = measure_selection(size, repeat)
        results[r["leaves"]] = r
        flatten, cold, warm, naive, seed, ours_seed = (
            r[k] for k in ("flatten", "cold", "warm", "naive", "seed", "ours_seed")
        )
        rows.append(
            [
                f"{r['leaves']:,}",
                f"{1e3 * flatten:.1f}",
                f"{1e3 * cold:.1f} ({cold / flatten:.2f}x)",
                f"{1e3 * warm:.1f} ({warm / flatten:.2f}x)",
                f"{1e3 * naive:.1f} ({naive / flatten:.1f}x)",
                f"{1e3 * seed:.1f}",
                f"{1e3 * ours_seed:.1f} ({seed / ours_seed:.1f}x faster)",
            ]
        )
    table(
        [
            "leaves",
            "flatten",
            "labels cold",
            "labels warm",
            "naive fnmatch",
            "seed isinstance",
            "seed selection in treeglob",
        ],
        rows,
    )
    return results


def memory(size: int) -> None:
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


def compiled_step(repeat: int) -> None:
    params = eqx.filter(
        GPT(vocab=100, dim=64, depth=2, heads=4, context=64, key=jax.random.key(0)), eqx.is_array
    )
    grads = jax.tree.map(jnp.ones_like, params)
    hand = jax.tree.map(lambda p: p.ndim >= 2, params)
    ours = optax.adamw(1e-3, weight_decay=0.1, mask=tg.decay_mask(tg.presets.NANOGPT))
    ref = optax.adamw(1e-3, weight_decay=0.1, mask=hand)
    state = ref.init(params)
    same = str(jax.make_jaxpr(ours.update)(grads, state, params)) == str(
        jax.make_jaxpr(ref.update)(grads, state, params)
    )
    steps = {}
    for name, tx in [("hand-written mask", ref), ("treeglob decay_mask", ours)]:
        update = jax.jit(tx.update)
        jax.block_until_ready(update(grads, state, params))
        steps[name] = median_time(
            lambda update=update: jax.block_until_ready(update(grads, state, params)), repeat * 10
        )
    print("## Compiled step (AdamW update, 2-block GPT)\n")
    print(f"jaxpr identical to the hand-written mask: {same}\n")
    table(["mask", "step us"], [[k, f"{1e6 * v:.0f}"] for k, v in steps.items()])
    return same


def measure_layer_decay(depth: int, repeat: int) -> list[str]:
    params = eqx.filter(
        GPT(vocab=100, dim=64, depth=depth, heads=4, context=64, key=jax.random.key(0)), eqx.is_array
    )
    grads = jax.tree.map(jnp.ones_like, params)
    rules = [("{embed,pos_embed}", 0), ("ln_f", -2)]
    ids = tg.layer_ids(params, rules=rules)
    one = optax.chain(optax.adamw(1e-3), tg.layer_decay(0.75, rules=rules))
    per_layer = optax.multi_transform(
        {i: optax.adamw(1e-3 * 0.75 ** (depth + 1 - i)) for i in set(jax.tree.leaves(ids))}, lambda _: ids
    )
    row = [str(depth)]
    for tx in (one, per_layer):
        state = tx.init(params)
        start = time.perf_counter()
        update = jax.jit(tx.update).lower(grads, state, params).compile()
        compile_s = time.perf_counter() - start
        step = median_time(lambda: jax.block_until_ready(update(grads, state, params)), repeat * 5)  # noqa: B023
        row += [f"{compile_s:.2f}", f"{1e6 * step:.0f}"]
    return row


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
        try:
            tg.glob(pattern)
        except ValueError:
            pass
        rows.append([name, f"{time.perf_counter() - start:.4f}"])
    table(["pattern", "time"], rows)


def main(quick: bool = False) -> None:
    print(
        f"treeglob {tg.__version__}, jax {jax.__version__}, equinox {eqx.__version__}, optax {optax.__version__}\n"
    )
    sizes = [150, 1_200] if quick else [150, 1_200, 12_000, 120_000]
    repeat = 3 if quick else 9
    results = selection(sizes, repeat)
    if not quick:
        memory(120_000)
    same = compiled_step(repeat)
    layer_decay([2] if quick else [12, 48], repeat)
    adversarial()

    print("## Targets\n")
    counts = sorted(results)
    mid = counts[-1] if quick else min(counts, key=lambda n: abs(n - 12_000))
    r = results[mid]
    checks = [
        (
            f"labels at most 2x tree_flatten_with_path ({mid:,} leaves, warm)",
            r["warm"] / r["flatten"] <= 2,
            f"{r['warm'] / r['flatten']:.2f}x",
        ),
        (
            f"seed selection at least 2x faster than the seed's code ({mid:,} leaves)",
            r["seed"] / r["ours_seed"] >= 2,
            f"{r['seed'] / r['ours_seed']:.1f}x",
        ),
        ("jaxpr identical to a hand-written mask", same, str(same)),
    ]
    if len(counts) >= 2:
        small, big = counts[-2], counts[-1]
        growth = (results[big]["warm"] / results[small]["warm"]) / (big / small) * 10
        checks.append(
            (
                f"linear: {big / small:.0f}x leaves ({small:,} -> {big:,}), at most 11x time per 10x",
                growth <= 11,
                f"{growth:.1f}x per 10x",
            )
        )
    table(["target", "met", "measured"], [[name, "yes" if ok else "NO", value] for name, ok, value in checks])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny configuration, to check that the script works"
    )
    main(**vars(parser.parse_args()))
