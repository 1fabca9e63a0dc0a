"""treeglob: select PyTree leaves by path, layer type and array metadata."""

import importlib.metadata

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
from ._errors import NoMatchError as NoMatchError, ShadowedRuleWarning as ShadowedRuleWarning
from ._optax import masked as masked, multi_transform as multi_transform
from ._paths import paths as paths
from ._pattern import translate as translate
from ._report import Explanation as Explanation
from ._rules import explain as explain, labels as labels, mask as mask
from ._selector import Selector as Selector, all_of as all_of, any_of as any_of, optional as optional

__version__ = importlib.metadata.version("treeglob")

__all__ = [
    "Explanation",
    "NoMatchError",
    "Selector",
    "ShadowedRuleWarning",
    "all_of",
    "any_of",
    "dtype",
    "explain",
    "glob",
    "inside",
    "labels",
    "mask",
    "masked",
    "multi_transform",
    "ndim",
    "optional",
    "owned_by",
    "paths",
    "regex",
    "shape",
    "size",
    "translate",
    "where",
]
