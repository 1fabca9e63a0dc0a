"""Flax NNX under nnx.Optimizer: per-group schedules, weight-decay rates and gradual unfreezing
(through a Treatment) move each parameter as the treatment table says, step by step under
nnx.jit, a Variable-type rule (nnx.LoRAParam) included."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

nnx = pytest.importorskip("flax.nnx", reason="the NNX tests need flax (pip install '.[test]')")

import treeglob as tg  # noqa: E402

D, STEPS = 4, 5


class Block(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.LoRA(D, 2, D, base_module=nnx.Linear(D, D, rngs=rngs), rngs=rngs)
        self.norm = nnx.LayerNorm(D, rngs=rngs)


class Net(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(6, D, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(2)])
        self.head = nnx.Linear(D, 2, rngs=rngs)


def treatment():
    return tg.Treatment(
        learning_rate=optax.linear_schedule(0.1, 0.02, STEPS),
        lr_scale=[(nnx.LoRAParam, optax.linear_schedule(0.0, 2.0, 3)), ("head", 0.5)],
        layer_decay={"decay": 0.5, "rules": [("embed", 0)]},
        weight_decay=[(tg.inside(nnx.Embed), 0.01), (tg.ndim >= 2, 0.1)],
        unfreeze=[("head", 0), ("blocks.1", 1), ("blocks.0", 3)],
    )


def params_by_path(model):
    state = nnx.state(model, nnx.Param)
    return dict(zip(tg.paths(state), map(np.array, jax.tree.leaves(state)), strict=True))


def test_nnx_optimizer_moves_each_param_as_the_table_says():
    model = Net(nnx.Rngs(0))
    plan = treatment()
    table = plan.table(nnx.state(model, nnx.Param), steps=range(STEPS), types_from=model)
    row = {path: i for i, path in enumerate(table.paths)}
    optimizer = nnx.Optimizer(model, plan.optimizer(optax.identity(), types_from=model), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        optimizer.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param)))

    for k in range(STEPS):
        before = params_by_path(model)
        step(model, optimizer)
        after = params_by_path(model)
        assert set(before) == set(row)
        for path, p in before.items():
            i = row[path]
            lr, rate, trained = table.lr[k][i], table.weight_decay[k][i], table.trained[k][i]
            expected = p - lr * (1 + rate * p) if trained else p
            np.testing.assert_allclose(after[path], expected, rtol=2e-6, atol=1e-8, err_msg=f"{path} @ {k}")
    # The adapters start at 0 (their schedule), blocks.0 trains from step 3, the embedding decays at 0.01.
    assert table.lr[0][row["blocks.1.fc.lora_a"]] == 0 and not table.trained[2][row["blocks.0.fc.lora_a"]]
    assert table.weight_decay[0][row["embed.embedding"]] == pytest.approx(0.01)
