"""`shardings` on 8 host devices (in a subprocess: the device count is fixed when JAX starts)."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import treeglob as tg

SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np, pytest, treeglob as tg
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 8
    # Auto axes where JAX has axis types (newer releases default to Explicit ones).
    auto = getattr(jax.sharding, "AxisType", None)
    mesh = jax.make_mesh((2, 4), ("data", "model"), **({"axis_types": (auto.Auto,) * 2} if auto else {}))
    params = {
        "blocks": {"w": np.ones((3, 16, 8), np.float32), "b": np.ones((3, 16), np.float32)},
        "head": np.ones((8, 6), np.float32),
    }
    rules = [("*.w", P("model", "data")), ("*.b", P("model"))]
    specs = tg.shardings(params, rules, mesh, stacked={"blocks": 1})
    assert specs["blocks"]["w"].spec == P(None, "model", "data"), specs
    assert specs["head"].spec == P()
    placed = jax.device_put(params, specs)
    assert placed["blocks"]["w"].addressable_shards[0].data.shape == (3, 4, 4)
    assert placed["blocks"]["b"].addressable_shards[0].data.shape == (3, 4)
    assert placed["head"].addressable_shards[0].data.shape == (8, 6)
    out = jax.jit(lambda p: jax.tree.map(lambda x: 2 * x, p), out_shardings=specs)(placed)
    assert out["blocks"]["w"].sharding == specs["blocks"]["w"]

    for rule, message in [
        (("head", P(None, "model")), r"splits dimension 1 of size 6 over 'model' \\(4 devices\\), which does not divide it"),
        (("head", P(None, ("data", "model"))), r"splits dimension 1 of size 6 over \\('data', 'model'\\) \\(8 devices\\)"),
        (("head", P("modle")), r"uses the mesh axis 'modle', which the mesh lacks; its axes are \\['data', 'model'\\]"),
        (("head", P(None, None, "model")), r"names 3 dimensions but the array has 2"),
    ]:
        with pytest.raises(ValueError, match=message):
            tg.shardings(params, [rule], mesh, stacked={"blocks": 1})
    print("ok")
    """
)


@pytest.mark.slow
def test_shardings_on_8_host_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_shardings_argument_errors():
    mesh = jax.make_mesh((1,), ("model",))
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        tg.shardings({"w": np.ones(2)}, [], "mesh")
    with pytest.raises(
        TypeError, match=r"The label of w is 'model'; shardings\(\) needs PartitionSpec labels"
    ):
        tg.shardings({"w": np.ones(2)}, [("w", "model")], mesh)
    with pytest.raises(TypeError, match=r"act is not an array \(str\).*eqx.filter\(model, eqx.is_array\)"):
        tg.shardings({"w": np.ones(2), "act": "relu"}, [], mesh)
