"""The two exception classes treeglob adds, and the message helpers they share."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["NoMatchError", "ShadowedRuleWarning", "pattern_error", "suggest"]


class NoMatchError(ValueError):
    """A selector that must match something matched no leaf of the tree.

    Raised for the whole selector of a rule or of `mask`, and for a negated
    operand (`~s`, the right side of `a - s`). Subclasses `ValueError`.
    """


class ShadowedRuleWarning(UserWarning):
    """A rule can never decide a label: earlier rules take all its leaves."""


NoMatchError.__module__ = "treeglob"
ShadowedRuleWarning.__module__ = "treeglob"


def pattern_error(pattern: str, pos: int, problem: str, fix: str) -> ValueError:
    """A `ValueError` that quotes `pattern`, points at `pos` and says how to fix it."""
    shown = repr(pattern)
    # +1 for the opening quote of repr; escapes before `pos` shift the caret too.
    caret = len(repr(pattern[:pos])) - 1
    return ValueError(
        f"Invalid pattern {shown} at position {pos}: {problem}\n    {shown}\n    {' ' * caret}^\n{fix}"
    )


def suggest(query: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Close matches for `query` among `candidates`, best first."""
    return difflib.get_close_matches(query, list(dict.fromkeys(candidates)), n=n, cutoff=0.6)
