"""`shardings` on 8 host devices (in a subprocess: the device count is fixed when JAX starts)."""

import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

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
    with pytest.raises(
        TypeError, match=r"^mesh must be a jax.sharding.Mesh \(e.g. jax.make_mesh\(...\)\), got str.$"
    ):
        tg.shardings({"w": np.ones(2)}, [], "mesh")
    with pytest.raises(
        TypeError, match=r"The label of w is 'model'; shardings\(\) needs PartitionSpec labels"
    ):
        tg.shardings({"w": np.ones(2)}, [("w", "model")], mesh)
    message = (
        "act is not an array (str); shardings() places arrays only. Filter the tree first: "
        "eqx.filter(model, eqx.is_array)."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        tg.shardings({"w": np.ones(2), "act": "relu"}, [], mesh)


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            P("data", "model", None),
            "The PartitionSpec P('data', 'model', None) of w (shape (4, 4)) names 3 dimensions but the "
            "array has 2. Use at most one entry per dimension (trailing dimensions are replicated).",
        ),
        # Every entry is checked, after a replicated one too; each axis of a tuple entry.
        (
            P(None, "zz"),
            "The PartitionSpec P(None, 'zz') of w (shape (4, 4)) uses the mesh axis 'zz', which the mesh "
            "lacks; its axes are ['data', 'model'].",
        ),
        (
            P(("data", "zz")),
            "The PartitionSpec P(('data', 'zz')) of w (shape (4, 4)) uses the mesh axis 'zz', which the "
            "mesh lacks; its axes are ['data', 'model'].",
        ),
        (P(("data", "model"), None), None),
    ],
)
def test_a_partition_spec_is_checked_against_the_array_and_the_mesh(spec, message):
    # One device: a 1 x 1 mesh. Sizes that do not divide need several devices (the test above).
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    params = {"w": np.ones((4, 4), np.float32)}
    if message is None:
        assert tg.shardings(params, [("w", spec)], mesh)["w"].spec == spec
        return
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        tg.shardings(params, [("w", spec)], mesh)
