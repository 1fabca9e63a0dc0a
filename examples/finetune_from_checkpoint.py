"""Fine-tune from a checkpoint in another framework's names, and export back to them, by rules.

The rules are data, in `gpt2_rules.toml`: GPT-2's names (`transformer.h.N...`),
its fused `attn.c_attn` split into query, key and value, and PyTorch `Conv1D`
weights stored (in, out). One rule set serves both directions.

1. Pretrain the Quick start GPT (a list of blocks) briefly.
2. Export it under GPT-2's names as a sharded Hugging Face checkpoint (files of
   at most 200 kB and `model.safetensors.index.json`).
3. Load that into a *scanned* GPT (the blocks stacked on a leading axis, run
   with `lax.scan`) that has a new head, through the rules and a skip for the
   new head, and print the report of what was loaded.
4. Fine-tune on the language-modelling loss plus the new head's task: the
   language-modelling loss starts where pretraining ended.
5. Export the fine-tuned model back under GPT-2's names, sharded.

    python examples/finetune_from_checkpoint.py --out /tmp/gpt2

keeps both checkpoints (`/tmp/gpt2/pretrained`, `/tmp/gpt2/finetuned`); the
load plan can then be read from the command line, from headers only:

    treeglob load-plan examples/finetune_from_checkpoint.py:build_model /tmp/gpt2/pretrained \\
        --rules examples/gpt2_rules.toml --skip space_head --stacked blocks=1
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import equinox as eqx
import jax
import jax.numpy as jnp
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


#: GPT-2's names and layouts -> this model's, as data: renames (with the fused `c_attn`
#: feeding query, key and value) and transforms (its thirds, Conv1D's (in, out) weights
#: transposed). `load` reads GPT-2 names with them; `save` writes GPT-2 names with them.
RULES = tg.load_transfer(pathlib.Path(__file__).with_name("gpt2_rules.toml"))
#: The two-head model's rules: the new head is kept as initialised on load, and is not
#: GPT-2's on export.
TWO_HEAD_RULES = RULES._replace(skip=["space_head"])._asdict()
SHARD = 200_000  # bytes per file: a small model written as a sharded checkpoint


def two_head_loss(params, static, x, y, is_space):
    model = eqx.combine(params, static)
    feats = jax.vmap(model.features)(x)
    logits = jax.vmap(jax.vmap(model.head))(feats)
    lm = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    space = jax.vmap(jax.vmap(model.space_head))(feats)[..., 0]
    return lm + optax.sigmoid_binary_cross_entropy(space, is_space).mean(), lm


def main(
    pretrain_steps: int = 300, steps: int = 100, seed: int = 0, out_dir: str | None = None
) -> tuple[float, float, TwoHeadGPT]:
    """Returns the pretrained and the loaded held-out loss, and the fine-tuned model, which
    `out_dir/finetuned` holds under GPT-2's names (in a temporary directory, removed at the
    end, without `out_dir`)."""
    data, chars = corpus()
    space = chars.index(" ")
    train = batches(data, 16, 64, seed)
    held_out = next(batches(data, 64, 64, seed + 1))

    # 1. Pretrain the list-of-blocks GPT.
    params, static = eqx.partition(train_gpt.build_model(seed), eqx.is_array)
    optimizer = optax.adamw(3e-3, weight_decay=0.1, mask=tg.decay_mask())
    opt_state, step = optimizer.init(params), make_step(optimizer, static)
    print("compiling the training step (the first step takes a few seconds)...")
    for i, (x, y) in zip(range(1, pretrain_steps + 1), train, strict=False):
        params, opt_state, loss, _ = step(params, opt_state, x, y)
        if i == 1 or i % 100 == 0:
            print(f"pretrain step {i:4d}  loss {float(loss):.3f}")
    pretrained_loss = float(loss_fn(params, static, *held_out))
    print(f"pretrained {pretrain_steps} steps: held-out loss {pretrained_loss:.4f}")

    scratch = None if out_dir else tempfile.TemporaryDirectory()
    out = pathlib.Path(out_dir or scratch.name)  # type: ignore[union-attr]
    for name in ("pretrained", "finetuned"):
        (out / name).mkdir(parents=True, exist_ok=True)

    # 2. Export under GPT-2's names, sharded.
    tg.save(out / "pretrained" / "model.safetensors", params, max_shard_size=SHARD, **RULES._asdict())
    print(f"exported: {', '.join(sorted(p.name for p in (out / 'pretrained').iterdir()))}")

    # 3. Load into the scanned two-head model: the directory is one source.
    model, report = tg.load(build_model(seed + 1), out / "pretrained", stacked=STACKED, **TWO_HEAD_RULES)
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

    print("compiling the training step (the first step takes a few seconds)...")
    for i, (x, y) in zip(range(1, steps + 1), train, strict=False):
        params, opt_state, lm = finetune_step(params, opt_state, x, y)
        if i == 1 or i % 25 == 0 or i == steps:
            print(f"fine-tune step {i:4d}  LM loss {float(lm):.3f}")

    # 5. Export back under GPT-2's names: the new head is not GPT-2's.
    model = eqx.combine(params, static)
    tg.save(
        out / "finetuned" / "model.safetensors",
        model,
        stacked=STACKED,
        max_shard_size=SHARD,
        **TWO_HEAD_RULES,
    )
    print(f"exported the fine-tuned model to {out / 'finetuned'}")
    if scratch is not None:
        scratch.cleanup()
    return pretrained_loss, float(loaded_loss), model


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # each line shows as it is printed, also in a pipe
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", dest="out_dir", help="keep the checkpoints in this directory")
    main(**vars(parser.parse_args()))
