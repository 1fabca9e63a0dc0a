"""The import contract: each layer of the package imports only the layers below it.

    _core          the selection core: paths, patterns, selectors, the pipeline, explain
    _training      optax wrappers and recipes (with treeglob.presets)      -> _core
    _checkpoints   formats, sources, transfer                             -> _core
    _surgery       modules replaced by selector                           -> _core
    _config        rules as data (label rules, transfer rules)            -> the three above
    _cli           the command line                                       -> the public API
    treeglob       the public namespace                                   -> everything

Every import statement in every module is read from its source (also the ones
inside functions and under TYPE_CHECKING). Imports by name are of the user's
modules (a rules file's types, a model factory), and of treeglob's own only in
the public namespace's `__getattr__`, the layer that may import everything.
"""

import ast
import pathlib

import pytest

from conftest import ROOT

PACKAGE = ROOT / "src" / "treeglob"

LAYERS = {
    "treeglob._core": "core",
    "treeglob._training": "training",
    "treeglob.presets": "training",
    "treeglob._checkpoints": "checkpoints",
    "treeglob._surgery": "surgery",
    "treeglob._config": "config",
    "treeglob._cli": "cli",
    "treeglob.__main__": "cli",
    "treeglob": "api",
}

ALLOWED = {
    "core": {"core"},
    "training": {"core", "training"},
    "checkpoints": {"core", "checkpoints"},
    "surgery": {"core", "surgery"},
    "config": {"core", "training", "checkpoints", "config"},
    "cli": {"api", "cli"},
    "api": {"core", "training", "checkpoints", "surgery", "config", "cli", "api"},
}

# What the command line takes from below the public API: reading what it names (a
# checkpoint file or a model factory, a transfer's rules checked before anything is read)
# and the table painter that prints it.
CLI_EXCEPTIONS = {
    "treeglob._checkpoints.sources",
    "treeglob._checkpoints.formats",
    "treeglob._checkpoints.rules",
    "treeglob._core.table",
}


def layer_of(module: str) -> str:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path) -> set[str]:
    """The treeglob modules `path` imports, as absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "treeglob"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "treeglob":
                continue
            # `from . import presets` imports a module; `from .x import Name` imports x.
            submodules = [f"{target}.{a.name}" for a in node.names]
            found = [m for m in submodules if (PACKAGE.parent / (m.replace(".", "/") + ".py")).exists()]
            out |= set(found) or {target}
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_each_module_imports_only_the_layers_below_it(path):
    name = module_name(path)
    mine = layer_of(name)
    wrong = sorted(
        target
        for target in imports(path)
        if layer_of(target) not in ALLOWED[mine] and not (mine == "cli" and target in CLI_EXCEPTIONS)
    )
    assert not wrong, f"{name} ({mine}) imports {wrong}, outside {sorted(ALLOWED[mine])}"


def test_every_module_belongs_to_a_layer_and_the_layout_is_as_documented():
    assert {layer_of(module_name(p)) for p in MODULES} == set(ALLOWED)
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__"))
    assert folders == ["_checkpoints", "_cli", "_core", "_surgery", "_training"]
