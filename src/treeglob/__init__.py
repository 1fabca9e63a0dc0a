"""treeglob: select PyTree leaves by path, layer type and array metadata."""

import importlib
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import presets as presets
    from ._checkpoints.load_report import LoadReport as LoadReport, LoadRow as LoadRow
    from ._checkpoints.transfer import load as load, load_plan as load_plan, save as save
    from ._config import (
        RuleConfig as RuleConfig,
        TransferRules as TransferRules,
        load_rules as load_rules,
        load_transfer as load_transfer,
        load_treatment as load_treatment,
    )
    from ._core.conditions import (
        dtype as dtype,
        glob as glob,
        inside as inside,
        ndim as ndim,
        owned_by as owned_by,
        regex as regex,
        shape as shape,
        size as size,
        where as where,
    )
    from ._core.errors import (
        LoadError as LoadError,
        NoMatchError as NoMatchError,
        RulesFileError as RulesFileError,
        SaveError as SaveError,
        ShadowedRuleWarning as ShadowedRuleWarning,
        SourceError as SourceError,
    )
    from ._core.frameworks import stacked_layers as stacked_layers
    from ._core.nodes import ModuleRow as ModuleRow, Modules as Modules, modules as modules
    from ._core.pattern import translate as translate
    from ._core.report import (
        Explanation as Explanation,
        LeafRow as LeafRow,
        RuleRow as RuleRow,
        explain as explain,
    )
    from ._core.resolve import labels as labels, mask as mask
    from ._core.selector import Selector as Selector, all_of as all_of, any_of as any_of, optional as optional
    from ._core.tree import paths as paths
    from ._surgery.replace import replace_modules as replace_modules
    from ._training.combinators import masked as masked, multi_transform as multi_transform
    from ._training.filters import nnx_filter as nnx_filter, partition as partition
    from ._training.layer_decay import (
        layer_decay as layer_decay,
        layer_decay_scales as layer_decay_scales,
        layer_ids as layer_ids,
    )
    from ._training.layers import (
        JOIN_NEXT as JOIN_NEXT,
        JOIN_PREVIOUS as JOIN_PREVIOUS,
        LayerGroups as LayerGroups,
    )
    from ._training.metrics import norm_ratios as norm_ratios, summarize as summarize
    from ._training.recipes import (
        decay_mask as decay_mask,
        freeze as freeze,
        gradual_unfreeze as gradual_unfreeze,
        relabel as relabel,
        scale_by_rules as scale_by_rules,
        weight_decay as weight_decay,
    )
    from ._training.sharding import shardings as shardings
    from ._training.treatment import Treatment as Treatment, TreatmentTable as TreatmentTable

    __version__: str

_LAZY = {
    name: module
    for module, names in {
        "._core.conditions": [
            "dtype",
            "glob",
            "inside",
            "ndim",
            "owned_by",
            "regex",
            "shape",
            "size",
            "where",
        ],
        "._core.errors": [
            "LoadError",
            "NoMatchError",
            "RulesFileError",
            "SaveError",
            "ShadowedRuleWarning",
            "SourceError",
        ],
        "._core.pattern": ["translate"],
        "._core.resolve": ["labels", "mask"],
        "._core.selector": ["Selector", "all_of", "any_of", "optional"],
        "._core.tree": ["paths"],
        "._training.combinators": ["masked", "multi_transform"],
        ".presets": ["presets"],
        "._core.frameworks": ["stacked_layers"],
        "._core.nodes": ["ModuleRow", "Modules", "modules"],
        "._surgery.replace": ["replace_modules"],
        "._config": ["RuleConfig", "TransferRules", "load_rules", "load_transfer", "load_treatment"],
        "._training.filters": ["nnx_filter", "partition"],
        "._training.layer_decay": ["layer_decay", "layer_decay_scales", "layer_ids"],
        "._training.layers": ["JOIN_NEXT", "JOIN_PREVIOUS", "LayerGroups"],
        "._training.metrics": ["norm_ratios", "summarize"],
        "._training.recipes": [
            "decay_mask",
            "freeze",
            "gradual_unfreeze",
            "relabel",
            "scale_by_rules",
            "weight_decay",
        ],
        "._core.report": ["Explanation", "LeafRow", "RuleRow", "explain"],
        "._training.sharding": ["shardings"],
        "._training.treatment": ["Treatment", "TreatmentTable"],
        "._checkpoints.load_report": ["LoadReport", "LoadRow"],
        "._checkpoints.transfer": ["load", "load_plan", "save"],
    }.items()
    for name in names
}


# First uses from several threads import one at a time: JAX's own modules cannot be
# imported by two threads at once (each would see the other's half-initialised modules).
_IMPORTING = threading.RLock()


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is not None:
        with _IMPORTING:
            loaded = importlib.import_module(module, __name__)
        value = loaded if module == "." + name else getattr(loaded, name)
    elif name == "__version__":
        from importlib.metadata import version  # reading the installed metadata takes a millisecond

        value = version("treeglob")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, "__version__"})


__all__ = [
    "JOIN_NEXT",
    "JOIN_PREVIOUS",
    "Explanation",
    "LayerGroups",
    "LeafRow",
    "LoadError",
    "LoadReport",
    "LoadRow",
    "ModuleRow",
    "Modules",
    "NoMatchError",
    "RuleConfig",
    "RuleRow",
    "RulesFileError",
    "SaveError",
    "Selector",
    "ShadowedRuleWarning",
    "SourceError",
    "TransferRules",
    "Treatment",
    "TreatmentTable",
    "all_of",
    "any_of",
    "decay_mask",
    "dtype",
    "explain",
    "freeze",
    "glob",
    "gradual_unfreeze",
    "inside",
    "labels",
    "layer_decay",
    "layer_decay_scales",
    "layer_ids",
    "load",
    "load_plan",
    "load_rules",
    "load_transfer",
    "load_treatment",
    "mask",
    "masked",
    "modules",
    "multi_transform",
    "ndim",
    "nnx_filter",
    "norm_ratios",
    "optional",
    "owned_by",
    "partition",
    "paths",
    "presets",
    "regex",
    "relabel",
    "replace_modules",
    "save",
    "scale_by_rules",
    "shape",
    "shardings",
    "size",
    "stacked_layers",
    "summarize",
    "translate",
    "weight_decay",
    "where",
]
