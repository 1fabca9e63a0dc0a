"""Sharded `.safetensors` checkpoints (Hugging Face's `model-0000N-of-0000M.safetensors` files and
`model.safetensors.index.json`): read as one checkpoint from the index, its directory or a list of files."""

import json
import pathlib

import equinox as eqx
import jax
import numpy as np
import pytest

import treeglob as tg
from treeglob._checkpoints.formats import open_checkpoint
from treeglob._checkpoints.safetensors import write
from treeglob._cli.main import main as cli

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def mlp(seed):
    return eqx.nn.MLP(4, 2, 8, 2, key=jax.random.key(seed))


def write_sharded(directory: pathlib.Path, tensors: dict[str, np.ndarray], split: int, index: bool = True):
    """`tensors` in two shards (the first `split` in the first), and their index file."""
    names = list(tensors)
    weight_map = {}
    for file, part in zip(SHARDS, (names[:split], names[split:]), strict=True):
        arrays = [np.asarray(tensors[n]) for n in part]
        write(
            directory / file,
            [(n, a.shape, a.dtype) for n, a in zip(part, arrays, strict=True)],
            arrays.__getitem__,
        )
        weight_map |= dict.fromkeys(part, file)
    if index:
        text = json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
        (directory / "model.safetensors.index.json").write_text(text)
    return weight_map


def params_of(model):
    params = eqx.filter(model, eqx.is_array)
    return dict(zip(tg.paths(params), map(np.asarray, jax.tree.leaves(params)), strict=True))


@pytest.mark.parametrize("source", ["index", "directory", "files"])
def test_a_sharded_checkpoint_loads_bit_for_bit_from_its_index_its_directory_or_its_files(tmp_path, source):
    weights = params_of(mlp(0))
    write_sharded(tmp_path, weights, split=3)
    where = {
        "index": tmp_path / "model.safetensors.index.json",
        "directory": tmp_path,
        "files": [tmp_path / f for f in SHARDS],
    }[source]
    loaded, _ = tg.load(mlp(1), where)
    assert params_of(loaded).keys() == weights.keys()
    for name, array in params_of(loaded).items():
        np.testing.assert_array_equal(array, weights[name])


def test_missing_and_unused_tensors_are_counted_across_every_shard(tmp_path):
    weights = params_of(mlp(0))
    weights["extra.weight"] = np.zeros(3, np.float32)  # lands in the second shard
    del weights["layers.0.bias"]  # from the first
    write_sharded(tmp_path, weights, split=2)
    plan = tg.load_plan(mlp(1), tmp_path, strict=False, allow_missing=True, allow_unused=True)
    statuses = {(row.path, row.source): row.status for row in plan.rows}
    assert (
        statuses[("layers.0.bias", None)] == "missing"
        and statuses[("layers.2.weight", "layers.2.weight")] == "loaded"
    )
    assert [row.source for row in plan.rows if row.status == "unused"] == ["extra.weight"]


def test_the_command_line_reads_a_sharded_directory(tmp_path, capsys):
    write_sharded(tmp_path, params_of(mlp(0)), split=3)
    assert cli(["paths", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layers.2.weight  (2, 8)" in out and "6 array leaves, 130 elements" in out
    assert cli(["paths", str(tmp_path / "model.safetensors.index.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 6


def test_each_shard_is_read_only_for_the_tensors_a_load_uses(tmp_path, monkeypatch):
    write_sharded(tmp_path, params_of(mlp(0)), split=3)
    checkpoint = open_checkpoint(tmp_path)
    reads = []
    for shard in checkpoint.shards:
        for method in ("read_tensor", "read_tensor_slice"):
            original = getattr(shard, method)

            def spy(info, name, *index, original=original):
                reads.append(name)
                return original(info, name, *index)

            monkeypatch.setattr(shard, method, spy)
    tg.load(mlp(1), checkpoint, skip=["layers.{1,2}"])
    assert sorted(set(reads)) == ["layers.0.bias", "layers.0.weight"]


def broken(tmp_path, change):
    weight_map = write_sharded(tmp_path, params_of(mlp(0)), split=3)
    change(tmp_path, weight_map)
    return tmp_path


def drop_shard(path, weight_map):
    (path / SHARDS[1]).unlink()


def drop_shards(path, weight_map):  # the index alone: still read as a sharded checkpoint
    for shard in SHARDS:
        (path / shard).unlink()


def misplace(path, weight_map):
    weight_map["layers.0.bias"] = SHARDS[1]
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def unlist(path, weight_map):
    del weight_map["layers.2.bias"]
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def no_weight_map(path, weight_map):
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))


def second_index(path, weight_map):
    (path / "other.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            drop_shard,
            r"model\.safetensors\.index\.json: the shard model-00002-of-00002\.safetensors named in its weight_map is not in",
        ),
        (
            misplace,
            r"its weight_map puts the tensor 'layers\.0\.bias' in model-00002-of-00002\.safetensors, which does not hold it",
        ),
        (unlist, r"the shards hold tensors its weight_map does not list: layers\.2\.bias\."),
        (
            drop_shards,
            r"model\.safetensors\.index\.json: the shards model-00001-of-00002\.safetensors, "
            r"model-00002-of-00002\.safetensors named in its weight_map are not in",
        ),
        (
            no_weight_map,
            r"not a safetensors index file: it needs a \"weight_map\" object mapping each tensor name to the file "
            r"that holds it\.$",
        ),
        (
            second_index,
            r"holds several index files \(model\.safetensors\.index\.json, other\.safetensors\.index\.json\); name the one to read",
        ),
    ],
    ids=lambda x: getattr(x, "__name__", "")[:20],
)
def test_a_broken_sharded_checkpoint_is_a_source_error_naming_the_file(tmp_path, change, message):
    with pytest.raises(tg.SourceError, match=message):
        tg.load_plan(mlp(1), broken(tmp_path, change))


def test_a_tensor_in_two_shards_and_a_list_of_other_files_are_refused(tmp_path):
    weights = params_of(mlp(0))
    for file in SHARDS:
        write(tmp_path / file, [("a", (2,), np.float32)], lambda k: np.zeros(2, np.float32))
    with pytest.raises(
        tg.SourceError,
        match=r"the tensor 'a' is in two shards, .*00001-of-00002\.safetensors and .*00002-of-00002\.safetensors",
    ):
        tg.load_plan(weights, [tmp_path / f for f in SHARDS])
    with pytest.raises(
        tg.SourceError,
        match=r"a list of files is read as the shards of one checkpoint, which must all be \.safetensors files",
    ):
        tg.load_plan(weights, [str(tmp_path / SHARDS[0]), "weights.npz"])
    with pytest.raises(tg.SourceError, match=r"missing\.safetensors: no such file \(a shard of"):
        tg.load_plan(weights, [tmp_path / SHARDS[0], tmp_path / "missing.safetensors"])


def test_save_writes_hugging_face_shards_above_a_size_and_they_load_back_bit_for_bit(tmp_path):
    model = eqx.nn.MLP(64, 8, 64, 2, key=jax.random.key(0))  # two 16 KiB weights, one of 2 KiB
    names = tg.save(tmp_path / "model.safetensors", model, max_shard_size=20_000)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == names
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in params_of(model).values())
    loaded, _ = tg.load(eqx.nn.MLP(64, 8, 64, 2, key=jax.random.key(1)), tmp_path)
    for name, array in params_of(loaded).items():
        np.testing.assert_array_equal(array, params_of(model)[name])
    # everything fits: one file, as before
    tg.save(tmp_path / "small.safetensors", {"w": np.zeros(2)}, max_shard_size=20_000)
    assert (tmp_path / "small.safetensors").is_file() and not (
        tmp_path / "small.safetensors.index.json"
    ).exists()
    with pytest.raises(ValueError, match=r"save\(max_shard_size=20000\): shards are \.safetensors files"):
        tg.save(tmp_path / "m.npz", {"w": np.zeros(2)}, max_shard_size=20_000)


def test_a_new_save_removes_the_index_and_shards_of_an_earlier_one(tmp_path):
    big = eqx.nn.MLP(64, 8, 64, 2, key=jax.random.key(0))
    tg.save(tmp_path / "model.safetensors", big, max_shard_size=20_000)
    small = {"w": np.full(2, 10.0, np.float32)}
    tg.save(tmp_path / "model.safetensors", small)  # one file now: the old shards would shadow it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    loaded, _ = tg.load({"w": np.zeros(2, np.float32)}, tmp_path)
    np.testing.assert_array_equal(loaded["w"], small["w"])
    tg.save(tmp_path / "model.safetensors", big, max_shard_size=20_000)
    tg.save(tmp_path / "model.safetensors", big, max_shard_size=10_000)  # more, smaller shards
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(set(index["weight_map"].values()))


def test_shards_named_alike_in_two_directories_and_a_file_named_twice_are_told_apart(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        write(
            tmp_path / sub / "model.safetensors", [(sub, (2,), np.float32)], lambda k: np.ones(2, np.float32)
        )
    both = open_checkpoint([tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"])
    assert sorted(both.meta) == ["a", "b"]
    again = open_checkpoint(
        [tmp_path / "a" / "model.safetensors", tmp_path / "a" / ".." / "a" / "model.safetensors"]
    )
    assert sorted(again.meta) == ["a"]
