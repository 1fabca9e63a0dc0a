"""LoRA-style fine-tuning: train only low-rank adapters, the rest frozen with no optimizer state.

Pretrains the small GPT of `train_gpt.py` on one part of the pydoc text,
wraps its Linear layers (attention projections and MLP) in adapters
`W x + B A x` with `B = 0` at the start, and fine-tunes on another part with
`treeglob.freeze(optax.adam(...), ~treeglob.glob("lora_{a,b}"))`: the frozen
leaves get exactly zero updates and Adam holds state for the adapters only.
Prints the optimizer-state bytes with and without freezing.

    python examples/lora_finetune.py --pretrain-steps 200 --steps 200
"""

from __future__ import annotations

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from train_gpt import GPT, batches, corpus, loss_fn, make_step

import treeglob as tg


class LoRALinear(eqx.Module):
    """A frozen-to-be `eqx.nn.Linear` plus a trainable low-rank update."""

    base: eqx.nn.Linear
    lora_a: jax.Array
    lora_b: jax.Array

    def __init__(self, base: eqx.nn.Linear, rank: int, *, key: jax.Array):
        self.base = base
        self.lora_a = jax.random.normal(key, (rank, base.in_features)) / base.in_features**0.5
        self.lora_b = jnp.zeros((base.out_features, rank))

    def __call__(self, x: jax.Array, **kwargs) -> jax.Array:
        return self.base(x) + self.lora_b @ (self.lora_a @ x)


def add_adapters(model: GPT, rank: int, key: jax.Array) -> GPT:
    def linears(m: GPT) -> list[eqx.nn.Linear]:
        return [
            layer
            for b in m.blocks
            for layer in (
                b.attn.query_proj,
                b.attn.key_proj,
                b.attn.value_proj,
                b.attn.output_proj,
                b.fc,
                b.proj,
            )
        ]

    keys = jax.random.split(key, len(linears(model)))
    wrapped = [LoRALinear(lin, rank, key=k) for lin, k in zip(linears(model), keys, strict=True)]
    return eqx.tree_at(linears, model, wrapped)


def state_bytes(state) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state))


def train(params, static, optimizer, data, steps, seed):
    step = make_step(optimizer, static)
    opt_state = optimizer.init(params)
    losses = []
    for _, (x, y) in zip(range(steps), batches(data, 16, 64, seed), strict=False):
        params, opt_state, loss, _ = step(params, opt_state, x, y)
        losses.append(float(loss))
    return params, opt_state, losses


def main(pretrain_steps: int = 200, steps: int = 200, rank: int = 4, seed: int = 0) -> dict[str, float]:
    data, chars = corpus()
    pretrain_data, finetune_data = data[:300_000], data[300_000:]
    model = GPT(vocab=len(chars), dim=64, depth=2, heads=4, context=64, key=jax.random.key(seed))
    params, static = eqx.partition(model, eqx.is_array)
    params, _, losses = train(params, static, optax.adam(3e-3), pretrain_data, pretrain_steps, seed)
    print(f"pretrained {pretrain_steps} steps: loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f}")

    model = add_adapters(eqx.combine(params, static), rank, jax.random.key(seed + 1))
    params, static = eqx.partition(model, eqx.is_array)
    adapters = tg.glob("lora_{a,b}")
    summary = tg.explain(params, [(adapters, "train")], default="frozen").summary
    total = sum(entry["elements"] for entry in summary.values())
    for label, entry in summary.items():
        print(
            f"{label:>7}: {entry['leaves']:3d} leaves, {entry['elements']:7,d} elements ({entry['elements'] / total:.1%})"
        )

    x, y = next(batches(finetune_data, 256, 64, seed + 7))
    before = float(loss_fn(params, static, x, y))
    optimizer = tg.freeze(optax.adam(3e-3), ~adapters)
    tuned, opt_state, losses = train(params, static, optimizer, finetune_data, steps, seed + 1)
    after = float(loss_fn(tuned, static, x, y))

    frozen_bytes = state_bytes(opt_state)
    full_bytes = state_bytes(optax.adam(3e-3).init(params))
    moved = [
        path
        for path, old, new in zip(
            tg.paths(params), jax.tree.leaves(params), jax.tree.leaves(tuned), strict=True
        )
        if not np.array_equal(old, new)
    ]
    assert moved and all(p.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for p in moved), moved
    print(f"optimizer state: {frozen_bytes:,} bytes with freezing, {full_bytes:,} bytes without")
    print(f"params that moved: {len(moved)} adapter leaves, nothing else")
    print(f"fine-tune loss on held-out text: {before:.3f} -> {after:.3f}")
    return {"state_bytes": frozen_bytes, "full_state_bytes": full_bytes, "before": before, "after": after}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    main(**{k.replace("-", "_"): v for k, v in vars(parser.parse_args()).items()})
