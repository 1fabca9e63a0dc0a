"""A Haiku GPT trained with one AdamW whose weight-decay mask comes from `tg.presets.HF`.

Haiku names parameters by module (`haiku_block/~/layer_norm`, `linear_1`) and
spells biases `b`: treeglob splits the `/`-joined names into segments, so
`layer_norm.scale` and `linear_1.w` select as they would in any other tree, and
the Hugging Face convention (no decay for biases and layer norms) applies.

    python examples/haiku_gpt.py --steps 200
"""

from __future__ import annotations

import argparse
import math
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from train_gpt import batches, corpus

import treeglob as tg

DIM, HEADS, DEPTH, CONTEXT = 64, 4, 2, 64


class Block(hk.Module):
    def __call__(self, x):
        h = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)(x)
        mask = jnp.tril(jnp.ones((1, 1, x.shape[-2], x.shape[-2]), bool))  # (batch, heads, query, key)
        x = x + hk.MultiHeadAttention(HEADS, DIM // HEADS, w_init=hk.initializers.VarianceScaling())(
            h, h, h, mask
        )
        h = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)(x)
        return x + hk.Linear(DIM)(jax.nn.gelu(hk.Linear(4 * DIM)(h)))


def make_forward(vocab: int):
    def forward(tokens):
        x = hk.Embed(vocab, DIM)(tokens)
        pos = hk.get_parameter(
            "positional_embeddings", [CONTEXT, DIM], init=hk.initializers.TruncatedNormal(0.02)
        )
        x = x + pos[: tokens.shape[-1]]
        for _ in range(DEPTH):
            x = Block()(x)
        return hk.Linear(vocab)(hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)(x))

    return hk.without_apply_rng(hk.transform(forward))


def main(steps: int = 200, seed: int = 0) -> list[float]:
    data, chars = corpus()
    model = make_forward(len(chars))
    params = model.init(jax.random.key(seed), jnp.zeros((1, CONTEXT), jnp.int32))
    print(tg.explain(params, tg.presets.HF).format(width=100))

    optimizer = optax.adamw(3e-3, weight_decay=0.1, mask=tg.decay_mask(tg.presets.HF))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    print("compiling the training step (the first step takes a few seconds)...")
    losses = []
    for i, (x, y) in zip(range(1, steps + 1), batches(data, 16, CONTEXT, seed), strict=False):
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(float(loss))
        if i == 1 or i % 50 == 0 or i == steps:
            print(f"step {i:5d}  loss {np.mean(losses[-50:]):.3f}")
    print(f"loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f} (uniform guess: {math.log(len(chars)):.3f})")
    return losses


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # each line shows as it is printed, also in a pipe
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    main(**vars(parser.parse_args()))
