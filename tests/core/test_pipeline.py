"""One resolution pipeline: every entry point decides, and fails, exactly as the others do."""

import ast
import pathlib
import re
import subprocess
import sys
import textwrap
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import treeglob as tg
from conftest import Transformer
from treeglob._cli.main import main
from treeglob._core.pattern import compile_glob
from treeglob._core.rules import normalize_rules

SRC = pathlib.Path(tg.__file__).parent


# ----------------------------------------------------------------------------
# What each entry point hands over, on the same trees and rules


def _spy(log, name):
    """A transformation that records which leaves reach it (the others are MaskedNodes)."""

    def init(params):
        log[name] = [not isinstance(x, optax.MaskedNode) for x in jax.tree.leaves(params, is_leaf=_masked)]
        return optax.EmptyState()

    return optax.GradientTransformation(init, lambda u, s, p=None: (u, s))


def _masked(x):
    return isinstance(x, optax.MaskedNode)


def _labels_through_optax(tree, rules, default, stacked=None):
    """The label of each leaf as seen by the transforms of `multi_transform`."""
    names = list(dict.fromkeys([label for _, label in rules] + [default]))
    log = {}
    tx = tg.multi_transform({n: _spy(log, n) for n in names}, rules, default=default, stacked=stacked)
    tx.init(tree)
    per_leaf = [None] * len(jax.tree.leaves(tree))
    for name in names:
        for i, selected in enumerate(log[name]):
            if selected:
                assert per_leaf[i] is None
                per_leaf[i] = name
    return per_leaf


def _selected_through_masked(tree, selector, stacked=None):
    log = {}
    tg.masked(_spy(log, "inner"), selector, stacked=stacked).init(tree)
    return log["inner"]


def _plain():
    return {
        "embed": {"weight": np.zeros((10, 4))},
        "blocks": [{"w": np.zeros((4, 4)), "b": np.zeros(4)} for _ in range(3)],
        "head": {"weight": np.zeros((4, 2)), "bias": np.zeros(2)},
    }


def _nested():
    return eqx.filter(Transformer(depth=3, key=jax.random.key(0)), eqx.is_array)


def _stack(params):
    return eqx.tree_at(lambda m: m.blocks, params, jtu.tree_map(lambda *xs: jnp.stack(xs), *params.blocks))


CASES = {
    "plain": (_plain, [("embed", "frozen"), ("*.b", "no_decay"), ("*.bias", "no_decay")], "decay"),
    "equinox": (
        _nested,
        [(tg.inside(eqx.nn.Embedding), "frozen"), ((tg.ndim <= 1) | eqx.nn.LayerNorm, "no_decay")],
        "decay",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_every_entry_point_agrees(case):
    make, rules, default = CASES[case]
    tree = make()
    expected = jax.tree.leaves(tg.labels(tree, rules, default=default))
    assert [r.label for r in tg.explain(tree, rules, default=default).rows] == expected
    assert _labels_through_optax(tree, rules, default) == expected
    for label in ("frozen", "no_decay", "decay"):
        as_mask = jax.tree.leaves(
            tg.mask(tree, [s for s, lab in rules if lab == label] or False, strict=False)
        )
        first_match = [e == label for e in expected]
        if label != default:
            # A label's selectors, minus what earlier rules took, is what the label gets.
            assert [m and f for m, f in zip(as_mask, first_match, strict=True)] == first_match
    decay = jax.tree.leaves(tg.decay_mask([*rules, ("**", default)])(tree))
    assert decay == [e == "decay" for e in expected]
    selector = rules[1][0]
    assert _selected_through_masked(tree, selector) == jax.tree.leaves(tg.mask(tree, selector))


def test_stacked_rows_are_the_unstacked_models_rows():
    params = _nested()
    stacked = _stack(params)
    rules = [("blocks.{0..1}", 0.5), (tg.ndim <= 1, 0.0)]
    flat = tg.explain(params, rules, default=1.0)
    rows = tg.explain(stacked, rules, default=1.0, stacked={"blocks": 1})
    assert [(r.path, r.shape, r.label, r.rule) for r in rows.rows] == [
        (r.path, r.shape, r.label, r.rule) for r in flat.rows
    ]
    assert rows.summary == flat.summary
    assert tg.paths(stacked, stacked={"blocks": 1}) == tg.paths(params)


def test_stacked_per_layer_labels_agree_in_explain_labels_and_the_optax_wrappers():
    stacked = _stack(_nested())
    rules, kw = [("blocks.{0..1}", "frozen")], {"default": "train", "stacked": {"blocks": 1}}
    messages = []
    for call in (
        lambda: tg.labels(stacked, rules, **kw),
        lambda: tg.explain(stacked, rules, **kw),
        lambda: tg.multi_transform(
            {"frozen": optax.set_to_zero(), "train": optax.sgd(1.0)}, rules, **kw
        ).init(stacked),
    ):
        with pytest.raises(ValueError) as info:
            call()
        messages.append(info.value)
    # multi_transform cannot take per-layer arrays either, and says so itself.
    assert "unhashable" not in str(messages[2])
    texts = [re.sub(r"^\w+\(\): ", "", str(m)) for m in messages[:2]]
    assert texts[0] == texts[1]
    assert str(messages[0]).startswith("labels(): the rules give different labels ('frozen', 'train')")
    assert str(messages[1]).startswith("explain(): ")
    assert re.match(
        r"multi_transform\(\): the rules give different labels \('frozen', 'train'\) to the layers of the "
        r"stacked leaf blocks.ln1.weight \(layers 0, 1: 'frozen'; layers 2: 'train'\)\. Each leaf goes to one "
        r"transformation, whole",
        str(messages[2]),
    )
    # Numeric labels may differ per layer: labels gives per-layer arrays, explain the rows.
    numeric = tg.labels(stacked, [("blocks.{0..1}", 0.0)], default=1.0, stacked={"blocks": 1})
    assert numeric.blocks.mlp.layers[0].weight.ravel().tolist() == [0.0, 0.0, 1.0]


def test_the_same_mistake_raises_the_same_error_everywhere():
    tree = _plain()
    rules = [("*.bais", "no_decay")]
    mesh = jax.make_mesh((1,), ("x",))
    calls = {
        "labels": lambda: tg.labels(tree, rules, default="decay"),
        "explain": lambda: tg.explain(tree, rules, default="decay"),
        "multi_transform": lambda: tg.multi_transform(
            {"no_decay": optax.sgd(1.0), "decay": optax.sgd(1.0)}, rules, default="decay"
        ).init(tree),
        "decay_mask": lambda: tg.decay_mask([*rules, ("**", "decay")])(tree),
        "scale_by_rules": lambda: tg.scale_by_rules([("*.bais", 0.5)]).update(tree, optax.EmptyState()),
        "shardings": lambda: tg.shardings(tree, [("*.bais", P())], mesh),
    }
    errors = {}
    for name, call in calls.items():
        with pytest.raises(tg.NoMatchError) as info:
            call()
        errors[name] = re.sub(r"label (\S+)\)", "label ...)", str(info.value))
    assert len(set(errors.values())) == 1, errors
    # layer_ids applies the rule outside the blocks, and shows that rewritten rule.
    with pytest.raises(
        tg.NoMatchError, match=r"rule 0 \(label 0\) \(glob\('\*.bais'\) - glob\('\^blocks'\)\)"
    ):
        tg.layer_ids(tree, rules=[("*.bais", 0)])
    assert "In rule 0" not in errors["labels"] and "The selector of rule 0 (label ...)" in errors["labels"]


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda t: tg.mask(t, "*.bais"), "mask"),
        (lambda t: tg.masked(optax.sgd(1.0), "*.bais").init(t), "masked"),
        (lambda t: tg.freeze(optax.sgd(1.0), "*.bais").init(t), "freeze"),
    ],
)
def test_a_selectors_message_names_the_function_called(call, name):
    with pytest.raises(
        tg.NoMatchError, match=rf"^The selector given to {name}\(\) glob\('\*.bais'\) matches no leaf"
    ):
        call(_plain())


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda s: tg.mask(s, "x"), "mask"),
        (lambda s: tg.labels(s, [("x", 1)]), "labels"),
        (lambda s: tg.explain(s, [("x", 1)]), "explain"),
        (lambda s: tg.decay_mask()(s), "decay_mask"),
        (lambda s: tg.freeze(optax.sgd(1.0), "x").init(s), "freeze"),
        (lambda s: tg.layer_ids(s), "layer_ids"),
        (lambda s: tg.layer_decay_scales(s, 0.5), "layer_decay_scales"),
        (lambda s: tg.shardings(s, [("x", P())], jax.make_mesh((1,), ("x",))), "shardings"),
    ],
)
def test_a_selector_where_the_tree_goes_is_named_by_every_entry_point(call, name):
    with pytest.raises(
        TypeError, match=rf"^{name}\(\) got a selector \(glob\('\*.bias'\)\) where the tree goes"
    ):
        call(tg.glob("*.bias"))


def test_shadowed_rule_warnings_point_at_the_users_line():
    rules = [("**", "decay"), ("*.b", "no_decay")]
    for call in (
        lambda: tg.labels(_plain(), rules),
        lambda: tg.decay_mask(rules)(_plain()),
        lambda: tg.scale_by_rules([("**", 1.0), ("*.b", 0.5)]).update(_plain(), optax.EmptyState()),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        assert [w.filename for w in caught] == [__file__], [w.filename for w in caught]


def test_rules_are_normalized_once():
    rules = normalize_rules([("*.b", "x"), (tg.ndim >= 2, "y")], default="z")
    assert normalize_rules(rules) is rules
    assert normalize_rules(rules, default="z") is rules
    with pytest.raises(TypeError, match="The label of default is None"):
        normalize_rules(rules, default=None)


def test_selectors_compare_by_their_source_not_by_the_compile_cache():
    a = tg.glob("x.*")
    compile_glob.cache_clear()
    b = tg.glob("x.*")
    assert a == b and hash(a) == hash(b)
    assert a != tg.glob("x.*", ignore_case=True)
    assert tg.regex("a.b") == tg.regex(re.compile("a.b")) != tg.regex("a.b", ignore_case=True)
    config = tg.load_rules({"rules": [{"match": "*.bias", "label": "no_decay"}]})
    compile_glob.cache_clear()
    assert config.rules == [(tg.glob("*.bias"), "no_decay")]


def test_an_optional_rule_stays_optional_when_a_recipe_rewrites_it():
    beit = {"cls_token": 0, "blocks": [{"w": 0}, {"w": 0}], "fc_norm": {"scale": 0}, "head": {"w": 0}}
    assert tg.layer_decay_scales(beit, 0.5)["fc_norm"]["scale"] == 1.0
    with pytest.raises(tg.NoMatchError, match="rule 1"):
        tg.layer_ids(beit, rules=[(tg.optional("nothing"), 0), ("norm", -2)])


def test_ignore_case_errors_point_at_the_text_as_written():
    with pytest.raises(ValueError) as info:
        tg.glob("Straße.[ab", ignore_case=True)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("Invalid pattern 'Straße.[ab' at position 7: unbalanced '['")
    assert lines[2].index("^") - lines[1].index("'") == 8  # the '[' after the opening quote
    assert jax.tree.leaves(
        tg.mask({"STRASSE": {"A": 1}, "x": 2}, tg.glob("straße.[ab]", ignore_case=True))
    ) == [
        True,
        False,
    ]


def test_cli_explain_fails_where_labels_fails(tmp_path, capsys):
    np.savez(tmp_path / "scan.npz", **{"blocks/w": np.zeros((4, 3, 3)), "head/w": np.zeros((3, 2))})
    args = ["explain", str(tmp_path / "scan.npz"), "--rule", "frozen=blocks.{0..1}", "--default", "train"]
    assert main([*args, "--stacked", "blocks=1"]) == 1
    assert "explain(): the rules give different labels ('frozen', 'train')" in capsys.readouterr().err
    assert main([*args, "--stacked", "blocks=1", "--filter", "head", "--json"]) == 1
    assert main(["explain", str(tmp_path / "scan.npz"), "--rule", "x=blocks", "--default", "y"]) == 0


# ----------------------------------------------------------------------------
# Deep trees: every condition walks iteratively


DEEP = """
import sys
sys.setrecursionlimit(60000)
import jax, numpy as np, treeglob as tg

class Box:
    def __init__(self, inner, leaf):
        self.inner, self.leaf = inner, leaf

jax.tree_util.register_pytree_with_keys(
    Box,
    lambda b: (((jax.tree_util.GetAttrKey("inner"), b.inner), (jax.tree_util.GetAttrKey("leaf"), b.leaf)), None),
    lambda aux, children: Box(*children),
)
depth = 5000
tree = np.zeros(3)
for i in range(depth):
    tree = Box(tree, np.zeros(2)) if i % 2 else {"inner": tree, "leaf": np.zeros(2)}
n = depth + 1
paths = tg.paths(tree)
assert len(paths) == n and paths[0] == ".".join(["inner"] * depth)
assert sum(jax.tree.leaves(tg.mask(tree, "leaf"))) == depth
assert sum(jax.tree.leaves(tg.mask(tree, tg.inside(Box)))) == n  # the root is a Box
assert sum(jax.tree.leaves(tg.mask(tree, tg.inside(Box) & "^inner.inner.leaf$"))) == 1
assert sum(jax.tree.leaves(tg.mask(tree, tg.owned_by(Box)))) == depth // 2
assert sum(jax.tree.leaves(tg.mask(tree, "^" + paths[0] + "$"))) == 1
labels = jax.tree.leaves(tg.labels(tree, [(tg.owned_by(Box), "box"), ("leaf", "leaf")], default="root"))
report = tg.explain(tree, [(tg.owned_by(Box), "box"), ("leaf", "leaf")], default="root")
assert [r.label for r in report.rows] == labels
print("deep ok")
"""


@pytest.mark.slow
def test_a_tree_5000_levels_deep_works_with_every_condition():
    result = subprocess.run([sys.executable, "-c", DEEP], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deep ok" in result.stdout


# ----------------------------------------------------------------------------
# Architecture: modules import down, never in a circle, and no private names


def _imports():
    graph, private = {}, []
    for path in sorted(SRC.glob("*.py")):
        module = path.stem
        graph[module] = set()
        for node in ast.walk(ast.parse(path.read_text())):  # every import, lazy ones included
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [a.name for a in node.names]
                graph[module].update(t.split(".")[0] for t in targets)
                if node.module:
                    private += [
                        f"{module} <- {node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                    ]
            elif isinstance(node, ast.ImportFrom | ast.Import):
                names = (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                )
                graph[module].update(n.split(".")[1] for n in names if n.startswith("treeglob."))
    return graph, private


def test_no_import_cycle_among_the_modules():
    graph, _ = _imports()
    graph.pop("__init__")
    state = {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join([*trail, module])
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            visit(target, [*trail, module])
        state[module] = "done"

    for module in graph:
        visit(module, [])


def test_no_private_name_is_imported_across_modules():
    assert _imports()[1] == []


def test_the_version_is_the_installed_distribution_s_and_unknown_names_are_attribute_errors():
    import importlib.metadata

    import treeglob

    vars(treeglob).pop("__version__", None)  # read on first use, then kept
    assert treeglob.__version__ == importlib.metadata.version("treeglob")
    assert "__version__" in dir(treeglob)
    vars(treeglob).pop("__version__", None)
    assert "__version__" in dir(treeglob)  # before its first use, too
    with pytest.raises(AttributeError, match=r"^module 'treeglob' has no attribute 'nonexistent'$"):
        treeglob.nonexistent  # noqa: B018


LAZY_IMPORT = """
import sys
import treeglob
loaded = {m for m in sys.modules if m.startswith("treeglob.") or m == "jax"}
print(sorted(loaded & {"jax", *(f"treeglob.{m}" for m in %r)}))
from treeglob import *
names = {name: getattr(treeglob, name) for name in treeglob.__all__}
print(len(names), set(treeglob.__all__) <= set(dir(treeglob)), "__version__" in dir(treeglob))
print(treeglob.presets.DEFAULT is sys.modules["treeglob.presets"].DEFAULT, treeglob.__version__)
"""


@pytest.mark.slow
def test_import_loads_every_public_name_on_first_use():
    # `import treeglob` loads no part of treeglob (nor JAX); `from treeglob import X` and
    # dir() see every name all the same.
    lazy = ["_core", "_training", "_checkpoints", "presets", "_config", "_cli", "_surgery"]
    result = subprocess.run(
        [sys.executable, "-c", LAZY_IMPORT % (lazy,)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import treeglob

    assert result.stdout.splitlines() == [
        "[]",
        f"{len(tg.__all__)} True True",
        f"True {treeglob.__version__}",
    ]
    for name in tg.__all__:
        exec(f"from treeglob import {name}", {})


@pytest.mark.slow
@pytest.mark.parametrize(
    "first_use",
    [
        "tg.mask({'a': 1, 'b': 2}, 'a')",
        "tg.labels({'a': 1, 'b': 2}, [(re.compile('a'), True)], default=False)",
        "tg.explain({'a': 1, 'b': 2}, [('a', True)], default=False).summary[True]['leaves'] == 1",
    ],
)
def test_a_first_use_of_one_name_coerces_patterns(first_use):
    # Strings, regexes and classes coerce by registrations made where the conditions are
    # defined: a fresh process that uses one function first must have them.
    code = f"import re, treeglob as tg; print(bool({first_use}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (0, "True\n"), result.stderr[-3000:]


TWO_THREADS = """
import threading, treeglob as tg
barrier, errors = threading.Barrier(2), []
def run(first_use):
    barrier.wait()
    try:
        first_use()
    except Exception as exc:
        errors.append(repr(exc))
threads = [
    threading.Thread(target=run, args=(lambda: tg.glob,)),
    threading.Thread(target=run, args=(lambda: tg.mask({"a": 1, "b": 2}, "a"),)),
]
for t in threads: t.start()
for t in threads: t.join()
print(errors)
"""


@pytest.mark.slow
def test_two_threads_using_treeglob_first_at_once_both_succeed():
    # One thread importing the conditions while another coerces a string: the coercion
    # waits for the registrations instead of finding none (seen 15 times in 20 before).
    for _ in range(5):
        result = subprocess.run(
            [sys.executable, "-c", TWO_THREADS], capture_output=True, text=True, timeout=120
        )
        assert (result.returncode, result.stdout) == (0, "[]\n"), result.stdout + result.stderr[-3000:]


def test_ordinary_trees_take_the_structure_from_the_treedef():
    # The key paths are a fallback for custom nodes that refuse placeholder leaves
    # (and for the jax releases that cannot rebuild one level of a treedef).
    from treeglob._core.structure import _CACHE, ONE_LEVEL
    from treeglob._core.tree import TreeView

    if ONE_LEVEL is None:
        pytest.skip("this jax release cannot build a one-level treedef")
    _CACHE.clear()
    view = TreeView(_nested())
    assert len(view) == 44 and "key_paths" not in view.__dict__


@pytest.mark.slow
def test_deep_recursion_in_jax_is_a_treeglob_error():
    code = textwrap.dedent(
        """
        import treeglob as tg
        tree = 1.0
        for _ in range(3000):
            tree = [tree]
        try:
            tg.paths(tree)
        except ValueError as exc:
            print(exc)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "nested deeper than JAX can flatten" in result.stdout, result.stdout + result.stderr[-2000:]
