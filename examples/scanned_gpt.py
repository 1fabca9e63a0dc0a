"""A scanned Transformer: blocks stacked with `eqx.filter_vmap`, run with `lax.scan`.

All blocks live in one `Block` whose arrays carry a leading layer axis, so
`blocks.attn.query_proj.weight` has shape `(depth, 64, 64)` and the block
index is gone from the path. Declaring `stacked={"blocks": 1}` gives it back:
treeglob sees `blocks.0.attn...`, `blocks.1.attn...` with per-layer shapes,
so the same rules as for a list of blocks apply. This script uses all three
at once: weight decay by `treeglob.presets.DEFAULT` (`ndim` sees per-layer
shapes, so stacked biases and norm scales stay 1-D and undecayed), layer-wise
LR decay with per-layer scale arrays, and the first two layers frozen.

    python examples/scanned_gpt.py --steps 200
"""

from __future__ import annotations

import argparse
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from train_gpt import Block, batches, corpus, make_step

import treeglob as tg

STACKED = {"blocks": 1}


class ScannedGPT(eqx.Module):
    embed: eqx.nn.Embedding
    pos_embed: jax.Array
    blocks: Block  # one Block holding every layer along a leading axis
    ln_f: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, vocab: int, dim: int, depth: int, heads: int, context: int, *, key: jax.Array):
        keys = jax.random.split(key, 4)
        self.embed = eqx.nn.Embedding(vocab, dim, key=keys[0])
        self.pos_embed = 0.02 * jax.random.normal(keys[1], (context, dim))
        self.blocks = eqx.filter_vmap(lambda k: Block(dim, heads, key=k))(jax.random.split(keys[3], depth))
        self.ln_f = eqx.nn.LayerNorm(dim)
        self.head = eqx.nn.Linear(dim, vocab, key=keys[2])

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jax.vmap(self.embed)(tokens) + self.pos_embed[: tokens.shape[0]]
        layers, static = eqx.partition(self.blocks, eqx.is_array)

        def body(x, layer):
            return eqx.combine(layer, static)(x), None

        x, _ = jax.lax.scan(body, x, layers)
        return jax.vmap(lambda t: self.head(self.ln_f(t)))(x)


def main(steps: int = 200, depth: int = 6, frozen_layers: int = 2, seed: int = 0) -> list[float]:
    data, chars = corpus()
    model = ScannedGPT(vocab=len(chars), dim=64, depth=depth, heads=4, context=64, key=jax.random.key(seed))
    params, static = eqx.partition(model, eqx.is_array)

    layer_rules = [("{embed,pos_embed}", 0), ("ln_f", -2)]
    scales = tg.layer_decay_scales(params, 0.8, rules=layer_rules, stacked=STACKED)
    print(
        "per-layer LR scales of blocks.attn.query_proj.weight:",
        scales.blocks.attn.query_proj.weight.ravel().round(4),
    )
    frozen = f"blocks.{{0..{frozen_layers - 1}}}"
    # The update factors freeze() applies: 0.0 on the frozen layers, 1.0 on the rest.
    # (Numbers, since a stacked leaf's layers may differ only in numeric labels.)
    summary = tg.explain(params, [(frozen, 0.0)], default=1.0, stacked=STACKED).summary
    names = {0.0: "frozen", 1.0: "train"}
    print(
        ", ".join(
            f"{names[factor]}: {s['leaves']} layer slices, {s['elements']:,} elements"
            for factor, s in summary.items()
        )
    )

    optimizer = tg.freeze(
        optax.chain(
            optax.adamw(3e-3, weight_decay=0.1, mask=tg.decay_mask(stacked=STACKED)),
            tg.layer_decay(0.8, rules=layer_rules, stacked=STACKED),
        ),
        frozen,
        stacked=STACKED,
    )
    step = make_step(optimizer, static)
    opt_state = optimizer.init(params)
    start, losses = params, []
    print("compiling the training step (the first step takes a few seconds)...")
    for i, (x, y) in zip(range(1, steps + 1), batches(data, 16, 64, seed), strict=False):
        params, opt_state, loss, _ = step(params, opt_state, x, y)
        losses.append(float(loss))
        if i == 1 or i % 50 == 0:
            print(f"step {i:5d}  loss {np.mean(losses[-50:]):.3f}")

    before, after = start.blocks.fc.weight, params.blocks.fc.weight
    assert jnp.array_equal(before[:frozen_layers], after[:frozen_layers]), "a frozen layer moved"
    assert not jnp.array_equal(before[frozen_layers:], after[frozen_layers:])
    print(f"layers 0-{frozen_layers - 1} unchanged, layers {frozen_layers}-{depth - 1} trained")
    print(f"loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f}")
    return losses


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # each line shows as it is printed, also in a pipe
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--frozen-layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    main(**{k.replace("-", "_"): v for k, v in vars(parser.parse_args()).items()})
