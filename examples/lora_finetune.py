"""LoRA fine-tuning by selector: adapters on the attention's query and value projections in one call.

Pretrains the small GPT of `train_gpt.py` on one part of the pydoc text, then

1. wraps every `attn.query_proj` and `attn.value_proj` in a `LoRALinear`
   (`W x + B A x`, `B = 0` at the start, so the model is unchanged) with one
   `treeglob.replace_modules` call;
2. fine-tunes only the adapters on another part of the text. With
   `--freeze gradient` (the default) the model is split with
   `treeglob.partition` and only the adapters are differentiated; with
   `--freeze optimizer` every gradient is computed and
   `treeglob.freeze(optax.adam(...), ~adapters)` drops the frozen ones;
3. merges the adapters back into plain `eqx.nn.Linear` layers with a second
   `replace_modules` call, and checks the merged model computes what the
   adapted one does.

    python examples/lora_finetune.py --pretrain-steps 200 --steps 200

`LoRALinear` lives here, not in treeglob: treeglob chooses and replaces
modules, and the adapter itself (rank, scaling, initialisation, dropout, DoRA
and the other variants) is model code that each project writes its own way;
Flax NNX ships its own (`nnx.LoRA`, see `nnx_gpt.py`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from train_gpt import GPT, batches, corpus

import treeglob as tg

#: Where the adapters go, and what trains.
TARGETS = "attn.{query,value}_proj"
ADAPTERS = tg.glob("lora_{a,b}")


class LoRALinear(eqx.Module):
    """An `eqx.nn.Linear` plus a low-rank update `scale * B A`, with `B = 0` at the start."""

    base: eqx.nn.Linear
    lora_a: jax.Array  # (rank, in_features)
    lora_b: jax.Array  # (out_features, rank)
    scale: float = eqx.field(static=True)

    def __init__(self, base: eqx.nn.Linear, rank: int, *, alpha: float | None = None, key: jax.Array):
        self.base = base
        self.lora_a = jax.random.normal(key, (rank, base.weight.shape[1])) / base.weight.shape[1] ** 0.5
        self.lora_b = jnp.zeros((base.weight.shape[0], rank))
        self.scale = (alpha if alpha is not None else rank) / rank

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        return self.base(x) + self.scale * (self.lora_b @ (self.lora_a @ x))

    def merge(self) -> eqx.nn.Linear:
        """The plain Linear that computes the same function: `W + scale * B A`."""
        merged = self.base.weight + self.scale * self.lora_b @ self.lora_a
        return eqx.tree_at(lambda linear: linear.weight, self.base, merged)


def add_adapters(model: Any, rank: int, key: jax.Array) -> Any:
    """The model with a `LoRALinear` around each query and value projection."""
    return tg.replace_modules(model, TARGETS, lambda linear, key: LoRALinear(linear, rank, key=key), key=key)


def merge_adapters(model: Any) -> Any:
    """The model with each `LoRALinear` merged back into a plain Linear."""
    return tg.replace_modules(model, LoRALinear, LoRALinear.merge)


def split(model: Any, freeze: str) -> tuple[Any, Any, Any, optax.GradientTransformation]:
    """`(trainable, frozen, static, optimizer)` for a freezing mode.

    `trainable` is what is differentiated, `frozen` the other arrays (passed to the
    step, never differentiated), `static` the rest (activation functions).
      full:      everything trains;
      optimizer: every gradient is computed, `tg.freeze` drops the frozen ones;
      gradient:  only the adapters are differentiated (`tg.partition`).
    """
    arrays, static = eqx.partition(model, eqx.is_array)
    adam, nothing = optax.adam(3e-3), eqx.filter(arrays, False)
    if freeze == "full":
        return arrays, nothing, static, adam
    if freeze == "optimizer":
        return arrays, nothing, static, tg.freeze(adam, ~ADAPTERS)
    trainable, frozen = tg.partition(arrays, ADAPTERS)
    return trainable, frozen, static, adam


def make_step(static: Any, optimizer: optax.GradientTransformation) -> Callable[..., Any]:
    """A jitted step `(trainable, frozen, opt_state, x, y) -> (trainable, opt_state, loss)`."""

    def loss_fn(trainable, frozen, x, y):
        model = eqx.combine(trainable, frozen, static)
        logits = jax.vmap(model)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(trainable, frozen, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def train(model: Any, freeze: str, data: np.ndarray, steps: int, seed: int) -> tuple[Any, Any, list[float]]:
    """Train `model` in a freezing mode: (the trained model, the optimizer state, the losses)."""
    trainable, frozen, static, optimizer = split(model, freeze)
    step = make_step(static, optimizer)
    opt_state = optimizer.init(trainable)
    losses = []
    print("compiling the training step (the first step takes a few seconds)...")
    for i, (x, y) in zip(range(1, steps + 1), batches(data, 16, 64, seed), strict=False):
        trainable, opt_state, loss = step(trainable, frozen, opt_state, x, y)
        losses.append(float(loss))
        if i == 1 or i % 100 == 0:
            print(f"step {i:5d}  loss {losses[-1]:.3f}")
    return eqx.combine(trainable, frozen, static), opt_state, losses


def state_bytes(state: Any) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state))


def main(
    pretrain_steps: int = 200, steps: int = 200, rank: int = 4, seed: int = 0, freeze: str = "gradient"
) -> dict[str, float]:
    data, chars = corpus()
    pretrain_data, finetune_data = data[:300_000], data[300_000:]
    model = GPT(vocab=len(chars), dim=64, depth=2, heads=4, context=64, key=jax.random.key(seed))
    model, _, losses = train(model, "full", pretrain_data, pretrain_steps, seed)
    print(f"pretrained {pretrain_steps} steps: loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f}")

    # 1. Adapters on the query and value projections, in one call.
    print(tg.modules(model, TARGETS))
    lora = add_adapters(model, rank, jax.random.key(seed + 1))
    x, y = next(batches(finetune_data, 64, 64, seed + 7))
    base_out, lora_out = jax.vmap(model)(x), jax.vmap(lora)(x)
    assert np.allclose(base_out, lora_out), "B = 0: the adapted model computes what the base model does"
    summary = tg.explain(eqx.filter(lora, eqx.is_array), [(ADAPTERS, "train")], default="frozen").summary
    total = sum(entry["elements"] for entry in summary.values())
    for label, entry in summary.items():
        print(
            f"{label:>7}: {entry['leaves']:3d} leaves, {entry['elements']:7,d} elements "
            f"({entry['elements'] / total:.1%})"
        )

    # 2. Fine-tune the adapters only.
    before = float(optax.softmax_cross_entropy_with_integer_labels(lora_out, y).mean())
    tuned, opt_state, _ = train(lora, freeze, finetune_data, steps, seed + 1)
    tuned_out = jax.vmap(tuned)(x)
    after = float(optax.softmax_cross_entropy_with_integer_labels(tuned_out, y).mean())
    old, new = eqx.filter(lora, eqx.is_array), eqx.filter(tuned, eqx.is_array)
    moved = [
        path
        for path, a, b in zip(tg.paths(old), jax.tree.leaves(old), jax.tree.leaves(new), strict=True)
        if not np.array_equal(a, b)
    ]
    assert moved and all(p.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for p in moved), moved
    print(f"freezing on the {freeze} side: {len(moved)} adapter leaves moved, nothing else")
    print(f"optimizer state: {state_bytes(opt_state):,} bytes")
    print(f"fine-tune loss on held-out text: {before:.3f} -> {after:.3f}")

    # 3. Merge the adapters back into plain Linear layers.
    merged = merge_adapters(tuned)
    gap = float(jnp.abs(jax.vmap(merged)(x) - tuned_out).max())
    assert not tg.modules(merged, LoRALinear, strict=False) and gap < 1e-4, gap
    print(
        f"merged: {len(tg.modules(tuned, LoRALinear))} adapters folded into Linear weights (max gap {gap:.1e})"
    )
    return {"state_bytes": state_bytes(opt_state), "before": before, "after": after, "merge_gap": gap}


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # each line shows as it is printed, also in a pipe
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--freeze", choices=["gradient", "optimizer"], default="gradient")
    main(**{k.replace("-", "_"): v for k, v in vars(parser.parse_args()).items()})
