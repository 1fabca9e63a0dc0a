"""One evaluation of selectors on one tree: memoised results and strictness."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

from ._errors import NoMatchError, suggest
from ._paths import TreeView

if TYPE_CHECKING:
    from ._selector import Selector

_STRICT_FIX = (
    "If matching nothing is intended (e.g. a shared rule list naming parts this model "
    "lacks), wrap it in treeglob.optional(...), or pass strict=False to switch the check off."
)


class Context:
    """Evaluates selectors on one `TreeView`, each distinct selector once.

    `scope` names what is being evaluated (e.g. "rule 2 ('no_decay')") so
    that a strictness error raised deep inside a combination says where.
    """

    def __init__(self, view: TreeView, *, strict: bool):
        self.view = view
        self.strict = strict
        self.scope = ""
        self._cache: dict[Selector, np.ndarray] = {}

    def evaluate(self, selector: Selector) -> np.ndarray:
        hit = self._cache.get(selector)
        if hit is None:
            hit = self._cache[selector] = selector._eval(self)
        return hit

    def require(self, selector: Selector, role: str) -> np.ndarray:
        """Evaluate `selector`; under strictness it must match at least one leaf."""
        hit = self.evaluate(selector)
        if self.strict and not selector.may_be_empty and not hit.any():
            raise self.no_match(selector, role)
        return hit

    def no_match(self, selector: Selector, role: str, extra: str = "") -> NoMatchError:
        where = f"In {self.scope}, {role}" if self.scope else role[0].upper() + role[1:]
        lines = [f"{where} {selector!r} matches no leaf of the tree ({len(self.view)} leaves)."]
        close = self.suggestions(selector)
        if close:
            lines.append("Close matches in the tree: " + ", ".join(close) + ".")
        if extra:
            lines.append(extra)
        lines.append(_STRICT_FIX)
        return NoMatchError("\n".join(lines))

    def suggestions(self, selector: Selector) -> list[str]:
        segments = {s for segs in self.view.segments for s in segs}
        out: list[str] = []
        for pattern in selector._patterns():
            # The literal core of the pattern: drop anchors and wildcards.
            core = re.sub(r"^\^|\$$|(^|\.)\*\*(\.|$)|\*", "", pattern).strip(".")
            if not core:
                continue
            candidates = segments if "." not in core else set(self.view.paths)
            out += [c for c in suggest(core, candidates) if c not in out]
        return out
