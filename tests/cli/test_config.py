"""Rules as data: TOML, JSON and dicts load to exactly the rules of the Python API."""

import json
import re
import warnings

import equinox as eqx
import jax
import numpy as np
import optax
import pytest

import treeglob as tg

TOML = """
[optimizer.weight_decay]
default = "decay"

[[optimizer.weight_decay.rules]]
match = "*.bias"
label = "no_decay"

[[optimizer.weight_decay.rules]]
type = ["equinox.nn.LayerNorm", "equinox.nn.Embedding"]
label = "no_decay"

[[optimizer.weight_decay.rules]]
match = ["*embed*", "re:.*\\\\.pos_.*"]
ndim = "<=1"
label = "no_decay"
optional = true

[[optimizer.weight_decay.rules]]
ndim = 2
label = 0.5
"""

PYTHON = (
    [
        (tg.glob("*.bias"), "no_decay"),
        (tg.inside(eqx.nn.LayerNorm, eqx.nn.Embedding), "no_decay"),
        (tg.optional(tg.all_of(tg.any_of("*embed*", tg.regex(r".*\.pos_.*")), tg.ndim <= 1)), "no_decay"),
        (tg.ndim == 2, 0.5),
    ],
    "decay",
)


def test_toml_json_and_dict_give_the_python_rules(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text(TOML)
    from_toml = tg.load_rules(path, key="optimizer.weight_decay")
    assert from_toml == PYTHON
    data = {"rules": [{"match": "*.bias", "label": "no_decay"}], "default": "decay"}
    (tmp_path / "rules.json").write_text(json.dumps(data))
    assert (
        tg.load_rules(tmp_path / "rules.json")
        == tg.load_rules(data)
        == ([(tg.glob("*.bias"), "no_decay")], "decay")
    )


def test_loaded_rules_label_a_model_like_the_python_rules(tmp_path, params):
    path = tmp_path / "train.toml"
    path.write_text(TOML)
    config = tg.load_rules(path, key="optimizer.weight_decay")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tg.ShadowedRuleWarning)
        assert tg.labels(params, config.rules, default=config.default) == tg.labels(
            params, PYTHON[0], default="decay"
        )


@pytest.mark.parametrize(
    "op, expected",
    [
        (">=2", tg.ndim >= 2),
        ("< 3", tg.ndim < 3),
        ("!=1", tg.ndim != 1),
        ("2", tg.ndim == 2),
        (0, tg.ndim == 0),
    ],
)
def test_ndim_forms(op, expected):
    assert tg.load_rules({"rules": [{"ndim": op, "label": "x"}]}).rules == [(expected, "x")]


def test_preset_is_appended_and_no_default_means_missing():
    config = tg.load_rules({"rules": [{"match": "^layers.1", "label": "no_decay"}], "preset": "timm"})
    assert config.rules == [(tg.glob("^layers.1"), "no_decay"), *tg.presets.TIMM]
    assert config.default is tg.load_rules({"preset": "nanogpt"}).default
    mlp = eqx.filter(eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(0)), eqx.is_array)
    tg.labels(mlp, config.rules, default=config.default)  # MISSING is "no default"


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"match": "*.bias", "lable": "x"}, r"rules\[0\]: unknown key 'lable'. Did you mean 'label'\?"),
        ({"match": "*.bias"}, r"rules\[0\]: the rule has no label"),
        ({"label": "x"}, r"rules\[0\]: the rule has no condition; give match, type or ndim"),
        (
            {"match": "blocks.{5..0}", "label": "x"},
            r"rules\[0\]: bad pattern in match:\n.*reversed.*\n.*\n +\^\nWrite the smaller bound first",
        ),
        ({"match": 3, "label": "x"}, r"match must be a pattern string or a list of them"),
        (
            {"type": "equinox.nn.LayerNrom", "label": "x"},
            r"type 'equinox.nn.LayerNrom' is not a class: it does not exist. Did you mean equinox.nn.LayerNorm\?",
        ),
        ({"type": "nosuchpkg.Layer", "label": "x"}, r"cannot import the module of type 'nosuchpkg.Layer'"),
        ({"type": "equinox.nn.filter", "label": "x"}, r"is not a class: it does not exist"),
        (
            {"type": "equinox.filter", "label": "x"},
            r"type 'equinox.filter' is not a class: it is a function, not a class\.$",
        ),
        ({"type": "LayerNorm", "label": "x"}, r"type must be a dotted import path"),
        ({"ndim": ">= two", "label": "x"}, r"ndim must be an int or a comparison such as '>=2'"),
        ({"match": "a", "label": {"lr": 1}}, r"The label of <dict>, rules\[0\] is a dict container"),
        ({"match": "a", "label": "x", "optional": "yes"}, r"optional must be true or false, got 'yes'"),
    ],
)
def test_entry_errors_name_the_entry_and_the_problem(entry, message):
    with pytest.raises(tg.RulesFileError, match=message):
        tg.load_rules({"rules": [{"match": "ok", "label": "y"}, entry][1:]})


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.toml", "rules = [\n{match = }", r"bad.toml: not valid TOML: .*line 2"),
        ("bad.json", '{"rules": [}', r"bad.json: not valid JSON: .*line 1"),
        ("rules.yaml", "rules: []", r"rules.yaml: rules files are .toml or .json, got '.yaml'"),
        ("top.toml", "rulez = []", r"top.toml: unknown key 'rulez'. Did you mean 'rules'\?"),
        ("list.json", '{"rules": {"match": "a"}}', r"list.json: `rules` must be a list"),
        ("empty.toml", "", r"empty.toml: no rules"),
        (
            "preset.toml",
            'preset = "tim"',
            r"preset.toml: unknown preset 'tim'; the presets are default, nanogpt, timm, hf",
        ),
        (
            "entry.toml",
            '[[rules]]\nmatch = "*.bias"\nlabel = "a"\n[[rules]]\nmatch = "x"\nlable = "b"',
            r"entry.toml, rules\[1\]: unknown key 'lable'",
        ),
    ],
)
def test_file_errors_name_the_file(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(tg.RulesFileError, match=message):
        tg.load_rules(tmp_path / name)


def test_missing_file_and_missing_key(tmp_path):
    with pytest.raises(tg.RulesFileError, match=r"nope.toml: no such rules file"):
        tg.load_rules(tmp_path / "nope.toml")
    (tmp_path / "cfg.toml").write_text("[optimizer]\nlr = 1e-3\n")
    with pytest.raises(tg.RulesFileError, match=r"cfg.toml: no table 'optimizer.decay' \(missing 'decay'\)"):
        tg.load_rules(tmp_path / "cfg.toml", key="optimizer.decay")
    with pytest.raises(tg.RulesFileError, match=r"cfg.toml \[optimizer\]: unknown key 'lr'"):
        tg.load_rules(tmp_path / "cfg.toml", key="optimizer")


# ----------------------------------------------------------------------------
# Transfer rules (skip, ignore, rename, transform) in the same files

TRANSFER_TOML = """
[optimizer.weight_decay]
preset = "default"

[checkpoint]
skip = ["space_head"]
ignore = "*.attn.bias$"
transform = {"{fc,proj}.weight" = "transpose", "*.c_attn.*" = "bfloat16"}

[checkpoint.rename]
"^transformer.h" = "blocks"
"attn.c_attn" = ["attn.query_proj", "attn.key_proj", "attn.value_proj"]
"blocks.{i}.ln_{n}" = "blocks.{i}.ln{n}"
"""


def test_transfer_rules_from_toml_keep_their_order(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text(TRANSFER_TOML)
    rules = tg.load_transfer(path, key="checkpoint")
    assert rules == tg.TransferRules(
        rename=[
            ("^transformer.h", "blocks"),
            ("attn.c_attn", ("attn.query_proj", "attn.key_proj", "attn.value_proj")),
            ("blocks.{i}.ln_{n}", "blocks.{i}.ln{n}"),
        ],
        skip=["space_head"],
        ignore=["*.attn.bias$"],
        transform=[("{fc,proj}.weight", "transpose"), ("*.c_attn.*", "bfloat16")],
    )
    # The same file holds the optimizer's rules; each reader takes its own keys.
    assert tg.load_rules(path, key="optimizer.weight_decay").rules == tg.presets.DEFAULT
    assert tg.load_transfer({"rename": [["a", "b"]]}).rename == [("a", "b")]  # JSON's list of pairs


@pytest.mark.parametrize(
    "data, message",
    [
        ({}, r"<dict>: no transfer rules; give skip, ignore, rename or transform"),
        ({"skp": ["head"]}, r"unknown key 'skp'. Did you mean 'skip'\?"),
        ({"skip": [3]}, r"skip must be a pattern or a list of patterns, got \[3\]"),
        ({"skip": ["hea{d"]}, r"<dict>: Invalid pattern 'hea\{d' at position 3"),
        ({"rename": "a=b"}, r"rename must be a table \{pattern = a replacement \(or a list of them\)\}"),
        ({"rename": {"a": 3}}, r"rename entry 'a' = 3: expected a pattern and a replacement"),
        (
            {"rename": {"h.{i}": "blocks.{j}"}},
            r"<dict>: rename rule 0 \('h.\{i\}' -> 'blocks.\{j\}'\): the replacement uses \{j\}",
        ),
        (
            {"transform": {"*.w": "tranpose"}},
            r"unknown transform 'tranpose'; a named transform is one of transpose,",
        ),
        (
            {"transform": {"*.w": ["transpose", 3]}},
            r"transform entry '\*.w' = \['transpose', 3\]: expected a pattern and a transform name "
            r"\(or a list of them, applied in order\)",
        ),
    ],
)
def test_transfer_rule_errors_name_the_source_and_the_problem(data, message):
    with pytest.raises(tg.RulesFileError, match=message):
        tg.load_transfer(data)


CONVNEXT = {
    "stem": {"w": np.ones((2, 2), np.float32)},
    "stages": [
        {"blocks": [{"w": np.ones((2, 2), np.float32)}]},
        {"downsample": {"w": np.ones((2, 2), np.float32)}, "blocks": [{"w": np.ones((2, 2), np.float32)}]},
    ],
    "head": {"w": np.ones((2, 2), np.float32)},
}


@pytest.mark.parametrize("layers", ["timm_convnext", "TIMM_CONVNEXT_LAYERS"])
def test_a_layer_decay_table_reads_as_the_python_treatment(layers):
    schedule = {"schedule": "linear", "init_value": 0.0, "end_value": 1.0, "transition_steps": 10}
    table = {"decay": 0.5, "layers": layers, "schedule": schedule}
    loaded = tg.load_treatment({"layer_decay": table, "learning_rate": 1.0})
    python = tg.Treatment(
        learning_rate=1.0,
        layer_decay={
            "decay": 0.5,
            "rules": tg.presets.TIMM_CONVNEXT_LAYERS,
            "schedule": optax.linear_schedule(0.0, 1.0, 10),
        },
    )
    steps = [0, 5, 10]
    assert loaded.table(CONVNEXT, steps).format() == python.table(CONVNEXT, steps).format()
    # blocks= given: here the two stages' blocks, numbered as in the preset
    by_blocks = tg.load_treatment({"layer_decay": {"decay": 0.5, "blocks": "stages.*.blocks.*"}})
    # (head, the two blocks, downsample, stem: outside the blocks, ViT's rules put them on top)
    assert by_blocks.table(CONVNEXT).lr[0].tolist() == [1.0, 0.25, 0.5, 1.0, 1.0]


@pytest.mark.parametrize(
    "layer_decay, message",
    [
        (
            {"decay": 0.5, "layers": "convnet"},
            (
                "<dict> [layer_decay]: unknown layers 'convnet'; the families are BIG_VISION_VIT_LAYERS, "
                "TIMM_BEIT_LAYERS, TIMM_CONVNEXT_LAYERS, TIMM_DEIT_LAYERS, TIMM_RESNET_LAYERS, TIMM_SWIN_LAYERS, "
                "TIMM_VIT_LAYERS."
            ),
        ),
        ({"decay": 0.5, "blocsk": "stages"}, "unknown key 'blocsk'"),
        ("0.5", "layer_decay is a decay such as 0.75, or a table with decay, blocks, layers, schedule."),
    ],
)
def test_layer_decay_table_errors(layer_decay, message):
    with pytest.raises(tg.RulesFileError, match=re.escape(message)):
        tg.load_treatment({"layer_decay": layer_decay})
