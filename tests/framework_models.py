"""The same small GPT written the way each framework's users write it: Flax NNX, Flax Linen
(Hugging Face's Flax GPT-2 names), Haiku (its default module names)."""

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
from flax import nnx

VOCAB, DIM, DEPTH, HEADS, CONTEXT = 11, 8, 2, 2, 6


# ----------------------------------------------------------------------------
# Flax NNX


class NNXBlock(nnx.Module):
    def __init__(self, dim, heads, *, rngs, lora_rank=0):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        if lora_rank:
            self.fc = nnx.LoRA(
                dim, lora_rank, 4 * dim, base_module=nnx.Linear(dim, 4 * dim, rngs=rngs), rngs=rngs
            )
        else:
            self.fc = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.proj = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, mask=nnx.make_causal_mask(x[..., 0]))
        return x + self.proj(jax.nn.gelu(self.fc(self.ln2(x))))


class NNXGPT(nnx.Module):
    def __init__(self, *, rngs, depth=DEPTH, lora_rank=0):
        self.wte = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.wpe = nnx.Param(jax.random.normal(rngs.params(), (CONTEXT, DIM)) * 0.02)
        self.blocks = nnx.List([NNXBlock(DIM, HEADS, rngs=rngs, lora_rank=lora_rank) for _ in range(depth)])
        self.ln_f = nnx.LayerNorm(DIM, rngs=rngs)
        self.head = nnx.Linear(DIM, VOCAB, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.wte(tokens) + self.wpe[: tokens.shape[-1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# ----------------------------------------------------------------------------
# Flax Linen, with the names of Hugging Face's FlaxGPT2Model


class LinenAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q, k, v = jnp.split(nn.Dense(3 * DIM, name="c_attn")(x), 3, axis=-1)
        w = jax.nn.softmax(q @ k.T / jnp.sqrt(DIM) + jnp.triu(jnp.full((len(x), len(x)), -1e9), 1))
        return nn.Dense(DIM, name="c_proj")(w @ v)


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(DIM, name="c_proj")(jax.nn.gelu(nn.Dense(4 * DIM, name="c_fc")(x)))


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + LinenAttention(name="attn")(nn.LayerNorm(name="ln_1")(x))
        return x + LinenMLP(name="mlp")(nn.LayerNorm(name="ln_2")(x))


class LinenGPT(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, DIM, name="wte")(tokens) + nn.Embed(CONTEXT, DIM, name="wpe")(
            jnp.arange(len(tokens))
        )
        for i in range(DEPTH):
            x = LinenBlock(name=f"h_{i}")(x)
        return nn.Dense(VOCAB, use_bias=False, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


def linen_params():
    return LinenGPT().init(jax.random.key(0), jnp.arange(CONTEXT) % VOCAB)["params"]


# ----------------------------------------------------------------------------
# Haiku, with its own module names


class HaikuBlock(hk.Module):
    def __call__(self, x):
        h = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)(x)
        x = x + hk.MultiHeadAttention(HEADS, DIM // HEADS, w_init=hk.initializers.VarianceScaling())(h, h, h)
        h = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)(x)
        return x + hk.Linear(DIM)(jax.nn.gelu(hk.Linear(4 * DIM)(h)))


def haiku_forward(tokens):
    x = hk.Embed(VOCAB, DIM)(tokens)
    x = x + hk.get_parameter(
        "positional_embeddings", [CONTEXT, DIM], init=hk.initializers.TruncatedNormal(0.02)
    )
    for _ in range(DEPTH):
        x = HaikuBlock()(x)
    x = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)(x)
    return hk.Linear(VOCAB, with_bias=False)(x)


def haiku_params():
    return hk.transform(haiku_forward).init(jax.random.key(0), jnp.arange(CONTEXT) % VOCAB)
