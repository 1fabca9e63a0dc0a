"""treeglob across JAX processes on one machine: 1, 2 and 4 processes of 8, 4 and 2 CPU
devices, one 2 x 4 mesh, a coordinator and gloo collectives on 127.0.0.1 (worker.py).

Selections, reports and training steps agree across process counts; each process
reads only the slices its devices hold; every process saves its shards into one
file, which loads back bit for bit with any number of processes."""

import contextlib
import json
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

import treeglob as tg
from treeglob._checkpoints.safetensors import read_header

pytestmark = pytest.mark.slow

WORKER = pathlib.Path(__file__).with_name("worker.py")
TIME_LIMIT = 300  # seconds, per process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(scenario: str, processes: int, directory: pathlib.Path, source: str = "") -> list[dict]:
    """Run `scenario` in `processes` JAX processes; the results of each, in process order."""
    port = free_port()
    children = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                scenario,
                str(processes),
                str(i),
                str(port),
                str(directory),
                source,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    outputs = []
    try:
        for child in children:
            out, err = child.communicate(timeout=TIME_LIMIT)
            assert child.returncode == 0, f"process {len(outputs)} failed:\n{err[-3000:]}"
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for child in children:
            child.kill()
            child.communicate()
    return outputs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The reference, saved by one process."""
    sys.path.insert(0, str(WORKER.parent))
    from worker import reference

    directory = tmp_path_factory.mktemp("multihost")
    tensors = reference()
    tg.save(directory / "reference.safetensors", tensors)
    with contextlib.suppress(ImportError):
        import orbax.checkpoint as ocp

        nested = {k: v for k, v in tensors.items() if not k.startswith("blocks.")}
        nested["blocks"] = {str(k): {"w": tensors[f"blocks.{k}.w"]} for k in range(4)}
        ocp.PyTreeCheckpointer().save(directory / "orbax", nested)
    return directory


def test_rules_reports_and_training_steps_agree_across_process_counts(tmp_path):
    one, *two = run_processes("train", 1, tmp_path) + run_processes("train", 2, tmp_path)
    four = run_processes("train", 4, tmp_path)
    for other in [*two, *four]:
        assert other["reports"] == one["reports"]
        np.testing.assert_allclose(other["losses"], one["losses"], rtol=1e-6)
        for mine, theirs in zip(other["norms"], one["norms"], strict=True):
            assert mine.keys() == theirs.keys()
            np.testing.assert_allclose(list(mine.values()), list(theirs.values()), rtol=1e-5)
    assert one["losses"][-1] < one["losses"][0]


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_each_process_reads_only_the_slices_its_devices_hold(checkpoint, processes):
    results = run_processes("load", processes, checkpoint, "reference.safetensors")
    for process, result in enumerate(results):
        assert result["loaded"] == 8
        for spec, m in result["measured"].items():
            assert m["needed"] <= m["read"] <= 1.1 * m["needed"], (process, spec, m)
        if processes > 1:  # an abstract model without shardings= is refused, not loaded per process
            assert (
                f"load(): this is one of {processes} JAX processes, and 5 abstract leaves" in result["error"]
            )
            assert "Pass shardings= over the global mesh" in result["error"]


def test_saved_by_every_process_loads_back_with_one_two_and_four(checkpoint):
    from worker import reference

    saved = run_processes("save", 2, checkpoint, "saved.safetensors")
    assert saved[0]["names"] == saved[1]["names"]
    assert not [p.name for p in checkpoint.iterdir() if p.name.endswith(".partial")]
    # Each byte of tensor data written once, by one process; each process wrote a part.
    path = checkpoint / "saved.safetensors"
    _, data_start = read_header(path)
    runs = sorted(run for s in saved for run in s["written"])
    assert runs[0][0] == data_start and sum(n for _, n in runs) == path.stat().st_size - data_start
    assert all(a + n == b for (a, n), (b, _) in zip(runs, runs[1:], strict=False))  # no gap, no overlap
    assert all(s["written"] for s in saved)
    tensors = reference()
    model, _ = tg.load({k: np.zeros_like(v) for k, v in tensors.items()}, path)
    for name, value in tensors.items():
        assert model[name].dtype == value.dtype
        np.testing.assert_array_equal(model[name], value)
    for processes in (1, 2, 4):
        for result in run_processes("load", processes, checkpoint, "saved.safetensors"):
            assert result["loaded"] == 8


def test_a_failure_on_one_process_is_an_error_on_every_process_and_the_file_stays(checkpoint):
    from worker import reference

    first, second = run_processes("faults", 2, checkpoint, "faulty.safetensors")
    path = checkpoint / "faulty.safetensors"
    assert "No space left on device (ENOSPC)" in second["full"]
    assert f"save(): writing the shards of {str(path)!r} failed on process 1" in first["full"]
    for messages in (first, second):
        assert "The file there before, if any, is unchanged." in messages["full"]
        assert "save(): the model spans several JAX processes" in messages["npz"]
        assert "into one .safetensors file: leave out max_shard_size" in messages["shards"]
        assert "row: it lies on other JAX processes' devices, and writing it needs" in messages["transpose"]
    tensors = reference()
    model, _ = tg.load({k: np.zeros_like(v) for k, v in tensors.items()}, path)
    np.testing.assert_array_equal(model["host"], tensors["host"])  # the first save's, whole
    assert not [p.name for p in checkpoint.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize("processes", [1, 2])
def test_orbax_restores_each_tensor_onto_the_target_shardings(checkpoint, processes):
    pytest.importorskip("orbax.checkpoint")
    for result in run_processes("load", processes, checkpoint, "orbax"):  # each shard checked there
        assert result["loaded"] == 8


def test_leaves_on_some_processes_only(checkpoint):
    results = run_processes("edges", 2, checkpoint, "stages.safetensors")
    if results[0]["stage"]:  # The array on process 1's devices alone is written whole by process 1.
        tensors = reference_tensors()
        model, _ = tg.load(
            {"row": np.zeros_like(tensors["row"]), "stage": np.zeros(32, np.float32)},
            checkpoint / "stages.safetensors",
        )
        np.testing.assert_array_equal(model["stage"], np.arange(32, dtype=np.float32))  # 8 per device
        np.testing.assert_array_equal(model["row"], tensors["row"])
    for result in results:
        assert "load(): 1 stacked leaves keep some layers and load others (blocks.0.w)" in result["kept"]
        assert (
            "load(): this is one of 2 JAX processes, and 1 abstract leaves have no sharding (row)"
            in result["unplaced"]
        )


def reference_tensors():
    from worker import reference

    return reference()
