"""ViT fine-tuning with layer-wise learning-rate decay and timm's weight-decay convention.

A small Vision Transformer with timm's parameter names (`cls_token`,
`pos_embed`, `patch_embed.proj`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,
mlp.fc1,mlp.fc2}`, `norm`, `head`) is pretrained to tell horizontal from
vertical bars in generated 16x16 images, gets a new 4-way head, and is
fine-tuned to also tell the two diagonals apart with one `treeglob.Treatment`:
gradual unfreezing from the top, a warmup of its own for the new head,
layer-wise learning-rate decay (timm's `lr_scale` values) and weight-decay
rates by group. One optimizer, one state; the treatment table printed before
training shows each parameter's learning rate, decay rate and frozen steps at
the start, at each unfreezing step and at the end.

    python examples/vit_finetune.py --pretrain-steps 150 --steps 150
"""

from __future__ import annotations

import argparse
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import treeglob as tg

SIZE, PATCH = 16, 4


class PatchEmbed(eqx.Module):
    proj: eqx.nn.Conv2d

    def __init__(self, dim: int, *, key: jax.Array):
        self.proj = eqx.nn.Conv2d(1, dim, PATCH, stride=PATCH, key=key)

    def __call__(self, image: jax.Array) -> jax.Array:
        return self.proj(image[None]).reshape(self.proj.out_channels, -1).T  # (patches, dim)


class Attention(eqx.Module):
    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    heads: int = eqx.field(static=True)

    def __init__(self, dim: int, heads: int, *, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.qkv = eqx.nn.Linear(dim, 3 * dim, key=k1)
        self.proj = eqx.nn.Linear(dim, dim, key=k2)
        self.heads = heads

    def __call__(self, x: jax.Array) -> jax.Array:
        n, d = x.shape
        q, k, v = jnp.split(jax.vmap(self.qkv)(x).reshape(n, 3, self.heads, d // self.heads), 3, axis=1)
        weights = jax.nn.softmax(jnp.einsum("qhd,khd->hqk", q[:, 0], k[:, 0]) / (d // self.heads) ** 0.5)
        return jax.vmap(self.proj)(jnp.einsum("hqk,khd->qhd", weights, v[:, 0]).reshape(n, d))


class Mlp(eqx.Module):
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, dim: int, *, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.fc1 = eqx.nn.Linear(dim, 4 * dim, key=k1)
        self.fc2 = eqx.nn.Linear(4 * dim, dim, key=k2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class Block(eqx.Module):
    norm1: eqx.nn.LayerNorm
    attn: Attention
    norm2: eqx.nn.LayerNorm
    mlp: Mlp

    def __init__(self, dim: int, heads: int, *, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.norm1, self.norm2 = eqx.nn.LayerNorm(dim), eqx.nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, key=k1)
        self.mlp = Mlp(dim, key=k2)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(jax.vmap(self.norm1)(x))
        return x + jax.vmap(lambda t: self.mlp(self.norm2(t)))(x)


class ViT(eqx.Module):
    cls_token: jax.Array
    pos_embed: jax.Array
    patch_embed: PatchEmbed
    blocks: list[Block]
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, classes: int, dim: int = 32, depth: int = 4, heads: int = 2, *, key: jax.Array):
        keys = jax.random.split(key, depth + 4)
        patches = (SIZE // PATCH) ** 2
        self.cls_token = 0.02 * jax.random.normal(keys[0], (1, dim))
        self.pos_embed = 0.02 * jax.random.normal(keys[1], (patches + 1, dim))
        self.patch_embed = PatchEmbed(dim, key=keys[2])
        self.blocks = [Block(dim, heads, key=k) for k in keys[4:]]
        self.norm = eqx.nn.LayerNorm(dim)
        self.head = eqx.nn.Linear(dim, classes, key=keys[3])

    def __call__(self, image: jax.Array) -> jax.Array:
        x = jnp.concatenate([self.cls_token, self.patch_embed(image)]) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[0]))


def bars(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images of one bar each: horizontal, vertical, diagonal, anti-diagonal."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = 0.3 * rng.normal(size=(n, SIZE, SIZE)).astype(np.float32)
    r, c = np.indices((SIZE, SIZE))
    for img, label, offset in zip(images, labels, rng.integers(-5, 6, n), strict=True):
        line = [
            r == SIZE // 2 + offset,
            c == SIZE // 2 + offset,
            r - c == offset,
            r + c == SIZE - 1 + offset,
        ][label]
        img[line] += 1.0
    return images, labels.astype(np.int32)


def train(params, static, optimizer, classes, steps, seed):
    images, labels = bars(4096, classes, seed)

    def loss_fn(p, x, y):
        logits = jax.vmap(eqx.combine(p, static))(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    print("compiling the training step (the first step takes a few seconds)...")
    for i in range(1, steps + 1):
        idx = rng.integers(0, len(images), 64)
        params, state, loss = step(params, state, images[idx], labels[idx])
        if i == 1 or i % 100 == 0:
            print(f"step {i:5d}  loss {float(loss):.3f}")
    test_x, test_y = bars(1024, classes, seed + 1000)
    accuracy = float(jnp.mean(jnp.argmax(jax.vmap(eqx.combine(params, static))(test_x), -1) == test_y))
    return params, accuracy


def main(pretrain_steps: int = 150, steps: int = 150, decay: float = 0.75, seed: int = 0) -> float:
    model = ViT(classes=2, key=jax.random.key(seed))
    params, static = eqx.partition(model, eqx.is_array)
    params, accuracy = train(params, static, optax.adamw(1e-3), 2, pretrain_steps, seed)
    print(f"pretrained on 2 classes: test accuracy {accuracy:.1%}")

    # A fresh 4-way head, then fine-tune with one Treatment: the optimizer and its table.
    model = eqx.tree_at(
        lambda m: m.head, eqx.combine(params, static), eqx.nn.Linear(32, 4, key=jax.random.key(seed + 1))
    )
    params, static = eqx.partition(model, eqx.is_array)
    treatment = fine_tuning(steps, decay)
    print(treatment.table(params, steps=[0, steps // 3, 2 * steps // 3, steps - 1]))
    _, accuracy = train(params, static, treatment.optimizer(optax.scale_by_adam()), 4, steps, seed + 2)
    print(f"fine-tuned on 4 classes: test accuracy {accuracy:.1%}")
    return accuracy


def fine_tuning(steps: int, decay: float) -> tg.Treatment:
    """Gradual unfreezing from the top, a warmup of its own for the new head, layer-wise
    learning-rate decay, and weight-decay rates by group (timm's convention, with the ViT's
    no_weight_decay() names and a smaller rate on the patch embedding)."""
    tokens = tg.optional(["^cls_token$", "^pos_embed$"])
    return tg.Treatment(
        learning_rate=optax.warmup_cosine_decay_schedule(0.0, 2e-3, max(1, steps // 10), steps),
        lr_scale=[("head", optax.linear_schedule(0.1, 1.0, transition_steps=max(1, steps // 3)))],
        layer_decay=decay,
        weight_decay=[
            (tokens, 0.0),
            ("patch_embed.proj.weight", 0.01),
            *tg.relabel(tg.presets.TIMM, {"decay": 0.05, "no_decay": 0.0}),
        ],
        # The head and the final norm first, then the top blocks, then everything.
        unfreeze=[
            ("blocks.{2..3}", steps // 3),
            (tg.glob("blocks.{0..1}") | tokens | "patch_embed", 2 * steps // 3),
        ],
        labels=[(tokens, "no_decay"), *tg.presets.TIMM],
    )


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # each line shows as it is printed, also in a pipe
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--decay", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=0)
    main(**{k.replace("-", "_"): v for k, v in vars(parser.parse_args()).items()})
