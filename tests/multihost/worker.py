"""One JAX process of a multi-process run on this machine, for tests/multihost.

    python worker.py SCENARIO PROCESSES PROCESS_ID PORT DIR

Each of PROCESSES processes (1, 2 or 4) has 8 / PROCESSES CPU devices; together they
form one 2 x 4 mesh ("data", "model"). The processes meet at a coordinator on
127.0.0.1:PORT and exchange data through gloo. The scenario prints one JSON line,
the process's results, last.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys


def reference() -> dict[str, object]:
    """The checkpoint every scenario reads or writes: one tensor per way of splitting it."""
    import numpy as np

    rng = np.random.default_rng(0)
    tensors = {
        name: rng.normal(size=(512, 256)).astype(np.float32)
        for name in ("row", "column", "grid", "replicated")
    }
    tensors |= {f"blocks.{k}.w": rng.normal(size=(256, 256)).astype(np.float32) for k in range(4)}
    tensors["host"] = np.arange(10, dtype=np.int32)  # a NumPy leaf: every process has it whole
    return tensors


def specs():
    from jax.sharding import PartitionSpec as P

    return {
        "row": P("data", None),
        "column": P(None, "data"),
        "grid": P("data", "model"),
        "replicated": P(),
        "blocks": {"w": P("data", None, "model")},  # stacked: two layers per data row
    }


STACKED = {"blocks": 1}


def mesh():
    import jax
    import numpy as np
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))


def abstract(tensors):
    """The model to load into: the reference's shapes, stacked blocks, no values."""
    import jax
    import numpy as np

    shapes = {
        name: jax.ShapeDtypeStruct(tensors[name].shape, np.float32) for name in specs() if name != "blocks"
    }
    shapes["blocks"] = {"w": jax.ShapeDtypeStruct((4, 256, 256), np.float32)}
    return shapes


def global_model(tensors):
    """The reference as global arrays on the mesh, each split by its spec."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    values = {name: tensors[name] for name in specs() if name != "blocks"}
    values["blocks"] = {"w": np.stack([tensors[f"blocks.{k}.w"] for k in range(4)])}
    on_mesh = jax.tree.map(
        lambda v, s: jax.make_array_from_callback(v.shape, NamedSharding(mesh(), s), lambda i: v[i]),
        values,
        specs(),
    )
    return on_mesh | {"host": tensors["host"]}


def check_shards(model, tensors):
    """Every shard this process holds is the reference's slice, bit for bit."""
    import numpy as np

    whole = {name: tensors[name] for name in specs() if name != "blocks"}
    whole["blocks"] = np.stack([tensors[f"blocks.{k}.w"] for k in range(4)])
    for name, expected in whole.items():
        array = model["blocks"]["w"] if name == "blocks" else model[name]
        assert array.shape == expected.shape, (name, array.shape)
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index], err_msg=name)


def bytes_read() -> int:
    """What this process has read through read calls so far (`rchar`)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def scenario_load(directory: pathlib.Path, source: str):
    """Load the checkpoint at `source` onto the mesh and check every shard; then again leaf
    by leaf, measuring what each load reads against what this process's devices hold."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    import treeglob as tg

    tensors = reference()
    target = abstract(tensors)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh(), s), specs())
    path = directory / source
    model, report = tg.load(target, path, shardings=shardings, stacked=STACKED, allow_unused=True)
    check_shards(model, tensors)
    measured = {}
    for name in specs():
        part = {name: target[name]}
        start = bytes_read()
        stacked = STACKED if name == "blocks" else None
        loaded, _ = tg.load(part, path, shardings={name: shardings[name]}, stacked=stacked, allow_unused=True)
        read = bytes_read() - start
        array = loaded["blocks"]["w"] if name == "blocks" else loaded[name]
        boxes = {
            tuple(s.indices(n)[:2] for s, n in zip(index, array.shape, strict=True))
            for index in array.sharding.addressable_devices_indices_map(array.shape).values()
        }
        needed = sum(int(np.prod([stop - start for start, stop in b])) * 4 for b in boxes)
        measured[name] = {"needed": needed, "read": read}
    error = ""
    if jax.process_count() > 1:
        try:
            tg.load(target, path, stacked=STACKED, allow_unused=True)
        except ValueError as exc:
            error = str(exc)
    return {"measured": measured, "loaded": report.counts["loaded"]["leaves"], "error": error}


def scenario_save(directory: pathlib.Path, source: str):
    """Save the reference, split over the mesh, from every process into `source`."""
    import treeglob as tg
    from treeglob._checkpoints import multihost

    model = global_model(reference())
    written = []  # (offset, bytes) of each write of tensor data
    pwrite = multihost.os.pwrite

    def recorded(fd, data, offset):
        done = pwrite(fd, data, offset)
        written.append((offset, done))
        return done

    multihost.os.pwrite = recorded
    names = tg.save(directory / source, model, stacked=STACKED)
    return {"names": names, "written": written}


def scenario_faults(directory: pathlib.Path, source: str):
    """A full disk on process 1 mid-save, then what cannot be saved from shards: each is
    an error on every process, and the file saved before stays."""
    import errno

    import jax

    import treeglob as tg
    from treeglob._checkpoints import multihost

    model = global_model(reference())
    path = directory / source
    tg.save(path, model, stacked=STACKED)
    messages = {}
    pwrite = multihost.os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    if jax.process_index() == 1:
        multihost.os.pwrite = full
    try:
        tg.save(path, model | {"host": model["host"] + 1}, stacked=STACKED)
    except tg.SaveError as exc:
        messages["full"] = str(exc)
    multihost.os.pwrite = pwrite
    for case, kwargs in {
        "npz": {"path": directory / "model.npz"},
        "shards": {"max_shard_size": 2**20},
        "transpose": {"transform": [("row", "transpose")]},
    }.items():
        try:
            tg.save(kwargs.pop("path", path), model, stacked=STACKED, **kwargs)
        except ValueError as exc:
            messages[case] = str(exc)
    return messages


def scenario_edges(directory: pathlib.Path, source: str):
    """What spans processes only in part: an array on process 1's devices alone beside a
    global one (saved by the process holding it), a stacked leaf keeping some layers (an
    error on every process, no hang), an abstract leaf with a None sharding (an error)."""
    import inspect

    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import treeglob as tg

    tensors = reference()
    model = global_model(tensors)
    last = [d for d in jax.devices() if d.process_index == jax.process_count() - 1]
    stage = NamedSharding(Mesh(np.array(last), ("x",)), P("x"))
    value = np.arange(8 * len(last), dtype=np.float32)
    out = {"stage": "dtype" in inspect.signature(jax.make_array_from_callback).parameters}
    if out["stage"]:  # older JAX cannot make an array a process holds no shard of
        on_last = jax.make_array_from_callback(value.shape, stage, lambda i: value[i], dtype=value.dtype)
        tg.save(directory / source, {"row": model["row"], "stage": on_last})
    try:
        tg.load(
            {"blocks": model["blocks"]},
            directory / "reference.safetensors",
            skip=["blocks.1.w"],
            stacked=STACKED,
            allow_unused=True,
        )
    except tg.LoadError as exc:
        out["kept"] = str(exc)
    target = abstract(tensors)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh(), s), specs()) | {"row": None}
    try:
        tg.load(
            target,
            directory / "reference.safetensors",
            shardings=shardings,
            stacked=STACKED,
            allow_unused=True,
        )
    except ValueError as exc:
        out["unplaced"] = str(exc)
    return out


def scenario_train(directory: pathlib.Path, source: str):
    """Rules, reports and three sharded AdamW steps with decay_mask and layer_decay."""
    import equinox as eqx
    import jax
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "examples"))
    from sharded_train import SHARDING_RULES
    from train_gpt import GPT, batches, corpus, loss_fn

    import treeglob as tg

    data, chars = corpus()
    model = GPT(vocab=len(chars), dim=32, depth=2, heads=4, context=16, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    shardings = tg.shardings(params, SHARDING_RULES, mesh())
    layers = [("{embed,pos_embed}", 0), ("ln_f", -2)]
    reports = {
        "decay": str(tg.explain(params, tg.presets.DEFAULT)),
        "specs": str(tg.explain(params, SHARDING_RULES, default=P())),
        "shardings": str(jax.tree.map(lambda s: str(s.spec), shardings)),
        "scales": str(tg.layer_decay_scales(params, 0.75, rules=layers)),
    }
    params = jax.tree.map(
        lambda v, s: jax.make_array_from_callback(v.shape, s, lambda i: np.asarray(v)[i]), params, shardings
    )
    optimizer = optax.chain(
        optax.adamw(3e-3, weight_decay=0.1, mask=tg.decay_mask()), tg.layer_decay(0.75, rules=layers)
    )
    batch_sharding = NamedSharding(mesh(), P("data", None))

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, static, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        norms = tg.summarize(grads, tg.presets.DEFAULT, prefix="grad")
        return optax.apply_updates(params, updates), opt_state, loss, norms

    opt_state = optimizer.init(params)
    losses, norms = [], []
    for _, (x, y) in zip(range(3), batches(data, 8, 16, 0), strict=False):
        x, y = (jax.make_array_from_callback(a.shape, batch_sharding, lambda i, a=a: a[i]) for a in (x, y))
        params, opt_state, loss, norm = step(params, opt_state, x, y)
        losses.append(float(loss))
        norms.append({k: float(v) for k, v in norm.items()})
    return {"reports": reports, "losses": losses, "norms": norms}


def main(scenario: str, processes: int, process_id: int, port: int, directory: str, source: str) -> None:
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={8 // processes} --xla_backend_optimization_level=0"
    )
    import jax

    if processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        address = f"127.0.0.1:{port}"
        jax.distributed.initialize(
            coordinator_address=address,
            coordinator_bind_address=address,
            num_processes=processes,
            process_id=process_id,
        )
    run = globals()[f"scenario_{scenario}"]
    print(json.dumps(run(pathlib.Path(directory), source)), flush=True)


if __name__ == "__main__":
    name, processes, process_id, port, directory, source = sys.argv[1:]
    main(name, int(processes), int(process_id), int(port), directory, source)
