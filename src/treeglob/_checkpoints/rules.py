"""A transfer's rules together (rename, skip, ignore, transform), and their check before any
file is read, for `load`, rules files and the command line alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from .._core.selector import coerce
from .rename import parse_renames
from .transforms import parse_transforms

__all__ = ["TransferRules", "as_patterns", "check_rules"]


class TransferRules(NamedTuple):
    """Checkpoint-transfer rules loaded from data: `treeglob.load(model, source, **rules._asdict())`."""

    rename: Sequence[Any] = ()  # (pattern, replacement or tuple of them)
    skip: Sequence[Any] = ()  # patterns
    ignore: Sequence[Any] = ()  # patterns
    transform: Sequence[Any] = ()  # (pattern, transform name)


def as_patterns(value: Any) -> list[Any]:
    """A list of patterns from a list, a tuple or one pattern."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_rules(rename: Any = None, skip: Any = None, ignore: Any = None, transform: Any = None) -> None:
    """Raise what `load` would for malformed rules, before any model or checkpoint is read."""
    parse_renames(rename or [])
    parse_transforms(transform or [])
    for pattern in as_patterns(skip) + as_patterns(ignore):
        coerce(pattern)
