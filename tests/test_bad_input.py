"""Bad and unusual input, found by trying the product as users would, and the behaviours
the other tests leave loose (each case here failed, or let a mutant survive, before)."""

import json
import re
import subprocess
import sys
import time
import tracemalloc
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

import treeglob as tg
from treeglob._checkpoints.safetensors import MAX_HEADER_BYTES
from treeglob._checkpoints.sources import load_source
from treeglob._cli.main import main
from treeglob._core.keys import key_text, quote, split_path

# ----------------------------------------------------------------------------
# 1. Arrays as static metadata


class Meta:
    """A node whose aux data holds a NumPy array, as a flax.struct field with pytree_node=False may."""

    def __init__(self, w, table):
        self.w, self.table = w, table


jtu.register_pytree_with_keys(
    Meta, lambda m: (((jtu.GetAttrKey("w"), m.w),), m.table), lambda table, children: Meta(children[0], table)
)


def test_arrays_in_node_metadata_do_not_break_selection():
    tree = {"a": Meta(np.zeros(2), np.arange(3)), "b": [Meta(np.zeros((2, 2)), np.arange(3))]}
    for _ in range(2):  # the second time through the structure cache
        assert jax.tree.leaves(tg.mask(tree, "b")) == [False, True]
        assert jax.tree.leaves(tg.mask(tree, tg.inside(Meta) & (tg.ndim >= 2))) == [False, True]
        assert jax.tree.leaves(tg.mask(tree, tg.owned_by(Meta))) == [True, True]
        assert jax.tree.leaves(tg.decay_mask()(tree)) == [False, True]
    assert tg.paths(tree) == ["a.w", "b.0.w"]


# ----------------------------------------------------------------------------
# 2. Containers as labels


@pytest.mark.parametrize("label", [{}, (), [], {"a": 1}, (1, 2)])
def test_containers_are_not_labels(label):
    tree = {"w": np.zeros(2)}
    with pytest.raises(TypeError, match=r"The label of rule 0 is a \w+ container"):
        tg.labels(tree, [("w", label)])
    with pytest.raises(TypeError, match=r"The label of default is a \w+ container"):
        tg.labels(tree, [("w", "x")], default=label)
    with pytest.raises(tg.RulesFileError, match=r"The label of <dict>, rules\[0\] is a \w+ container"):
        tg.load_rules({"rules": [{"match": "w", "label": label}]})
    with pytest.raises(tg.RulesFileError, match=r"<dict>: The label of default is a \w+ container"):
        tg.load_rules({"rules": [{"match": "w", "label": "x"}], "default": label})


# ----------------------------------------------------------------------------
# 3. Rules files with values of the wrong type


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"rules": [], "preset": ["timm"]},
            r"<dict>: unknown preset \['timm'\]; the presets are default, nanogpt",
        ),
        (
            {"rules": [{"type": [], "label": "x"}]},
            r"<dict>, rules\[0\]: type must be a dotted import path or a",
        ),
        (
            {"rules": [{1: "w", "label": "x"}]},
            r"<dict>, rules\[0\]: the key 1 is not a string; the keys are match",
        ),
        ({1: [], "rules": []}, r"<dict>: the key 1 is not a string; the keys are rules, default, preset"),
        (
            {"rules": [{"match": 3, "label": "x"}]},
            r"<dict>, rules\[0\]: match must be a pattern string or a list",
        ),
        (
            {"rules": [{"ndim": [2], "label": "x"}]},
            r"<dict>, rules\[0\]: ndim must be an int or a comparison",
        ),
    ],
)
def test_rules_data_of_the_wrong_type_names_the_entry(data, message):
    with pytest.raises(tg.RulesFileError, match=message):
        tg.load_rules(data)


def test_a_rules_file_with_a_list_preset_names_the_file(tmp_path):
    (tmp_path / "r.toml").write_text('preset = ["timm"]\n')
    with pytest.raises(tg.RulesFileError, match=r"r.toml: unknown preset \['timm'\]"):
        tg.load_rules(tmp_path / "r.toml")


# ----------------------------------------------------------------------------
# 4. The command line


FACTORIES = """
def text(): return "a string"
def nothing(): return None
def number(): return 3
def function(): return lambda x: x
def generator(): return (i for i in range(3))
def strings(): return {"a": "x", "b": "y"}
def exits(): raise SystemExit(3)
def long(): return list(range(100))
"""


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("text", "str 'a string'"),
        ("nothing", "NoneType None"),
        ("number", "int 3"),
        ("function", "function <function"),
        ("generator", "generator <generator"),
        ("strings", "dict {'a': 'x', 'b': 'y'}"),
    ],
)
def test_a_factory_that_returns_no_array_is_bad_input(tmp_path, capsys, name, shown):
    (tmp_path / "factories.py").write_text(FACTORIES)
    with warnings.catch_warnings():  # JAX warns about a generator leaf
        warnings.simplefilter("ignore", DeprecationWarning)
        assert main(["paths", f"{tmp_path / 'factories.py'}:{name}"]) == 2
    err = capsys.readouterr().err
    assert f"{name}() returned {shown}" in err and "which holds no array" in err


def test_a_long_value_without_arrays_is_shown_cut(tmp_path, capsys):
    (tmp_path / "factories.py").write_text(FACTORIES)
    assert main(["paths", f"{tmp_path / 'factories.py'}:long"]) == 2
    shown = repr(list(range(100)))[:77] + "..."
    assert capsys.readouterr().err == (
        f"treeglob paths: {tmp_path / 'factories.py'}:long: long() returned list {shown}, which holds no "
        "array. A factory returns the model (or a PyTree of its parameters).\n"
    )


def test_a_factory_that_exits_is_bad_input(tmp_path, capsys):
    (tmp_path / "factories.py").write_text(FACTORIES)
    assert main(["paths", f"{tmp_path / 'factories.py'}:exits"]) == 2
    assert "calling exits() failed: SystemExit: 3" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["paths", "{dir}"], r"x.safetensors: is a directory, not a .safetensors file"),
        (["paths", ":f"], r":f: a model factory is written module:function or path/to/file.py:function"),
        (["paths", "mod:"], r"mod:: a model factory is written module:function"),
        (["paths", "{npz}", "--stacked", "h=0"], r"--stacked 'h=0': write PATH=AXES"),
        (["paths", "{npz}", "--stacked", "=1"], r"--stacked '=1': write PATH=AXES"),
    ],
)
def test_more_bad_input_exits_2(tmp_path, capsys, argv, message):
    (tmp_path / "x.safetensors").mkdir()
    np.savez(tmp_path / "m.npz", w=np.zeros(2))
    names = {"dir": tmp_path / "x.safetensors", "npz": tmp_path / "m.npz"}
    assert main([a.format(**names) for a in argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_npz_names_split_on_dots_and_slashes(tmp_path):
    np.savez(tmp_path / "m.npz", **{"blocks.0/attn.w": np.zeros(2), "head/w": np.zeros(1)})
    assert tg.paths(load_source(str(tmp_path / "m.npz")).tree) == ["blocks.0.attn.w", "head.w"]


def _write_safetensors(path, entries, data=b""):
    header = json.dumps(entries, separators=(",", ":")).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return len(header)


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly(tmp_path):
    _write_safetensors(
        tmp_path / "big.safetensors",
        {f"layer.{i}.weight": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(20000)},
    )
    command = (
        f"{sys.executable} -m treeglob explain {tmp_path / 'big.safetensors'} --preset timm --json | head -1"
    )
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert result.stdout == "{\n"
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr


# ----------------------------------------------------------------------------
# 5. Huge legal safetensors headers, and malformed ones


def test_a_huge_header_is_read_in_bounded_time_and_memory(tmp_path):
    n = 200_000
    entries = {
        f"m.{i // 100}.t{i % 100}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(n)
    }
    size = _write_safetensors(tmp_path / "huge.safetensors", entries)
    del entries
    start = time.perf_counter()
    tracemalloc.start()
    tree = load_source(str(tmp_path / "huge.safetensors")).tree
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    elapsed = time.perf_counter() - start
    assert len(jax.tree.leaves(tree)) == n and tree["m.1999.t99"].shape == (0,)
    assert tg.paths(tree)[:2] == ["m.0.t0", "m.0.t1"]
    # The result itself (200k names and records) is most of it; a whole-object JSON
    # decode would take many times more.
    assert peak < 8 * size, f"peak {peak:,} bytes for a {size:,}-byte header"
    assert elapsed < 60  # a bound against pathological slowness, not a benchmark


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01", r"shorter than its 8-byte header length"),
        ((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{}", r"more than the 100,000,000 treeglob reads"),
        ((100).to_bytes(8, "little") + b"{}", r"header length is 100 bytes but the file holds only 2"),
        ((2).to_bytes(8, "little") + b"\xff\xfe", r"the header is not UTF-8"),
        ((2).to_bytes(8, "little") + b"[]", r"the header is not a JSON object\."),
        (
            (4).to_bytes(8, "little") + b"{1:2",
            r"invalid JSON \(Expecting property name enclosed in double quotes\) at character 1 of the header",
        ),
        (
            (9).to_bytes(8, "little") + b'{"a" 2}  ',
            r"invalid JSON \(Expecting ':' delimiter\) at character 5",
        ),
        ((9).to_bytes(8, "little") + b'{"a":[}  ', r"invalid JSON"),
        ((8).to_bytes(8, "little") + b'{"a":2} ', r"the entry of tensor 'a' must be an object"),
    ],
)
def test_malformed_headers_are_bad_input(tmp_path, capsys, content, message):
    (tmp_path / "bad.safetensors").write_bytes(content)
    assert main(["paths", str(tmp_path / "bad.safetensors")]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, r"tensor 'a' has the dtype 'X9'"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, r"tensor 'a' has the shape \[-1\]"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, r"do not span its 8 bytes"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, r"ends at byte 8 of the data"),
        ({"__metadata__": {"k": 1}}, r"__metadata__ must map strings to strings"),
    ],
)
def test_inconsistent_entries_are_bad_input(tmp_path, capsys, entries, message):
    _write_safetensors(tmp_path / "bad.safetensors", entries, b"\0" * 4)
    assert main(["paths", str(tmp_path / "bad.safetensors")]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_duplicate_tensor_name_is_bad_input(tmp_path, capsys):
    header = b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    (tmp_path / "dup.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert main(["paths", str(tmp_path / "dup.safetensors")]) == 2
    assert "the tensor name 'a' appears twice" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# 6. Warnings in normal use


def test_a_presets_catch_all_does_not_warn_when_nothing_decays():
    biases_only = {"fc": {"bias": jnp.zeros(3)}, "ln": {"bias": jnp.zeros(3)}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for preset in (tg.presets.DEFAULT, tg.presets.TIMM, tg.presets.HF):
            tx = optax.adamw(1e-3, mask=tg.decay_mask(preset))
            state = tx.init(biases_only)
            tx.update(biases_only, state, biases_only)
            assert "shadowed" not in str(tg.explain(biases_only, preset))


def test_a_training_loop_warns_once_per_rule_set():
    params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    rules = [("**", "decay"), ("b", "no_decay")]
    tx = optax.adamw(1e-3, mask=tg.decay_mask(rules))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = tx.init(params)
        for _ in range(3):
            _, state = tx.update(params, state, params)
    assert [type(w.message) for w in caught] == [tg.ShadowedRuleWarning]
    assert caught[0].filename == __file__


# ----------------------------------------------------------------------------
# 8. A key that reads as a regex


def test_a_key_that_reads_as_a_regex_is_quoted():
    tree = {"re:x": 1, "y": 2}
    assert tg.paths(tree) == ['"re:x"', "y"]
    assert tg.mask(tree, tg.paths(tree)[0]) == {"re:x": True, "y": False}


# ----------------------------------------------------------------------------
# Behaviours the other tests left loose


@pytest.mark.parametrize(
    ("segment", "expected"),
    [("15", True), ("37", True), ("20", True), ("29", True), ("14", False), ("38", False), ("39", False)]
    + [("1e", False), ("40", False), ("3", False), ("150", False), ("015", False)],
)
def test_ranges_whose_bounds_differ_in_the_leading_digit(segment, expected):
    tree = {segment: 1, "other": 2}
    assert tg.mask(tree, "{15..37}", strict=False)[segment] is expected
    assert (re.fullmatch(tg.translate("{15..37}"), segment) is not None) is expected


def test_every_dtype_kind_counts():
    tree = {"f": np.zeros(2, np.float32), "i": np.zeros(2, np.int32), "b": np.zeros(2, bool)}
    assert tg.mask(tree, tg.dtype(jnp.floating, jnp.integer)) == {"b": False, "f": True, "i": True}
    assert tg.mask(tree, tg.dtype(jnp.integer, jnp.floating)) == {"b": False, "f": True, "i": True}


class OnlyShape:
    shape = (2, 2)


class OnlyDtype:
    dtype = np.dtype("float32")


@pytest.mark.parametrize("leaf", [OnlyShape(), OnlyDtype()])
def test_a_leaf_with_only_shape_or_only_dtype_is_not_an_array(leaf):
    tree = {"x": leaf, "a": np.zeros((2, 2))}
    for selector in (tg.ndim == 2, tg.shape(2, 2), tg.size == 4, tg.shape(...)):
        assert tg.mask(tree, selector) == {"a": True, "x": False}


def test_escapes_inside_quoted_segments_keep_later_dots_as_separators():
    assert split_path('x."a\\"b".y') == ("x", 'a"b', "y")
    assert split_path('x."a.b\\\\".y') == ("x", "a.b\\", "y")
    tree = {"x": {'a"b': {"y": np.zeros((3, 2))}}, "z": np.zeros((2, 2))}
    assert tg.paths(tree)[0] == 'x."a\\"b".y'
    assert tg.mask(tree, tg.ndim == 1, stacked={'x."a\\"b".y': 1}) == {"x": {'a"b': {"y": True}}, "z": False}
    assert tg.mask(tree, '^x."a\\"b".y$') == {"x": {'a"b': {"y": True}}, "z": False}


class WithKey:
    def __init__(self, key):
        self.key = key


class WithName:
    def __init__(self, name):
        self.name = name


class WithIdx:
    def __init__(self, idx):
        self.idx = idx


class Bare:
    def __str__(self):
        return "bare"


@pytest.mark.parametrize(
    ("key", "text"), [(WithKey("k"), "k"), (WithName("n"), "n"), (WithIdx(3), "3"), (Bare(), "bare")]
)
def test_custom_key_classes_render_as_documented(key, text):
    assert key_text(key) == text

    class Node:
        def __init__(self, x):
            self.x = x

    jtu.register_pytree_with_keys(Node, lambda n: (((key, n.x),), None), lambda aux, ch: Node(ch[0]))
    assert tg.paths({"n": Node(1)}) == [f"n.{text}"]


def test_reflected_operators_and_truth():
    sel = tg.glob("b")
    tree = {"a": {"bias": 1}, "b": 2}
    assert tg.mask(tree, "*.bias" | sel) == {"a": {"bias": True}, "b": True}
    assert tg.mask(tree, "**" - sel) == {"a": {"bias": True}, "b": False}
    assert tg.mask(tree, "**" & sel) == {"a": {"bias": False}, "b": True}
    with pytest.raises(TypeError, match="has no truth value"):
        bool(tg.ndim)
    with pytest.raises(TypeError, match="has no truth value"):
        bool(sel)


@pytest.mark.parametrize(
    ("selector", "text"),
    [
        (tg.all_of("a", tg.ndim >= 2, "c"), "(glob('a') & (ndim >= 2) & glob('c'))"),
        (tg.all_of("a"), "glob('a')"),
        (tg.any_of("a", "b"), "any_of(glob('a'), glob('b'))"),
        (tg.any_of("a", require_each=True), "any_of(glob('a'), require_each=True)"),
        (tg.any_of("a", "b", require_each=True), "any_of(glob('a'), glob('b'), require_each=True)"),
        (tg.dtype(jnp.floating, "int32"), "dtype(floating, int32)"),
        (tg.shape(None, 3, ...), "shape(None, 3, ...)"),
        (tg.inside(eqx.nn.Linear, eqx.nn.LayerNorm), "inside(Linear, LayerNorm)"),
        (tg.owned_by(eqx.nn.Linear | eqx.nn.Embedding), "owned_by(Linear, Embedding)"),
        (~tg.glob("a", ignore_case=True), "~glob('a', ignore_case=True)"),
        (tg.glob("a") - "b", "(glob('a') - glob('b'))"),
        (tg.optional(tg.regex("a.b")), "optional(regex('a.b'))"),
        (tg.size < 10, "(size < 10)"),
        (tg.any_of(True), "True"),
    ],
)
def test_repr_of_every_selector_kind(selector, text):
    assert repr(selector) == text


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: tg.glob("[^abc"), ValueError, r"(?s)'\[\^\.\.\.\]' is regex syntax.*Write '\[!\.\.\.\]'"),
        (
            lambda: tg.shape(..., 3, ...),
            TypeError,
            r"shape\(\) takes at most one `...`, got \(Ellipsis, 3, Ellipsis\)",
        ),
        (lambda: tg.regex(3), TypeError, r"regex\(\) takes a str or re.Pattern, got int: 3"),
    ],
)
def test_error_texts(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_more_than_20_uncovered_leaves_are_summarised():
    tree = {f"w{i:02d}": 0 for i in range(25)}
    with pytest.raises(ValueError, match=r"(?s)^25 of 25 leaves match no rule.*w19\n    \.\.\. and 5 more\n"):
        tg.labels(tree, [(tg.optional("none"), "x")])


def test_a_label_that_is_not_a_valid_pattern_gets_no_swap_hint():
    with pytest.raises(tg.NoMatchError) as info:
        tg.labels({"w": 1}, [("x", "a..b")], default="y")
    assert "does match paths" not in str(info.value)
    with pytest.raises(
        tg.NoMatchError, match=r"Its label 'w' does match paths: rules are \(selector, label\)"
    ):
        tg.labels({"w": 1}, [("x", "w")], default="y")


def test_a_stacked_key_with_no_close_match():
    with pytest.raises(
        ValueError, match=r"^stacked names the subtree 'qqqq', which is not in the tree\. Give the path"
    ):
        tg.paths({"blocks": {"w": np.zeros((2, 2))}}, stacked={"qqqq": 1})
    with pytest.raises(ValueError, match=r"which is not in the tree\. Close matches: blocks\. Give the path"):
        tg.paths({"blocks": {"w": np.zeros((2, 2))}}, stacked={"block": 1})


class Picky:
    """A node whose unflatten refuses int leaves (the placeholders of a one-level rebuild)."""

    def __init__(self, a, b, c):
        self.a, self.b, self.c = a, b, c


def _picky_unflatten(aux, children):
    if any(type(c) is int for c in children):
        raise TypeError("Picky holds no ints")
    return Picky(*children)


jtu.register_pytree_with_keys(
    Picky,
    lambda p: (tuple((jtu.GetAttrKey(k), getattr(p, k)) for k in "abc"), None),
    _picky_unflatten,
)


def test_nodes_that_refuse_placeholders_with_none_children_and_earlier_siblings():
    tree = {
        "first": np.zeros(1),
        "p": [Picky(None, np.zeros(2), {"x": np.zeros(3), "y": None}), Picky(np.zeros(4), None, None)],
    }
    assert tg.paths(tree) == ["first", "p.0.b", "p.0.c.x", "p.1.a"]
    assert jax.tree.leaves(tg.mask(tree, tg.owned_by(Picky))) == [False, True, False, True]
    assert jax.tree.leaves(tg.mask(tree, tg.inside(Picky) & "x")) == [False, False, True, False]


def test_the_quoting_round_trip():
    for text in ["", "a.b", 'q"', "re:x", "sp ace", "ok", "x\\y", "$", "^a"]:
        assert split_path(quote(text)) == (text,)
