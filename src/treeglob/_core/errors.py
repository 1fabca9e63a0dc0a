"""treeglob's exception and warning classes, and the message helpers they share."""

from __future__ import annotations

import difflib
import sys
import warnings
from collections.abc import Iterable
from typing import Any

__all__ = [
    "LoadError",
    "NoMatchError",
    "RulesFileError",
    "SaveError",
    "ShadowedRuleWarning",
    "SourceError",
    "listing",
    "pattern_error",
    "suggest",
    "suggest_path",
    "warn_user",
]


class NoMatchError(ValueError):
    """A selector that must match something matched no leaf of the tree.

    Raised for the whole selector of a rule or of `mask`, and for a negated
    operand (`~s`, the right side of `a - s`). Subclasses `ValueError`.
    """


class ShadowedRuleWarning(UserWarning):
    """A rule can never decide a label: earlier rules take all its leaves."""


class RulesFileError(ValueError):
    """A rules file or dict that cannot be read as rules: names the file, the entry and the problem."""


class LoadError(ValueError):
    """A checkpoint transfer that does not fit: model leaves without a tensor, tensors
    nothing uses, shapes/dtypes that differ, several tensors renamed onto one leaf.
    Lists every problem at once; `.report` (a `LoadReport`, or None where the
    names did not even pair up) has the rest."""

    def __init__(self, message: str, report: Any):
        super().__init__(message)
        self.report = report


class SaveError(OSError):
    """A checkpoint that could not be written (a full disk, a directory that is not
    writable): names the file, the cause and the fix. The file there before is unchanged.
    An `OSError`, with the cause's `errno`."""

    def __init__(self, message: str, code: int | None):
        super().__init__(message)
        self.errno = code


class SourceError(ValueError):
    """A checkpoint (or, on the command line, a model factory) that cannot be read:
    names the file and the problem."""


for _cls in (LoadError, NoMatchError, ShadowedRuleWarning, RulesFileError, SaveError, SourceError):
    _cls.__module__ = "treeglob"


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


def suggest_path(
    literal: str, paths: list[str], segments: list[tuple[str, ...]], *, ending: bool = False
) -> list[str]:
    """Close matches for a pattern's literal text among paths (with their `segments`).

    A pattern of k segments matches a run of k segments of a path (anywhere; with
    `ending`, the run that ends it, as for a node). One segment is compared with those;
    more, with whole paths first (the pattern's wildcards are left out of its literal
    text, so its own segment count is not known), then with the runs.
    """
    from .keys import runs  # here, not at the top: the errors are imported without JAX (`treeglob --help`)

    k = literal.count(".") + 1
    return (suggest(literal, paths) if k > 1 else []) or suggest(literal, runs(segments, k, ending=ending))


#: The packages whose frames lie between a user's line and treeglob (optax calls a
#: mask function of treeglob's from inside `init` / `update`, jax while tracing;
#: mutmut wraps each of treeglob's functions in a trampoline when it mutates them).
_LIBRARIES = frozenset({"treeglob", "optax", "jax", "jaxlib", "equinox", "flax", "chex", "mutmut"})


def listing(lines: list[str], limit: int = 20) -> str:
    """`lines` as an indented block of a message, the first `limit` of them and a count of the rest."""
    more = [f"... and {len(lines) - limit} more"] if len(lines) > limit else []
    return "\n".join(f"    {line}" for line in [*lines[:limit], *more])


def warn_user(message: str, category: type[Warning]) -> None:
    """`warnings.warn` pointed at the user's line: the first frame outside treeglob and
    the libraries that call it back (optax, jax, equinox)."""
    # Counted from this function's own frame, which `stacklevel=1` names: whatever wraps
    # the callers in between (a decorator's frame) is counted as it is walked.
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _LIBRARIES:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
