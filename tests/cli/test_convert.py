"""`treeglob convert`: load a checkpoint into a model by rules and write it out again."""

import contextlib
import io
import json
import textwrap

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import treeglob as tg
from treeglob._checkpoints import progress
from treeglob._cli.commands import _size
from treeglob._cli.main import main

FACTORY = """
import jax.numpy as jnp

def build():
    return {"blocks": [{"w": jnp.zeros((3, 2)), "b": jnp.zeros(3)} for _ in range(2)], "head": jnp.zeros(4)}
"""
RULES = """
[rename]
"^h" = "blocks"
"lm_head" = "head"
[transform]
"*.w" = "transpose"
"""
# The checkpoint in its own names and layout: (in, out) weights.
CHECKPOINT = {
    **{f"h.{i}.w": np.arange(6, dtype=np.float32).reshape(2, 3) + i for i in range(2)},
    **{f"h.{i}.b": np.full(3, i, np.float32) for i in range(2)},
    "lm_head": np.arange(4, dtype=np.float32),
}


@pytest.fixture
def files(tmp_path):
    (tmp_path / "factory.py").write_text(textwrap.dedent(FACTORY))
    (tmp_path / "rules.toml").write_text(RULES)
    save_file(CHECKPOINT, str(tmp_path / "ckpt.safetensors"))
    return tmp_path


def convert(capsys, files, *options):
    status = main(
        ["convert", str(files / "factory.py:build"), str(files / "ckpt.safetensors"), *map(str, options)]
    )
    out, err = capsys.readouterr()
    return status, out, err


def test_convert_writes_the_checkpoint_in_the_model_s_names(capsys, files):
    status, out, _ = convert(capsys, files, files / "out.safetensors", "--rules", files / "rules.toml")
    assert status == 0, out
    assert out.splitlines()[0].split() == ["loaded", "5", "leaves", "22", "elements"]
    assert out.splitlines()[-1] == f"wrote 5 tensors to {files / 'out.safetensors'}"
    written = load_file(files / "out.safetensors")
    np.testing.assert_array_equal(written["blocks.1.w"], CHECKPOINT["h.1.w"].T)
    np.testing.assert_array_equal(written["head"], CHECKPOINT["lm_head"])


def test_convert_back_under_the_checkpoint_s_names_in_shards(capsys, files):
    out_dir = files / "hf"
    out_dir.mkdir()
    rules = files / "rules.toml"
    status, out, err = convert(
        capsys,
        files,
        out_dir / "model.safetensors",
        "--rules",
        rules,
        "--export-rules",
        rules,
        "--max-shard-size",
        "0.03kB",
        "--json",
    )
    assert status == 0, err
    result = json.loads(out)
    assert sorted(result["written"]) == sorted(CHECKPOINT)
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 5  # 30 bytes a file: one tensor each
    model, _ = tg.load(CHECKPOINT, out_dir)
    for name, value in CHECKPOINT.items():
        np.testing.assert_array_equal(model[name], value)  # the same file, bit for bit


def test_convert_shows_progress_on_a_terminal(capsys, files, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(progress, "THRESHOLD_BYTES", 1)
    terminal = Terminal()
    with contextlib.redirect_stderr(terminal):
        status = main(
            [
                "convert",
                str(files / "factory.py:build"),
                str(files / "ckpt.safetensors"),
                str(files / "out.npz"),
                "--rules",
                str(files / "rules.toml"),
            ]
        )
    assert status == 0
    shown = terminal.getvalue()
    assert "loading" in shown and "saving" in shown and "5/5 tensors]" in shown


@pytest.mark.parametrize(
    "out, options, status, message",
    [
        (
            "out.safetensors",
            ["--max-shard-size", "5 gigs"],
            2,
            "--max-shard-size '5 gigs': write a size such as 5GB",
        ),
        ("out.npz", ["--max-shard-size", "1GiB"], 2, "--max-shard-size writes .safetensors shards"),
        ("nowhere/out.safetensors", [], 2, "nowhere' does not exist"),
        ("out.pt", [], 2, "does not end in .safetensors or .npz"),
        ("out.safetensors", ["--export-key", "x"], 2, "--export-key needs --export-rules FILE"),
        ("out.safetensors", ["--export-rules", "missing.toml"], 2, "missing.toml"),
        # An export whose rules cannot be undone.
        ("out.safetensors", ["--export-rules", "regex.toml"], 1, "a regex has no inverse"),
    ],
)
def test_convert_errors(capsys, files, out, options, status, message):
    (files / "regex.toml").write_text('[rename]\n"re:^h" = "blocks"\n"lm_head" = "head"\n')
    options = [str(files / o) if o.endswith(".toml") else o for o in options]
    got, _, err = convert(capsys, files, files / out, "--rules", files / "rules.toml", *options)
    assert got == status and message in err, err
    assert not (files / out).exists()


def test_convert_without_the_rules_reports_what_does_not_load(capsys, files):
    status, _, err = convert(capsys, files, files / "out.safetensors")
    assert status == 1 and "5 model leaves have no checkpoint tensor" in err


@pytest.mark.parametrize(
    "text, size",
    [
        ("20000", 20_000),  # bytes
        ("500MB", 500_000_000),  # Hugging Face's units: powers of 1000
        ("5gb", 5_000_000_000),
        ("1.5kB", 1_500),
        ("4GiB", 4 * 2**30),  # and powers of 1024
        (" 2 kib ", 2_048),
        ("1T", 10**12),
    ],
)
def test_shard_sizes_are_read_as_hugging_face_writes_them(text, size):
    assert _size(text) == size
