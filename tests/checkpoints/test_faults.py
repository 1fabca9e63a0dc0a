"""Faults while saving: a process killed mid-save, a full disk, a directory that cannot be
written, two processes saving one path. After each, the path holds the previous file or the
new one, whole, never a part; what a killed writer left is recognised and removed by the
next save; the error is treeglob's, naming the file and the cause."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import treeglob as tg
from treeglob._checkpoints import base

pytestmark = pytest.mark.slow  # subprocesses

N = 1_000_000  # a 4 MB tensor: long enough to be caught mid-write


def run(code, *args, timeout=120):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def whole_value(path):
    """The one value every element of the file holds: it was written whole."""
    model, report = tg.load({"w": np.zeros(N, np.float32)}, path)
    values = np.unique(model["w"])
    assert report.ok and len(values) == 1, values
    return float(values[0])


def partials(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


SAVE_FOREVER = """
import os, sys, time, numpy as np, treeglob as tg
from treeglob._checkpoints import base
path, stop_before_commit = sys.argv[1], sys.argv[2] == "1"
commit = base.os.replace


def replace(src, dst):
    if stop_before_commit and k > 1:  # the new file is written whole but not yet in place
        print("writing", flush=True)
        time.sleep(600)
    commit(src, dst)


base.os.replace = replace
k = 0
while True:
    k += 1
    tg.save(path, {"w": np.full(1_000_000, k, np.float32)})
    print(k, flush=True)
"""


def kill_a_saving_process(path, wait, stop_before_commit=False):
    """Start a process saving `path` over and over, and kill it `wait` seconds after its
    first save (or, with `stop_before_commit`, while its second save is in flight)."""
    with subprocess.Popen(
        [sys.executable, "-c", SAVE_FOREVER, str(path), str(int(stop_before_commit))],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout.readline().strip() == "1"  # one save done: there is a previous file
        if stop_before_commit:
            assert child.stdout.readline().strip() == "writing"
        time.sleep(wait)
        child.send_signal(signal.SIGKILL)
        child.wait()
    return child.pid


@pytest.mark.parametrize("stop_before_commit", [False, True], ids=["at-random", "mid-save"])
def test_a_save_killed_leaves_a_whole_file_and_the_next_save_cleans_up(tmp_path, stop_before_commit):
    path = tmp_path / "m.safetensors"
    rng = random.Random(0)
    for _ in range(2 if stop_before_commit else 8):
        pid = kill_a_saving_process(path, rng.uniform(0.0, 0.3), stop_before_commit)
        assert whole_value(path) >= 1  # the previous file or the new one, whole
        leftovers = partials(tmp_path)
        for leftover in leftovers:  # named so that it is recognised: the dead writer's pid
            assert leftover.startswith(f"m.safetensors.{pid}-") and leftover.endswith(".partial")
        if stop_before_commit:  # killed mid-save: the previous file stays, the new one is left aside
            assert whole_value(path) == 1.0 and len(leftovers) == 1
    tg.save(path, {"w": np.full(N, -1.0, np.float32)})
    assert partials(tmp_path) == [] and whole_value(path) == -1.0


def test_two_processes_saving_one_path_at_once_never_collide(tmp_path):
    path = tmp_path / "m.safetensors"
    code = """
    import sys, numpy as np, treeglob as tg
    for _ in range(15):
        tg.save(sys.argv[1], {"w": np.full(1_000_000, float(sys.argv[2]), np.float32)})
    """
    children = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(path), str(v)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for v in (1, 2)
    ]
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
    assert whole_value(path) in (1.0, 2.0) and partials(tmp_path) == []


def test_a_full_disk_is_a_save_error_naming_the_file_and_the_previous_file_stays(tmp_path):
    path = tmp_path / "m.safetensors"
    code = """
    import resource, signal, sys, numpy as np, treeglob as tg
    tg.save(sys.argv[1], {"w": np.full(1_000_000, 1.0, np.float32)})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
    try:
        tg.save(sys.argv[1], {"w": np.full(1_000_000, 2.0, np.float32)})
    except tg.SaveError as exc:
        assert isinstance(exc, OSError) and exc.errno == 27, exc.errno
        print(exc)
    """
    result = run(code, path)
    assert result.returncode == 0, result.stderr
    assert f"save(): writing '{path}' failed: File too large (EFBIG). The disk, the quota" in result.stdout
    assert "The file there before, if any, is unchanged." in result.stdout
    assert whole_value(path) == 1.0 and partials(tmp_path) == []


def test_a_directory_that_cannot_be_written_is_a_save_error_and_the_previous_file_stays(
    tmp_path, monkeypatch
):
    path = tmp_path / "m.safetensors"
    tg.save(path, {"w": np.full(N, 1.0, np.float32)})

    def refused(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(base.os, "replace", refused)  # as a read-only directory refuses the rename
    with pytest.raises(
        tg.SaveError,
        match=rf"save\(\): writing '{path}' failed: Permission denied \(EACCES\)\. The directory is not writable",
    ):
        tg.save(path, {"w": np.full(N, 2.0, np.float32)})
    monkeypatch.undo()
    assert whole_value(path) == 1.0 and partials(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_read_only_directory(tmp_path):
    path = tmp_path / "m.safetensors"
    tg.save(path, {"w": np.full(N, 1.0, np.float32)})
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(tg.SaveError, match=r"Permission denied \(EACCES\)"):
            tg.save(path, {"w": np.full(N, 2.0, np.float32)})
    finally:
        tmp_path.chmod(0o755)
    assert whole_value(path) == 1.0 and partials(tmp_path) == []


def test_a_live_writer_s_partial_file_is_left_alone(tmp_path):
    path = tmp_path / "m.safetensors"
    mine = tmp_path / f"m.safetensors.{os.getpid()}-0123abcd.{base._HOST}.partial"  # a live process
    elsewhere = tmp_path / "m.safetensors.1-0123abcd.other-host.partial"  # another host's
    for leftover in (mine, elsewhere):
        leftover.write_bytes(b"half")
    tg.save(path, {"w": np.full(N, 1.0, np.float32)})
    assert partials(tmp_path) == sorted([mine.name, elsewhere.name])


# ----------------------------------------------------------------------------
# Loading


def two_tensors(path, value):
    tg.save(path, {"a": np.full(N, value, np.float32), "b": np.full(N, value, np.float32)})


@pytest.fixture
def during_load(monkeypatch):
    """Run `fault()` once the first tensor of a load has been read."""
    from treeglob._checkpoints import transfer

    def install(fault):
        read = transfer._read
        done = []

        def read_then_fault(*args, **kwargs):
            value = read(*args, **kwargs)
            if not done:
                done.append(fault())
            return value

        monkeypatch.setattr(transfer, "_read", read_then_fault)

    return install


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_a_file_replaced_while_a_load_reads_it_is_not_read(tmp_path, during_load, suffix):
    path, other = tmp_path / f"m{suffix}", tmp_path / f"other{suffix}"
    two_tensors(path, 1.0)
    two_tensors(other, 2.0)
    during_load(lambda: os.replace(other, path))  # a new save renamed over it
    target = {"a": np.zeros(N, np.float32), "b": np.zeros(N, np.float32)}
    model, _ = tg.load(target, path)
    # Every tensor from the file that was planned from: the load holds it open.
    assert float(model["a"].max()) == float(model["b"].min()) == 1.0
    assert not target["a"].any()  # the model passed in is unchanged


def test_a_file_truncated_while_a_load_reads_it_is_a_source_error_naming_it_and_the_tensor(
    tmp_path, during_load
):
    path = tmp_path / "m.safetensors"
    two_tensors(path, 1.0)
    during_load(lambda: os.truncate(path, path.stat().st_size - 8))
    target = {"a": np.zeros(N, np.float32), "b": np.zeros(N, np.float32)}
    with pytest.raises(tg.SourceError, match=rf"{path}: tensor 'b' is cut short; the file is truncated"):
        tg.load(target, path)
    assert not target["a"].any() and not target["b"].any()


def test_an_npz_file_truncated_while_a_load_reads_it_is_a_load_error_naming_it_and_the_tensor(
    tmp_path, during_load
):
    path = tmp_path / "m.npz"
    two_tensors(path, 1.0)
    during_load(lambda: os.truncate(path, path.stat().st_size // 2))
    target = {"a": np.zeros(N, np.float32), "b": np.zeros(N, np.float32)}
    with pytest.raises(tg.LoadError, match=rf"load\(\): loading 'b' \(from 'b'\) from {path} failed: "):
        tg.load(target, path)
    assert not target["a"].any() and not target["b"].any()


def test_a_shard_removed_after_the_plan_is_still_read_whole(tmp_path, during_load):
    folder = tmp_path / "shards"
    folder.mkdir()
    tg.save(
        folder / "model.safetensors",
        {"a": np.full(N, 1.0, np.float32), "b": np.full(N, 1.0, np.float32)},
        max_shard_size=4 * N,
    )
    during_load(lambda: (folder / "model-00002-of-00002.safetensors").unlink())
    model, _ = tg.load({"a": np.zeros(N, np.float32), "b": np.zeros(N, np.float32)}, folder)
    assert float(model["b"].min()) == 1.0  # opened with the plan: its data is still there
    with pytest.raises(
        tg.SourceError, match=r"the shard model-00002-of-00002.safetensors named in its weight_map"
    ):
        tg.load({"a": np.zeros(N, np.float32), "b": np.zeros(N, np.float32)}, folder)


def test_a_sharded_save_that_fails_between_shards_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    from treeglob._checkpoints import sharded

    folder = tmp_path / "shards"
    folder.mkdir()
    path = folder / "model.safetensors"

    def model(value):
        return {name: np.full(N // 4, value, np.float32) for name in "abcd"}

    tg.save(path, model(1.0), max_shard_size=N)  # 4 shards
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    calls = []

    def disk_full_at_the_third_shard(file, tensors, read):
        calls.append(file.name)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(file, tensors, read)

    write = sharded.write
    monkeypatch.setattr(sharded, "write", disk_full_at_the_third_shard)
    with pytest.raises(OSError, match="No space left"):
        tg.save(path, model(2.0), max_shard_size=N)
    monkeypatch.undo()
    # The same four shard names: this save's were its own, and are gone.
    assert calls[0] != "model-00001-of-00004.safetensors" and calls[0].endswith("-00001-of-00004.safetensors")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    loaded, _ = tg.load(model(0.0), folder)
    assert all(float(v.min()) == float(v.max()) == 1.0 for v in loaded.values())
    # Saved again in full: the index names this save's shards, the earlier ones are gone.
    tg.save(path, model(3.0), max_shard_size=N)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        {*index["weight_map"].values(), "model.safetensors.index.json"}
    )
    loaded, _ = tg.load(model(0.0), folder)
    assert all(float(v.min()) == float(v.max()) == 3.0 for v in loaded.values())
