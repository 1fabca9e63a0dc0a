"""treeglob: select PyTree leaves by path, layer type and array metadata."""

import importlib.metadata

from . import presets as presets
from ._conditions import (
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
from ._config import (
    RuleConfig as RuleConfig,
    TransferRules as TransferRules,
    load_rules as load_rules,
    load_transfer as load_transfer,
)
from ._errors import (
    LoadError as LoadError,
    NoMatchError as NoMatchError,
    RulesFileError as RulesFileError,
    ShadowedRuleWarning as ShadowedRuleWarning,
    SourceError as SourceError,
)
from ._layer_decay import (
    layer_decay as layer_decay,
    layer_decay_scales as layer_decay_scales,
    layer_ids as layer_ids,
)
from ._layers import JOIN_NEXT as JOIN_NEXT, JOIN_PREVIOUS as JOIN_PREVIOUS, LayerGroups as LayerGroups
from ._metrics import norm_ratios as norm_ratios, summarize as summarize
from ._optax import masked as masked, multi_transform as multi_transform
from ._pattern import translate as translate
from ._recipes import decay_mask as decay_mask, freeze as freeze, scale_by_rules as scale_by_rules
from ._report import Explanation as Explanation, explain as explain
from ._resolve import labels as labels, mask as mask
from ._selector import Selector as Selector, all_of as all_of, any_of as any_of, optional as optional
from ._sharding import shardings as shardings
from ._transfer import (
    LoadReport as LoadReport,
    LoadRow as LoadRow,
    load as load,
    load_plan as load_plan,
    save as save,
)
from ._tree import paths as paths

__version__ = importlib.metadata.version("treeglob")

__all__ = [
    "JOIN_NEXT",
    "JOIN_PREVIOUS",
    "Explanation",
    "LayerGroups",
    "LoadError",
    "LoadReport",
    "LoadRow",
    "NoMatchError",
    "RuleConfig",
    "RulesFileError",
    "Selector",
    "ShadowedRuleWarning",
    "SourceError",
    "TransferRules",
    "all_of",
    "any_of",
    "decay_mask",
    "dtype",
    "explain",
    "freeze",
    "glob",
    "inside",
    "labels",
    "layer_decay",
    "layer_decay_scales",
    "layer_ids",
    "load",
    "load_plan",
    "load_rules",
    "load_transfer",
    "mask",
    "masked",
    "multi_transform",
    "ndim",
    "norm_ratios",
    "optional",
    "owned_by",
    "paths",
    "presets",
    "regex",
    "save",
    "scale_by_rules",
    "shape",
    "shardings",
    "size",
    "summarize",
    "translate",
    "where",
]
