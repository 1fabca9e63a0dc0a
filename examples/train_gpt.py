"""Weight decay on a small Equinox GPT, configured with treeglob rules.

Builds a character-level Transformer, prints the `explain` report of the
usual weight-decay rule set (`treeglob.presets.DEFAULT`: decay the weight
matrices; no decay for biases, normalisation layers and embeddings), then
trains it with one AdamW whose decay mask comes from those rules, on the
text of Python's own documentation (`pydoc_data.topics`, shipped with CPython).

    python examples/train_gpt.py --steps 300
"""

from __future__ import annotations

import argparse
import math
import pydoc_data.topics
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import treeglob as tg


class Block(eqx.Module):
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    fc: eqx.nn.Linear
    proj: eqx.nn.Linear

    def __init__(self, dim: int, heads: int, *, key: jax.Array):
        k1, k2, k3 = jax.random.split(key, 3)
        self.ln1 = eqx.nn.LayerNorm(dim)
        self.attn = eqx.nn.MultiheadAttention(
            heads,
            dim,
            use_query_bias=True,
            use_key_bias=True,
            use_value_bias=True,
            use_output_bias=True,
            key=k1,
        )
        self.ln2 = eqx.nn.LayerNorm(dim)
        self.fc = eqx.nn.Linear(dim, 4 * dim, key=k2)
        self.proj = eqx.nn.Linear(4 * dim, dim, key=k3)

    def __call__(self, x: jax.Array) -> jax.Array:
        n = x.shape[0]
        causal = jnp.tril(jnp.ones((n, n), bool))
        h = jax.vmap(self.ln1)(x)
        x = x + self.attn(h, h, h, mask=causal)
        h = jax.vmap(self.ln2)(x)
        return x + jax.vmap(lambda t: self.proj(jax.nn.gelu(self.fc(t))))(h)


class GPT(eqx.Module):
    embed: eqx.nn.Embedding
    pos_embed: jax.Array
    blocks: list[Block]
    ln_f: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, vocab: int, dim: int, depth: int, heads: int, context: int, *, key: jax.Array):
        keys = jax.random.split(key, depth + 3)
        self.embed = eqx.nn.Embedding(vocab, dim, key=keys[0])
        self.pos_embed = 0.02 * jax.random.normal(keys[1], (context, dim))
        self.blocks = [Block(dim, heads, key=k) for k in keys[3:]]
        self.ln_f = eqx.nn.LayerNorm(dim)
        self.head = eqx.nn.Linear(dim, vocab, key=keys[2])

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jax.vmap(self.embed)(tokens) + self.pos_embed[: tokens.shape[0]]
        for block in self.blocks:
            x = block(x)
        return jax.vmap(lambda t: self.head(self.ln_f(t)))(x)


def corpus() -> tuple[np.ndarray, list[str]]:
    """English prose that ships with every CPython, the pydoc topic pages, as character ids."""
    text = "".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    return np.array([lookup[c] for c in text[:400_000]], np.int32), chars


def build_model(seed: int = 0) -> GPT:
    """The Quick start model. Also a factory for the command line, which builds it
    abstractly: `treeglob explain examples/train_gpt.py:build_model --preset default`."""
    _, chars = corpus()
    return GPT(vocab=len(chars), dim=64, depth=2, heads=4, context=64, key=jax.random.key(seed))


def batches(data: np.ndarray, batch: int, context: int, seed: int):
    """Endless random (inputs, next-character targets) windows of `data`."""
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.integers(0, len(data) - context - 1, batch)
        yield (
            np.stack([data[j : j + context] for j in idx]),
            np.stack([data[j + 1 : j + context + 1] for j in idx]),
        )


def loss_fn(params, static, x, y):
    logits = jax.vmap(eqx.combine(params, static))(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(optimizer: optax.GradientTransformation, static, metric_rules=None):
    """A jitted training step: (params, opt_state, loss, metrics). With `metric_rules`, the
    metrics are the gradient norm of each label (`grad/norm/<label>`), else empty."""

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, static, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        # Labels are resolved while tracing: the compiled step only holds the norms.
        metrics = {} if metric_rules is None else tg.summarize(grads, metric_rules, prefix="grad")
        return optax.apply_updates(params, updates), opt_state, loss, metrics

    return step


def main(
    steps: int = 300, batch: int = 16, seed: int = 0, log_every: int = 50, context: int = 64
) -> list[float]:
    data, chars = corpus()
    params, static = eqx.partition(build_model(seed), eqx.is_array)

    # The usual exclusions: no decay for biases, norms, embeddings, 1-D params.
    print(tg.explain(params, tg.presets.DEFAULT))
    print()
    optimizer = optax.adamw(3e-3, weight_decay=0.1, mask=tg.decay_mask(tg.presets.DEFAULT))
    opt_state = optimizer.init(params)
    step = make_step(optimizer, static, metric_rules=tg.presets.DEFAULT)

    print("compiling the training step (the first step takes a few seconds)...")
    losses, start = [], time.perf_counter()
    for i, (x, y) in zip(range(1, steps + 1), batches(data, batch, context, seed), strict=False):
        params, opt_state, loss, metrics = step(params, opt_state, x, y)
        losses.append(float(loss))
        if i == 1 or i % log_every == 0 or i == steps:
            recent = np.mean(losses[-log_every:])
            norms = "  ".join(f"{k} {float(v):.3f}" for k, v in metrics.items())
            print(f"step {i:5d}  loss {recent:.3f}  {norms}  ({time.perf_counter() - start:.1f}s)")
    print(f"loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f} (uniform guess: {math.log(len(chars)):.3f})")
    return losses


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # each line shows as it is printed, also in a pipe
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    main(**vars(parser.parse_args()))
