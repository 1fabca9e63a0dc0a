"""Adversarial patterns, JAX transformations, threads."""

import contextlib
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import treeglob as tg
from conftest import Transformer
from treeglob._core.pattern import compile_glob

# ----------------------------------------------------------------------------
# Adversarial patterns: linear matching, bounded expansion, fast failures


@contextlib.contextmanager
def deadline(seconds):
    """Fail instead of hanging CI: the timings themselves are reported by the benchmarks."""

    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


LONG_PATH = ("a" * 2000,)
DEEP_PATH = tuple("a" * 3 for _ in range(500))

ADVERSARIAL = [
    ("*a" * 100 + "b", LONG_PATH, False),
    ("*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*c", ("a" * 5000,), False),
    (".".join(["**"] * 100) + ".b", DEEP_PATH, False),
    (".".join(["**", "a*"] * 50) + ".z", DEEP_PATH, False),
    ("{a,b}" * 25, ("ab" * 12 + "a",), True),
    ("{a,aa,aaa}" * 20 + "b", LONG_PATH, False),
    ("{0..1000000000}", ("x",) * 200 + ("999999999",), True),
    ("{0..99999999999999999999999999}", ("12345678901234567890",), True),
    ("?" * 3000, LONG_PATH, False),
    ("[a-z]" * 1000, ("a" * 1000,), True),
]


@pytest.mark.parametrize("pattern, path, expected", ADVERSARIAL, ids=lambda x: repr(x)[:30])
def test_adversarial_patterns_finish(pattern, path, expected):
    with deadline(5):
        compile_glob.cache_clear()
        assert compile_glob(pattern).match(path) is expected


@pytest.mark.parametrize(
    "pattern, message",
    [
        (".".join(["{a.x,b.y}"] * 25), "expand to more than 256 alternatives"),
        ("{" * 5000, "braces are nested more than 32 deep"),
        ("{a," * 30 + "b", r"unbalanced '\{'"),
        ("[" * 5000, r"unbalanced '\['"),
        ("a" + "." * 3000, "empty segment"),
    ],
)
def test_adversarial_patterns_fail_fast(pattern, message):
    with deadline(5), pytest.raises(ValueError, match=message):
        tg.glob(pattern)


def test_adversarial_regex_is_the_callers_choice_but_globs_never_backtrack():
    # The same shape as a catastrophic regex, as a glob: linear.
    start = time.perf_counter()
    with deadline(5):
        assert not compile_glob("*" + "a*" * 40 + "b").match(("a" * 3000,))
    assert time.perf_counter() - start < 5


# ----------------------------------------------------------------------------
# Under JAX transformations: static masks, one trace


def test_a_jitted_train_step_compiles_once():
    model = Transformer(key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    tx = optax.chain(
        tg.freeze(optax.adamw(1e-2, weight_decay=0.1, mask=tg.decay_mask()), "embed"),
        tg.layer_decay(0.8, rules=[("embed", 0), ("ln_f", -2)]),
        tg.masked(optax.clip(1.0), tg.ndim >= 2),
    )
    traces = []

    @jax.jit
    def step(params, state, tokens):
        traces.append(1)
        grads = jax.grad(lambda p: jnp.mean(eqx.combine(p, static)(tokens) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for i in range(8):
        params, state = step(params, state, jnp.arange(5) + i)
    assert len(traces) == 1


def test_filter_jit_over_a_whole_model_with_non_array_leaves():
    model = Transformer(key=jax.random.key(0))
    tx = tg.multi_transform(
        {"decay": optax.adamw(1e-2), "rest": optax.sgd(1e-2)}, [(tg.ndim >= 2, "decay")], default="rest"
    )
    state = tx.init(eqx.filter(model, eqx.is_array))
    traces = []

    @eqx.filter_jit
    def step(model, state):
        traces.append(1)
        grads = eqx.filter_grad(lambda m: jnp.mean(m(jnp.arange(4)) ** 2))(model)
        updates, state = tx.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state

    for _ in range(5):
        model, state = step(model, state)
    assert len(traces) == 1


def test_abstract_trees_from_filter_eval_shape():
    abstract = eqx.filter_eval_shape(Transformer, key=jax.random.key(0))
    params = eqx.filter(abstract, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    concrete = eqx.filter(Transformer(key=jax.random.key(0)), eqx.is_array)
    assert tg.mask(params, tg.ndim >= 2) == tg.mask(concrete, tg.ndim >= 2)
    assert tg.labels(params, tg.presets.DEFAULT) == tg.labels(concrete, tg.presets.DEFAULT)
    state = jax.eval_shape(tg.freeze(optax.adam(1e-3), "embed").init, params)
    assert sum(x.size for x in jax.tree.leaves(state)) < 2 * sum(x.size for x in jax.tree.leaves(params))


def test_sharded_params_are_read_without_a_device_transfer():
    mesh = jax.make_mesh((1,), ("model",))
    params = eqx.filter(Transformer(key=jax.random.key(0)), eqx.is_array)
    specs = tg.shardings(params, [("*.weight", P())], mesh)
    placed = jax.device_put(params, specs)
    with jax.transfer_guard("disallow"):
        assert tg.mask(placed, tg.ndim >= 2) == tg.mask(params, tg.ndim >= 2)
        tg.explain(placed, tg.presets.DEFAULT)


# ----------------------------------------------------------------------------
# Threads


def test_patterns_built_from_many_threads_at_once():
    tree = {f"layer{i}": {"w": np.zeros((2, 2)), "b": np.zeros(2)} for i in range(30)}
    patterns = [f"layer{{{i}..{i + 7}}}.{{w,b}}" for i in range(60)] + [f"*{i}*.w" for i in range(60)]
    serial = [tg.mask(tree, p, strict=False) for p in patterns]
    compile_glob.cache_clear()
    barrier = threading.Barrier(8)

    def build(chunk):
        barrier.wait()  # start together, on a cold cache
        return [(i, tg.mask(tree, tg.glob(patterns[i]), strict=False)) for i in chunk]

    with ThreadPoolExecutor(8) as pool:
        results = [
            r for part in pool.map(build, [range(k, len(patterns), 8) for k in range(8)]) for r in part
        ]
    assert sorted(results, key=lambda r: r[0]) == list(enumerate(serial))
    assert compile_glob(patterns[0]) is compile_glob(patterns[0])
