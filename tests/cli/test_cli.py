"""The command line on checkpoints the tests write and on model factories."""

import gc
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tracemalloc

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import treeglob as tg
from conftest import ROOT
from treeglob._checkpoints.sources import load_source
from treeglob._cli.main import main

EXAMPLES = ROOT / "examples"

CHECKPOINT = {
    "embed.weight": np.zeros((10, 4), np.float32),
    "blocks.0.attn.qkv.weight": np.zeros((12, 4), np.float32),
    "blocks.0.attn.qkv.bias": np.zeros(12, np.float32),
    "blocks.0.norm.weight": np.ones(4, np.float32),
    "blocks.1.attn.qkv.weight": np.zeros((12, 4), np.float32),
    "blocks.1.attn.qkv.bias": np.zeros(12, np.float32),
    "blocks.1.norm.weight": np.ones(4, np.float32),
    "head.weight": np.zeros((3, 4), np.float16),
}

RULES = """
default = "decay"

[[rules]]
match = ["*.bias", "*norm*"]
label = "no_decay"

[[rules]]
match = "embed"
label = "frozen"
"""


@pytest.fixture
def st_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(CHECKPOINT, str(path))
    return path


@pytest.fixture
def npz_file(tmp_path):
    path = tmp_path / "model.npz"
    np.savez(path, **{k.replace(".", "/"): v for k, v in CHECKPOINT.items()})
    return path


@pytest.fixture
def rules_file(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(RULES)
    return path


def cli(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("fixture", ["st_file", "npz_file"])
def test_paths_of_checkpoints(request, capsys, fixture):
    status, out, _ = cli(capsys, "paths", request.getfixturevalue(fixture))
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["path", "shape", "dtype", "size"]
    assert "blocks.1.attn.qkv.weight  (12, 4)  float32    48" in out
    assert "head.weight               (3, 4)   float16    12" in out
    assert lines[-1] == "8 array leaves, 180 elements"


def test_checkpoint_paths_match_patterns_like_model_paths(st_file, npz_file):
    for source in (st_file, npz_file):
        tree = load_source(str(source)).tree
        selected = jax.tree.leaves(tg.mask(tree, "blocks.{0..0}.attn"))
        assert [p for p, m in zip(tg.paths(tree), selected, strict=True) if m] == [
            "blocks.0.attn.qkv.bias",
            "blocks.0.attn.qkv.weight",
        ]
        assert sorted(tg.paths(tree)) == sorted(CHECKPOINT)


def test_sources_read_headers_only(tmp_path):
    big = {"w": np.ones((2048, 2048), np.float32)}  # 16 MiB of data
    save_file(big, str(tmp_path / "big.safetensors"))
    np.savez(tmp_path / "big.npz", **big)
    for name in ("big.safetensors", "big.npz"):
        tracemalloc.start()
        tree = load_source(str(tmp_path / name)).tree
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert tree["w"].shape == (2048, 2048)
        assert peak < 1 << 20, f"{name}: {peak} bytes allocated while reading"


def test_paths_json_schema_and_filter(capsys, npz_file):
    status, out, _ = cli(capsys, "paths", npz_file, "--json", "--filter", "*.bias")
    assert status == 0
    data = json.loads(out)
    assert set(data) == {"source", "leaves", "count", "elements"}
    assert data["leaves"] == [
        {"path": f"blocks.{i}.attn.qkv.bias", "shape": [12], "dtype": "float32", "size": 12} for i in (0, 1)
    ]
    assert data["count"] == 2 and data["elements"] == 24


def test_explain_with_a_rules_file(capsys, st_file, rules_file):
    status, out, _ = cli(capsys, "explain", st_file, "--rules", rules_file)
    assert status == 0
    assert "embed.weight              (10, 4)  float32    40  frozen    1" in out
    assert "no_decay       4        32  17.8%" in out


def test_explain_json_schema(capsys, st_file, rules_file):
    status, out, _ = cli(capsys, "explain", st_file, "--rules", rules_file, "--json")
    assert status == 0
    data = json.loads(out)
    assert set(data) == {"source", "leaves", "rules", "summary"}
    assert set(data["leaves"][0]) == {"path", "shape", "dtype", "size", "label", "rule", "selector"}
    assert set(data["rules"][0]) == {
        "index",
        "label",
        "selector",
        "matched",
        "decided",
        "shadowed",
        "expanded",
    }
    assert data["summary"] == {
        "no_decay": {"leaves": 4, "elements": 32},
        "frozen": {"leaves": 1, "elements": 40},
        "decay": {"leaves": 3, "elements": 108},
    }


def test_json_has_one_line_per_leaf_and_keeps_equal_values_of_other_types_apart(capsys, tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(
        json.dumps({"rules": [{"match": "*.bias", "label": 1}, {"match": "head", "label": True}]})
    )
    checkpoint = tmp_path / "m.safetensors"
    save_file(
        {"head.weight": np.zeros((2, 2), np.float32), "h.bias": np.zeros(2, np.float32)}, str(checkpoint)
    )
    status, out, _ = cli(capsys, "explain", checkpoint, "--rules", rules, "--json")
    assert status == 0
    lines = out.splitlines()
    assert lines[:3] == ["{", f' "source": {json.dumps(str(checkpoint))},', ' "leaves": [']
    assert json.loads(lines[3].rstrip(",")) == {
        "path": "h.bias",
        "shape": [2],
        "dtype": "float32",
        "size": 2,
        "label": 1,
        "rule": 0,
        "selector": "glob('*.bias')",
    }
    assert json.loads(lines[4])["label"] is True
    assert [leaf["label"] for leaf in json.loads(out)["leaves"]] == [1, True]


def test_the_command_line_pauses_the_garbage_collector_only_while_it_runs(capsys, npz_file):
    assert gc.isenabled()
    assert cli(capsys, "paths", npz_file)[0] == 0
    assert gc.isenabled()


def test_explain_with_rules_on_the_command_line_and_a_preset(capsys, npz_file):
    status, out, _ = cli(capsys, "explain", npz_file, "--rule", "frozen=embed", "--preset", "nanogpt")
    assert status == 0
    assert "embed.weight" in out and "frozen" in out and "no_decay" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--rule", "no_decay=*.bais", "--default", "decay"],
            r"glob\('\*.bais'\) matches no leaf.*\nClose matches in the tree: bias",
        ),
        (["--rule", "no_decay=*.bias"], r"6 of 8 leaves match no rule and no default label was given"),
        (["--rule", "x=**", "--filter", "blcks"], r"The filter glob\('blcks'\) matches no leaf"),
    ],
)
def test_rules_that_do_not_fit_exit_1(capsys, npz_file, argv, message):
    import re

    status, out, err = cli(capsys, "explain", npz_file, *argv)
    assert status == 1 and out == ""
    assert re.search(message, err), err


def test_summary_shows_the_rules_their_problems_and_the_counts_without_the_leaves(capsys, npz_file):
    argv = ["explain", npz_file, "--rule", "frozen=embed", "--rule", "x=nothing", "--preset", "default"]
    status, out, _ = cli(capsys, *argv, "--summary", "--no-strict")
    assert status == 0
    assert out.splitlines() == [
        "rule  label     matched  decided  selector",
        "   0  frozen          1        1  glob('embed')",
        "   1  x               0        0  glob('nothing')  (optional: matches nothing)",
        "   2  no_decay        5        4  presets.DEFAULT_NO_DECAY",
        "   3  decay           8        3  glob('**')",
        "",
        "label     leaves  elements  share",
        "frozen         1        40  22.2%",
        "no_decay       4        32  17.8%",
        "decay          3       108  60.0%",
    ]
    status, out, _ = cli(capsys, *argv, "--summary", "--no-strict", "--json")
    data = json.loads(out)
    assert "leaves" not in data and [r["decided"] for r in data["rules"]] == [1, 0, 4, 3]
    assert data["rules"][2]["selector"] == "presets.DEFAULT_NO_DECAY"
    assert data["rules"][2]["expanded"].startswith("optional(any_of(glob('{bias,b}$'), inside(LayerNorm")
    assert data["rules"][0]["expanded"] == ""  # nothing named in it
    status, out, _ = cli(capsys, *argv, "--summary", "--no-strict", "--json", "--expand-presets")
    assert json.loads(out)["rules"][2]["selector"] == data["rules"][2]["expanded"]


def test_presets_are_shown_by_name_and_written_out_on_request(capsys, npz_file):
    status, out, _ = cli(capsys, "explain", npz_file, "--preset", "hf", "--summary")
    assert status == 0 and "presets.HF_NO_DECAY" in out and "regex(" not in out
    status, out, _ = cli(capsys, "explain", npz_file, "--preset", "hf", "--summary", "--expand-presets")
    assert status == 0 and "presets.HF_NO_DECAY" not in out
    assert (
        "regex('.*(bias|layernorm|rmsnorm|(^|\\\\.)norm($|\\\\.)|_norm($|\\\\.)).*', ignore_case=True)" in out
    )


def test_an_unknown_preset_is_bad_input(capsys, npz_file):
    status, out, err = cli(capsys, "explain", npz_file, "--preset", "defualt")
    assert status == 2 and out == ""
    assert err == "treeglob explain: --preset 'defualt': the presets are default, nanogpt, timm, hf.\n"


def test_the_help_names_every_preset():
    # The parser is built without importing the presets (and JAX): their names are written there.
    from treeglob._cli.main import _parser

    text = _parser()._subparsers._group_actions[0].choices["explain"].format_help()  # type: ignore[union-attr]
    assert f"{', '.join(list(tg.presets.BY_NAME)[:-1])} or {list(tg.presets.BY_NAME)[-1]}" in " ".join(
        text.split()
    )


HELP_SHOWN = re.findall(
    r'>>> treeglob\(((?:"[^"]*", )*)"--help"\)\n(.*?)\n\n```',
    (ROOT / "docs" / "reference" / "cli.md").read_text(),
    re.S,
)


def test_the_reference_page_shows_the_help_of_every_command_as_it_is(capsys, monkeypatch):
    # Its examples run the installed command; this runs the parser here, to the character.
    monkeypatch.setenv("COLUMNS", "100")
    commands = [re.findall(r'"([^"]*)"', argv) for argv, _ in HELP_SHOWN]
    assert commands == [[], ["explain"], ["paths"], ["treatment"], ["load-plan"], ["convert"]]
    for argv, (_, shown) in zip(commands, HELP_SHOWN, strict=True):
        with pytest.raises(SystemExit) as exit:
            main([*argv, "--help"])
        assert exit.value.code == 0
        assert capsys.readouterr().out == shown.replace("<BLANKLINE>", "") + "\n"


HELP_WITHOUT_JAX = """
import contextlib, io, sys
from treeglob._cli.main import main
codes = []
for argv in (["--help"], ["explain", "--help"], ["load-plan", "--help"], ["convert", "--help"], ["nope"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exit:
            codes.append(exit.code)
print(*codes, sorted({m.split(".")[0] for m in sys.modules} & {"jax", "numpy", "equinox", "optax"}))
"""


@pytest.mark.slow
def test_help_and_usage_errors_answer_without_importing_jax_or_numpy():
    result = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_JAX], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "0 0 0 0 2 []"


def test_no_strict_lets_a_rule_match_nothing(capsys, npz_file):
    status, out, _ = cli(capsys, "explain", npz_file, "--rule", "x=nothing", "--default", "y", "--no-strict")
    assert status == 0 and "(optional: matches nothing)" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["paths", "missing.safetensors"], r"missing.safetensors: no such file"),
        (
            ["paths", "model.npz.txt"],
            r"not a .safetensors, .npz or .safetensors.index.json file, a directory of .safetensors shards, or an orbax "
            r"checkpoint directory, nor a module:function factory",
        ),
        (["explain", "{npz}", "--rule", "nolabel"], r"--rule 'nolabel': write LABEL=PATTERN"),
        (["explain", "{npz}", "--rule", "x=a..b"], r"empty segment"),
        (["explain", "{npz}"], r"explain needs rules"),
        (["explain", "{npz}", "--rules", "{bad_rules}"], r"bad.toml, rules\[0\]: unknown key 'patern'"),
        (["paths", "{garbage}"], r"garbage.safetensors: not a readable .safetensors file"),
        (["paths", "{garbage_npz}"], r"garbage.npz: not a readable .npz file"),
        (["paths", "nosuchmodule_xyz:build"], r"cannot import 'nosuchmodule_xyz'"),
        (["paths", "{npz}", "--stacked", "blocks"], r"--stacked 'blocks': write PATH=AXES"),
    ],
)
def test_bad_input_exits_2(capsys, tmp_path, npz_file, argv, message):
    import re

    (tmp_path / "bad.toml").write_text('[[rules]]\npatern = "*.bias"\nlabel = "x"\n')
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    names = {"npz": npz_file, "bad_rules": tmp_path / "bad.toml", "garbage": tmp_path / "garbage.safetensors"}
    names["garbage_npz"] = tmp_path / "garbage.npz"
    status, out, err = cli(capsys, *(a.format(**names) for a in argv))
    assert status == 2 and out == ""
    assert re.search(message, err), err


def test_errors_as_json(capsys, npz_file):
    status, out, _ = cli(capsys, "explain", npz_file, "--rule", "x=nothing", "--json")
    assert status == 1
    data = json.loads(out)
    assert data["source"] == str(npz_file) and data["error"]["kind"] == "NoMatchError"
    assert "glob('nothing') matches no leaf" in data["error"]["message"]


def test_80_columns_keep_full_paths_and_wrap_the_rest(capsys, tmp_path):
    long_name = "encoder.layers.11.self_attention.query_key_value_projection.lora_adapter_a.weight"
    save_file(
        {long_name: np.zeros((8, 4), np.float32), "head.weight": np.zeros((2, 8), np.float32)},
        str(tmp_path / "m.safetensors"),
    )
    status, out, _ = cli(
        capsys, "explain", tmp_path / "m.safetensors", "--preset", "default", "--width", "80"
    )
    assert status == 0
    lines = out.splitlines()
    assert long_name in lines  # verbatim, on a line of its own
    assert all(len(line) <= 80 for line in lines if line != long_name), out


def test_color_only_when_asked_or_on_a_terminal(capsys, monkeypatch, npz_file):
    assert "\033[" not in cli(capsys, "explain", npz_file, "--preset", "default")[1]
    assert "\033[1mpath" in cli(capsys, "explain", npz_file, "--preset", "default", "--color", "always")[1]
    # On a terminal, --color auto (the default) colors, unless NO_COLOR is set or --color never.
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert "\033[1mpath" in cli(capsys, "explain", npz_file, "--preset", "default", "--width", "100")[1]
    assert "\033[" not in cli(capsys, "explain", npz_file, "--preset", "default", "--color", "never")[1]
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\033[" not in cli(capsys, "explain", npz_file, "--preset", "default", "--width", "100")[1]


def test_stacked_checkpoint(capsys, tmp_path):
    np.savez(tmp_path / "scan.npz", **{"blocks/w": np.zeros((3, 4, 4)), "blocks/b": np.zeros((3, 4))})
    status, out, _ = cli(
        capsys, "explain", tmp_path / "scan.npz", "--preset", "nanogpt", "--stacked", "blocks=1"
    )
    assert status == 0
    assert "blocks.2.b  (4,)    float64     4  no_decay  1" in out


# ----------------------------------------------------------------------------
# As a program: python -m treeglob, the installed script, model factories

FACTORY = textwrap.dedent(
    """
    import equinox as eqx, jax

    def build():
        return eqx.nn.MLP(4096, 4096, 4096, 2, key=jax.random.key(0))  # 50M params, never allocated
    """
)


@pytest.mark.slow
def test_python_m_treeglob_on_a_factory_module(tmp_path):
    (tmp_path / "tinymodel.py").write_text(FACTORY)
    result = subprocess.run(
        [sys.executable, "-m", "treeglob", "paths", "tinymodel:build", "--filter", "layers.0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "layers.0.weight  (4096, 4096)  float32  16,777,216" in result.stdout


@pytest.mark.slow
def test_installed_script_explains_the_quick_start_model():
    script = shutil.which("treeglob", path=os.path.dirname(sys.executable)) or shutil.which("treeglob")
    assert script, "the treeglob script is not installed"
    result = subprocess.run(
        [
            script,
            "explain",
            str(EXAMPLES / "train_gpt.py") + ":build_model",
            "--preset",
            "default",
            "--width",
            "80",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "blocks.1.attn.query_proj.weight   (64, 64)   float32   4,096  decay     1" in result.stdout
    assert "no_decay      25    12,583  10.7%" in result.stdout


# ----------------------------------------------------------------------------
# treatment: every leaf's learning rate, weight decay, unfreezing and sharding from one file

TREATMENT = """
learning_rate = {schedule = "linear", init_value = 0.0, end_value = 1e-3, transition_steps = 100}

[lr_scale]
rules = [{match = "head", label = 10.0}]

[weight_decay]
preset = "nanogpt"
values = {decay = 0.05, no_decay = 0.0}

[unfreeze]
rules = [{match = "blocks.0", label = 50}]

[sharding]
rules = [{match = "*.qkv.weight", label = ["model", ""]}]
"""


@pytest.fixture
def treatment_file(tmp_path):
    path = tmp_path / "treatment.toml"
    path.write_text(TREATMENT)
    return path


def test_treatment_table_from_a_file(capsys, st_file, treatment_file):
    assert main(["treatment", str(st_file), "--rules", str(treatment_file), "--steps", "0,50,100"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [
        "path",
        "shape",
        "lr@0",
        "lr@50",
        "lr@100",
        "wd@0",
        "wd@50",
        "wd@100",
        "sharding",
    ]
    rows = {line.split()[0]: line for line in out[1:9]}
    cells = r"\s+".join
    assert re.search(
        cells(["frozen", "0.0005", "0.001", "0.05", "0.05", "0.05", r"P\('model', None\)$"]),
        rows["blocks.0.attn.qkv.weight"],
    )
    assert re.search(cells(["0", "0.005", "0.01", "0.05", "0.05", "0.05", r"P\(\)$"]), rows["head.weight"])
    assert re.search(cells(["0", "0.0005", "0.001", "0", "0", "0", r"P\(\)$"]), rows["blocks.1.norm.weight"])


def test_treatment_json_is_the_table(capsys, st_file, treatment_file):
    assert main(["treatment", str(st_file), "--rules", str(treatment_file), "--steps", "50", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    table = tg.load_treatment(treatment_file).table(load_source(str(st_file), "Param").tree, [50])
    assert data["steps"] == [50]
    assert [leaf["path"] for leaf in data["leaves"]] == table.paths
    expected = [pytest.approx(v) if t else None for v, t in zip(table.lr[0], table.trained[0], strict=True)]
    assert [leaf["lr"][0] for leaf in data["leaves"]] == expected


@pytest.mark.parametrize(
    "text, status, message",
    [
        ('[unfreeze]\nrules = [{match = "blocks.9", label = 5}]', 1, r"glob\('blocks.9'\) matches no leaf"),
        (
            'learning_rate = {schedule = "cosine_dacay"}',
            2,
            r"no optax schedule 'cosine_dacay'. Did you mean 'cosine_decay'",
        ),
        (
            '[weight_decay]\npreset = "nanogpt"\nvalues = {decay = 0.1}',
            2,
            r"labels without a value: \['no_decay'\]",
        ),
        (
            '[sharding]\nrules = [{match = "head", label = "model"}]',
            2,
            r"a sharding is a list with one entry per dimension",
        ),
        ("[lr_scal]\nrules = []", 2, r"unknown key 'lr_scal'. Did you mean 'lr_scale'"),
    ],
)
def test_treatment_errors(capsys, tmp_path, st_file, text, status, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["treatment", str(st_file), "--rules", str(path)]) == status
    assert re.search(message, capsys.readouterr().err)


def test_factories_from_files_and_modules(tmp_path, monkeypatch):
    from treeglob._checkpoints.sources import load_source

    build = "import numpy as np\ndef build():\n    return {'w': np.zeros((2, 3))}\n"
    # A file in a folder whose name holds a colon: the function is after the last one.
    folder = tmp_path / "run:1"
    folder.mkdir()
    (folder / "colon_dir_model.py").write_text(build)
    assert load_source(f"{folder / 'colon_dir_model.py'}:build", "Param").tree["w"].shape == (2, 3)
    # A file imports its neighbours.
    (tmp_path / "neighbour_layers.py").write_text(build)
    (tmp_path / "neighbour_net.py").write_text("from neighbour_layers import build as make\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert load_source(f"{tmp_path / 'neighbour_net.py'}:make", "Param").tree["w"].shape == (2, 3)
    # A module is found from the working directory.
    (tmp_path / "cwd_zoo.py").write_text(build)
    monkeypatch.chdir(tmp_path)
    assert load_source("cwd_zoo:build", "Param").tree["w"].shape == (2, 3)


@pytest.mark.parametrize(
    "spec, files, message",
    [
        ("build", {}, "build: not a .safetensors"),
        (
            ":build",
            {},
            ":build: a model factory is written module:function or path/to/file.py:function, e.g. mypkg.models:build.",
        ),
        ("gone.py:build", {}, "gone.py:build: no such file 'gone.py'."),
        (
            "./model.txt:build",
            {"model.txt": ""},
            "./model.txt:build: ./model.txt cannot be imported as a Python module.",
        ),
        (
            "./bad.py:build",
            {"bad.py": "raise RuntimeError('boom')"},
            "./bad.py:build: importing ./bad.py failed: RuntimeError: boom",
        ),
    ],
)
def test_a_factory_that_cannot_be_loaded(tmp_path, monkeypatch, spec, files, message):
    from treeglob._checkpoints.sources import load_source

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(tg.SourceError, match=f"^{re.escape(message)}"):
        load_source(spec, "Param")
