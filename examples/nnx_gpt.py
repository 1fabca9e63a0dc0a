"""A Flax NNX GPT trained under `nnx.Optimizer` with treeglob's recipes.

1. Weight decay with `tg.presets.DEFAULT` (one AdamW, the usual exclusions,
   found by name on the parameter State) and layer-wise LR decay.
2. LoRA: adapters (`nnx.LoRA`, whose matrices are `nnx.LoRAParam`s) around
   every pretrained MLP input layer, put in place by `tg.replace_modules`
   (NNX modules change in place), then trained alone: only the adapters are
   differentiated (`nnx.DiffState` with a `tg.nnx_filter`) and the optimizer
   holds state for them alone (`nnx.Optimizer(wrt=...)`, the same filter).

Data: the text of Python's own documentation, as in `train_gpt.py`.

    python examples/nnx_gpt.py --steps 200
"""

from __future__ import annotations

import argparse
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from train_gpt import batches, corpus

import treeglob as tg


class Block(nnx.Module):
    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.proj = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, mask=nnx.make_causal_mask(x[..., 0]))
        return x + self.proj(jax.nn.gelu(self.fc(self.ln2(x))))


class GPT(nnx.Module):
    def __init__(self, vocab: int, *, dim=64, depth=2, heads=4, context=64, rngs: nnx.Rngs):
        self.wte = nnx.Embed(vocab, dim, rngs=rngs)
        self.wpe = nnx.Param(jax.random.normal(rngs.params(), (context, dim)) * 0.02)
        self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(depth)])
        self.ln_f = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.wte(tokens) + self.wpe[: tokens.shape[-1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def make_train_step(wrt=nnx.Param):
    """A jitted step that differentiates the Variables `wrt` selects, and only those."""

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss

    return train_step


def train(model, optimizer, steps, data, seed, log_every=50, wrt=nnx.Param):
    losses = []
    train_step = make_train_step(wrt)
    print("compiling the training step (the first step takes a few seconds)...")
    for i, (x, y) in zip(range(1, steps + 1), batches(data, 16, 64, seed), strict=False):
        losses.append(float(train_step(model, optimizer, jnp.asarray(x), jnp.asarray(y))))
        if i == 1 or i % log_every == 0 or i == steps:
            print(f"step {i:5d}  loss {np.mean(losses[-log_every:]):.3f}")
    return losses


def main(steps: int = 200, seed: int = 0) -> None:
    data, chars = corpus()
    model = GPT(len(chars), rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)

    # 1. Weight decay and layer-wise LR decay. The masks are computed from the tree
    # optax gets, at init (Params) and at every update (bare arrays): same paths.
    print(tg.explain(params, tg.presets.DEFAULT).format(width=100))
    tx = optax.chain(
        optax.adamw(3e-3, weight_decay=0.1, mask=tg.decay_mask(tg.presets.DEFAULT)),
        tg.layer_decay(0.8, rules=[("{wte,wpe}", 0), ("ln_f", -2)]),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    losses = train(model, optimizer, steps, data, seed)
    print(
        f"pretraining: loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f} (uniform: {math.log(len(chars)):.3f})"
    )

    # 2. LoRA: adapters around each pretrained MLP input layer (lora_b starts at zero,
    # so the model is unchanged), then only the adapters (nnx.LoRAParam) trained.
    def lora_of(linear, key):
        return nnx.LoRA(linear.in_features, 4, linear.out_features, base_module=linear, rngs=nnx.Rngs(key))

    lora = tg.replace_modules(model, "blocks.*.fc", lora_of, key=jax.random.key(seed + 1))
    assert lora is model  # NNX modules change in place
    print(tg.modules(lora, nnx.LoRA))
    adapters = tg.nnx_filter(lora, nnx.LoRAParam)
    optimizer = nnx.Optimizer(lora, optax.adam(3e-3), wrt=adapters)
    state_floats = sum(x.size for x in jax.tree.leaves(nnx.state(optimizer, nnx.OptState)) if x.ndim)
    trainable = sum(x.size for x in jax.tree.leaves(nnx.state(lora, adapters)))
    print(f"LoRA: {trainable:,} trainable elements; Adam holds {state_floats:,} floats of state")
    before = jax.tree.leaves(nnx.state(lora, nnx.Param))
    train(lora, optimizer, max(steps // 4, 10), data, seed + 1, wrt=adapters)
    after = nnx.state(lora, nnx.Param)
    moved = [
        p
        for p, a, b in zip(tg.paths(after), jax.tree.leaves(after), before, strict=True)
        if not np.array_equal(a, b)
    ]
    print(f"moved: {len(moved)} leaves, all adapters: {all('.lora_' in p for p in moved)}")


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # each line shows as it is printed, also in a pipe
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    main(**vars(parser.parse_args()))
