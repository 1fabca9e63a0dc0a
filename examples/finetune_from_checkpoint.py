"""Fine-tune from a checkpoint whose names are another framework's, loaded by rules.

1. Pretrain the Quick start GPT (a list of blocks) briefly.
2. Save it as a Hugging Face GPT-2-style `.safetensors` file: `transformer.h.N...`
   names, query, key and value fused into one `attn.c_attn`, PyTorch `Conv1D`
   weights stored (in, out), and the causal-mask buffers old GPT-2 files carry.
3. Load it into a *scanned* GPT (the blocks stacked on a leading axis, run with
   `lax.scan`) that has a new head, through rename / transform / skip / ignore
   rules, and print the report of what was loaded.
4. Fine-tune on the language-modelling loss plus the new head's task: the
   language-modelling loss starts where pretraining ended.

The rules that are data (renames, skips, "transpose") can also be dry-run from
the command line on a checkpoint's header, `treeglob load-plan
examples/finetune_from_checkpoint.py:build_model CKPT --stacked blocks=1 ...`;
splitting the fused `c_attn` takes the Python functions below.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import train_gpt
from scanned_gpt import STACKED, ScannedGPT
from train_gpt import batches, corpus, loss_fn, make_step

import treeglob as tg


class TwoHeadGPT(ScannedGPT):
    """The scanned GPT with a second, new head: is the next character a space?"""

    space_head: eqx.nn.Linear

    def __init__(self, vocab: int, *, key: jax.Array):
        k1, k2 = jax.random.split(key)
        super().__init__(vocab=vocab, dim=64, depth=2, heads=4, context=64, key=k1)
        self.space_head = eqx.nn.Linear(64, 1, key=k2)

    def features(self, tokens: jax.Array) -> jax.Array:
        x = jax.vmap(self.embed)(tokens) + self.pos_embed[: tokens.shape[0]]
        layers, static = eqx.partition(self.blocks, eqx.is_array)
        x, _ = jax.lax.scan(lambda x, layer: (eqx.combine(layer, static)(x), None), x, layers)
        return jax.vmap(self.ln_f)(x)


def build_model(seed: int = 1) -> TwoHeadGPT:
    """The fine-tuning model (a factory for `treeglob load-plan` too)."""
    _, chars = corpus()
    return TwoHeadGPT(len(chars), key=jax.random.key(seed))


def to_hugging_face(params) -> dict[str, np.ndarray]:
    """The Quick start GPT's arrays under GPT-2's names and layouts, as an exporter writes them."""
    out = {"transformer.wte.weight": params.embed.weight, "transformer.wpe.weight": params.pos_embed}
    for i, b in enumerate(params.blocks):
        h, a = f"transformer.h.{i}", b.attn
        zeros = jnp.zeros_like(a.query_proj.bias)  # the model's key/value projections have no bias
        out |= {
            f"{h}.ln_1.weight": b.ln1.weight,
            f"{h}.ln_1.bias": b.ln1.bias,
            f"{h}.attn.c_attn.weight": jnp.concatenate(
                [a.query_proj.weight.T, a.key_proj.weight.T, a.value_proj.weight.T], 1
            ),
            f"{h}.attn.c_attn.bias": jnp.concatenate([a.query_proj.bias, zeros, zeros]),
            f"{h}.attn.c_proj.weight": a.output_proj.weight.T,
            f"{h}.attn.c_proj.bias": a.output_proj.bias,
            f"{h}.attn.bias": jnp.tril(jnp.ones((64, 64))),  # a causal-mask buffer, not a parameter
            f"{h}.ln_2.weight": b.ln2.weight,
            f"{h}.ln_2.bias": b.ln2.bias,
            f"{h}.mlp.c_fc.weight": b.fc.weight.T,
            f"{h}.mlp.c_fc.bias": b.fc.bias,
            f"{h}.mlp.c_proj.weight": b.proj.weight.T,
            f"{h}.mlp.c_proj.bias": b.proj.bias,
        }
    out |= {
        "transformer.ln_f.weight": params.ln_f.weight,
        "transformer.ln_f.bias": params.ln_f.bias,
        "lm_head.weight": params.head.weight,
        "lm_head.bias": params.head.bias,
    }
    return {name: np.asarray(value) for name, value in out.items()}


def third(k: int):
    """The k-th of query, key, value from a fused `c_attn` tensor, in Equinox's (out, in) layout."""

    def take(w: np.ndarray) -> np.ndarray:
        return np.split(w, 3, axis=-1)[k].T

    take.__name__ = f"third({k})"
    return take


#: GPT-2's names -> this model's paths, in order (each rule sees the previous ones' output).
RENAME = [
    ("^transformer.h", "blocks"),
    ("^transformer.wte", "embed"),
    ("^transformer.wpe.weight", "pos_embed"),
    ("^transformer.ln_f", "ln_f"),
    ("^lm_head", "head"),
    ("blocks.{i}.ln_{n}", "blocks.{i}.ln{n}"),
    ("mlp.c_fc", "fc"),
    ("mlp.c_proj", "proj"),
    ("attn.c_proj", "attn.output_proj"),
    ("attn.c_attn", ("attn.query_proj", "attn.key_proj", "attn.value_proj")),
]
#: By model path: split the fused tensor, turn (in, out) weights into (out, in).
TRANSFORM = [
    ("attn.query_proj", third(0)),
    ("attn.key_proj", third(1)),
    ("attn.value_proj", third(2)),
    ("{fc,proj,attn.output_proj}.weight", "transpose"),
]
SKIP = ["space_head"]  # new: kept as initialised
IGNORE = ["*.attn.bias$"]  # the mask buffers


def two_head_loss(params, static, x, y, is_space):
    model = eqx.combine(params, static)
    feats = jax.vmap(model.features)(x)
    logits = jax.vmap(jax.vmap(model.head))(feats)
    lm = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    space = jax.vmap(jax.vmap(model.space_head))(feats)[..., 0]
    return lm + optax.sigmoid_binary_cross_entropy(space, is_space).mean(), lm


def main(pretrain_steps: int = 300, steps: int = 100, seed: int = 0) -> tuple[float, float]:
    data, chars = corpus()
    space = chars.index(" ")
    train = batches(data, 16, 64, seed)
    held_out = next(batches(data, 64, 64, seed + 1))

    # 1. Pretrain the list-of-blocks GPT.
    params, static = eqx.partition(train_gpt.build_model(seed), eqx.is_array)
    optimizer = optax.adamw(3e-3, weight_decay=0.1, mask=tg.decay_mask())
    opt_state, step = optimizer.init(params), make_step(optimizer, static)
    for _, (x, y) in zip(range(pretrain_steps), train, strict=False):
        params, opt_state, _, _ = step(params, opt_state, x, y)
    pretrained_loss = float(loss_fn(params, static, *held_out))
    print(f"pretrained {pretrain_steps} steps: held-out loss {pretrained_loss:.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        # 2. Export under GPT-2's names.
        path = pathlib.Path(tmp) / "gpt2-style.safetensors"
        tg.save(path, to_hugging_face(params))

        # 3. Load into the scanned two-head model.
        model, report = tg.load(
            build_model(seed + 1),
            path,
            rename=RENAME,
            transform=TRANSFORM,
            skip=SKIP,
            ignore=IGNORE,
            stacked=STACKED,
        )
    print(report)
    print()

    # 4. Fine-tune both heads.
    params, static = eqx.partition(model, eqx.is_array)
    x, y = held_out
    _, loaded_loss = two_head_loss(params, static, x, y, (y == space).astype(jnp.float32))
    print(f"loaded into the scanned model: held-out LM loss {float(loaded_loss):.4f}")
    optimizer = optax.adamw(1e-3, weight_decay=0.1, mask=tg.decay_mask(stacked=STACKED))
    opt_state = optimizer.init(params)

    @jax.jit
    def finetune_step(params, opt_state, x, y):
        (_, lm), grads = jax.value_and_grad(two_head_loss, has_aux=True)(
            params, static, x, y, (y == space).astype(jnp.float32)
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, lm

    for i, (x, y) in zip(range(1, steps + 1), train, strict=False):
        params, opt_state, lm = finetune_step(params, opt_state, x, y)
        if i == 1 or i % 25 == 0 or i == steps:
            print(f"fine-tune step {i:4d}  LM loss {float(lm):.3f}")
    return pretrained_loss, float(loaded_loss)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    main(**{k.replace("-", "_"): v for k, v in vars(parser.parse_args()).items()})
