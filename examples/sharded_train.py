"""Data + model parallel training on 8 host devices, params sharded by treeglob rules.

The GPT of `train_gpt.py` on a 2 x 4 mesh (`data`, `model`): attention and
MLP matrices are split Megatron-style over `model` by path rules, the batch
over `data`, and everything else is replicated. `treeglob.shardings` checks
every spec against its leaf (dimensions, mesh axes, divisibility) and gives
the `NamedSharding` tree for `jax.device_put` and the jitted step. The same
steps run on a single device for comparison: the losses agree.

    python examples/sharded_train.py --steps 20

The script asks XLA for 8 CPU devices itself (it must happen before JAX is
imported); on a machine with 8 accelerators it uses those.
"""

from __future__ import annotations

import argparse
import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import (
    NamedSharding,  # noqa: E402
    PartitionSpec as P,  # noqa: E402
)
from train_gpt import GPT, batches, corpus, loss_fn  # noqa: E402

import treeglob as tg  # noqa: E402

#: Megatron-style tensor parallelism. Equinox Linear weights are (out, in):
#: column-parallel layers split dim 0, row-parallel layers dim 1.
SHARDING_RULES = [
    ("attn.{query_proj,key_proj,value_proj}.weight", P("model", None)),
    ("attn.query_proj.bias", P("model")),
    ("attn.output_proj.weight", P(None, "model")),
    ("fc.weight", P("model", None)),
    ("fc.bias", P("model")),
    ("^blocks.*.proj.weight", P(None, "model")),
    ("{embed,head}.weight", P(None, "model")),
]


def make_step(optimizer, static, param_shardings=None):
    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, static, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if param_shardings is not None:
            params = jax.lax.with_sharding_constraint(params, param_shardings)
        return params, opt_state, loss

    return step


def run(params, static, optimizer, data, steps, seed, param_shardings=None, batch_sharding=None):
    step = make_step(optimizer, static, param_shardings)
    opt_state = optimizer.init(params)
    losses = []
    print("compiling the training step (the first step takes a few seconds)...")
    for _, (x, y) in zip(range(steps), batches(data, 16, 64, seed), strict=False):
        if batch_sharding is not None:
            x, y = jax.device_put((x, y), batch_sharding)
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(float(loss))
    return params, losses


def main(steps: int = 20, seed: int = 0) -> tuple[list[float], list[float]]:
    if jax.device_count() < 8:
        raise SystemExit(f"needs 8 devices, found {jax.device_count()}: set XLA_FLAGS before JAX starts")
    data, chars = corpus()
    model = GPT(vocab=len(chars), dim=64, depth=2, heads=4, context=64, key=jax.random.key(seed))
    params, static = eqx.partition(model, eqx.is_array)
    optimizer = optax.adamw(3e-3, weight_decay=0.1, mask=tg.decay_mask())

    auto = (jax.sharding.AxisType.Auto,) * 2  # let XLA place the intermediates (GSPMD)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=auto, devices=jax.devices()[:8])
    for spec, entry in tg.explain(params, SHARDING_RULES, default=P()).summary.items():
        print(f"{spec!s:18} {entry['leaves']:3d} leaves {entry['elements']:8,d} elements")
    param_shardings = tg.shardings(params, SHARDING_RULES, mesh)
    sharded = jax.device_put(params, param_shardings)
    fc = sharded.blocks[0].fc.weight
    print(
        f"blocks.0.fc.weight {fc.shape} -> {fc.sharding.spec}, {fc.addressable_shards[0].data.shape} per device"
    )

    trained, sharded_losses = run(
        sharded, static, optimizer, data, steps, seed, param_shardings, NamedSharding(mesh, P("data", None))
    )
    assert trained.blocks[0].fc.weight.sharding.is_equivalent_to(param_shardings.blocks[0].fc.weight, 2)
    single = jax.device_put(params, jax.devices()[0])
    _, single_losses = run(single, static, optimizer, data, steps, seed)
    for i, (a, b) in enumerate(zip(sharded_losses, single_losses, strict=True)):
        if i < 3 or i == steps - 1:
            print(f"step {i + 1:3d}  loss sharded {a:.6f}  single device {b:.6f}")
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=2e-5)
    print(f"sharded and single-device losses agree over {steps} steps")
    return sharded_losses, single_losses


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # each line shows as it is printed, also in a pipe
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    main(**vars(parser.parse_args()))
