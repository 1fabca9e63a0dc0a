"""The checkpoint format registry: every format reads what treeglob writes, messages list them all."""

import jax.numpy as jnp
import numpy as np
import pytest

import treeglob as tg
from treeglob._checkpoints.formats import FORMATS, open_checkpoint, readable

TREE = {"blocks": [{"w": np.arange(6.0).reshape(2, 3)}], "head": {"b": np.array([1, 2], np.int32)}}
ZEROS = {"blocks": [{"w": np.zeros((2, 3))}], "head": {"b": np.zeros(2, np.int32)}}
WRITABLE = [f.suffix for f in FORMATS if f.writer]


def test_the_registry_holds_the_formats_treeglob_reads_and_writes():
    assert [(f.name, f.suffix, bool(f.writer)) for f in FORMATS] == [
        ("safetensors", ".safetensors", True),
        ("npz", ".npz", True),
        ("sharded safetensors", ".safetensors.index.json", False),
        ("orbax", "", False),
    ]
    assert readable() == (
        "a .safetensors, .npz or .safetensors.index.json file, a directory of .safetensors shards, "
        "or an orbax checkpoint directory"
    )


@pytest.mark.parametrize("entry", FORMATS, ids=lambda f: f.name)
def test_every_format_names_a_reader_and_writer_its_module_has(entry):
    # The registry names them as text (so that it imports no reader): each must exist.
    if entry.name == "orbax":
        pytest.importorskip("orbax.checkpoint")
    for name in (entry.reader, entry.writer, entry.claims):
        assert not name or callable(entry._attribute(name)), (entry.name, name)


@pytest.mark.parametrize("suffix", WRITABLE)
def test_save_picks_the_writer_by_suffix_and_load_reads_it_back(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    assert tg.save(path, TREE) == ["blocks.0.w", "head.b"]
    assert sorted(open_checkpoint(path).meta) == ["blocks.0.w", "head.b"]
    model, report = tg.load(ZEROS, path)
    assert report.ok
    np.testing.assert_array_equal(model["blocks"][0]["w"], TREE["blocks"][0]["w"])
    assert model["head"]["b"].dtype == np.int32
    assert not list(tmp_path.glob("*.partial"))


def test_npz_refuses_bfloat16_before_writing(tmp_path):
    with pytest.raises(
        TypeError, match=r"'w' has the dtype bfloat16, which \.npz cannot store.*\.safetensors"
    ):
        tg.save(tmp_path / "m.npz", {"w": jnp.ones(2, jnp.bfloat16)})
    assert not list(tmp_path.iterdir())


def test_npz_refuses_python_objects_before_writing_and_does_not_unpickle_them(tmp_path):
    objects = np.array([{"a": 1}, None], dtype=object)
    with pytest.raises(
        TypeError,
        match=r"^tensor 'w' holds Python objects \(dtype object\), which \.npz stores only by pickling; "
        r"save arrays of numbers\.$",
    ):
        tg.save(tmp_path / "m.npz", {"w": objects})
    assert not list(tmp_path.iterdir())
    # One written by NumPy is refused by the plan, before anything is read.
    np.savez(tmp_path / "objects.npz", w=objects)
    with pytest.raises(
        tg.LoadError, match="an object array: pickled Python objects, which treeglob does not load"
    ):
        tg.load({"w": np.zeros(2)}, tmp_path / "objects.npz")


def test_a_suffix_no_writer_takes_is_refused_with_the_writers(tmp_path):
    with pytest.raises(
        ValueError, match=r"does not end in \.safetensors or \.npz, the formats save\(\) writes"
    ):
        tg.save(tmp_path / "m.json", TREE)
