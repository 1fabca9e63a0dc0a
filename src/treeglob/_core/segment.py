"""One path segment: the parsed items of a pattern segment and their matcher.

Inside a segment a pattern is compiled to a Thompson NFA over characters and
simulated with state sets, so matching never backtracks (`*a*a*a...b` stays
linear); results are memoised per distinct segment text, which repeats a lot
in real trees (`weight`, `bias`, `0`..`11`). Integer ranges become digit
classes (`{0..11}` -> `[0-9] | 1[0-1]`), never an expansion.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

__all__ = [
    "ANY1",
    "ANY_SEGMENTS",
    "STAR",
    "Alt",
    "Class",
    "DoubleStar",
    "Lit",
    "Range",
    "SegmentMatcher",
    "Sep",
]

# ----------------------------------------------------------------------------
# Parsed form. A segment is a tuple of items; these are the item kinds.


@dataclass(frozen=True, slots=True)
class Lit:
    char: str


@dataclass(frozen=True, slots=True)
class Class:
    regex: str  # a one-character regex class, e.g. "[a-z]"
    ignore_case: bool = False


@dataclass(frozen=True, slots=True)
class Alt:
    options: tuple[tuple[object, ...], ...]


@dataclass(frozen=True, slots=True)
class Range:
    lo: int
    hi: int


@dataclass(frozen=True, slots=True)
class Sep:
    pos: int


@dataclass(frozen=True, slots=True)
class DoubleStar:
    pos: int


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


STAR = _Marker("*")
ANY1 = _Marker("?")
#: The segment token for `**`: zero or more whole segments.
ANY_SEGMENTS = _Marker("**")


# ----------------------------------------------------------------------------
# Integer ranges as digit classes, e.g. {0..11} -> [0-9] | 1[0-1].


def _same_width(a: str, b: str) -> list[list[tuple[str, str]]]:
    """Digit-class sequences covering the equal-width decimals from `a` to `b`."""
    if len(a) == 1:
        return [[(a, b)]]
    if a[0] == b[0]:
        return [[(a[0], a[0]), *rest] for rest in _same_width(a[1:], b[1:])]
    n = len(a) - 1
    low_full, high_full = a[1:] == "0" * n, b[1:] == "9" * n
    out = [] if low_full else [[(a[0], a[0]), *r] for r in _same_width(a[1:], "9" * n)]
    first = a[0] if low_full else chr(ord(a[0]) + 1)
    last = b[0] if high_full else chr(ord(b[0]) - 1)
    if first <= last:
        out.append([(first, last)] + [("0", "9")] * n)
    if not high_full:
        out += [[(b[0], b[0]), *r] for r in _same_width("0" * n, b[1:])]
    return out


def _range_sequences(lo: int, hi: int) -> list[list[tuple[str, str]]]:
    out = []
    for width in range(len(str(lo)), len(str(hi)) + 1):
        a = max(lo, 10 ** (width - 1) if width > 1 else 0)
        b = min(hi, 10**width - 1)
        out += _same_width(str(a), str(b))
    return out


def _range_regex(lo: int, hi: int) -> str:
    def digit(r: tuple[str, str]) -> str:
        return r[0] if r[0] == r[1] else f"[{r[0]}-{r[1]}]"

    alts = []
    for seq in _range_sequences(lo, hi):
        parts = [digit(r) for r in seq]
        text = ""
        for p, g in itertools.groupby(parts):
            count = len(list(g))
            text += p if count == 1 else f"{p}{{{count}}}"
        alts.append(text)
    return "(?:" + "|".join(alts) + ")"


# ----------------------------------------------------------------------------
# One segment: a Thompson NFA over characters, memoised per segment text.


class SegmentMatcher:
    """Matches one path segment against the items of one pattern segment."""

    __slots__ = ("items", "literal", "_tests", "_next", "_eps", "_closure", "_accept", "_memo", "_dfa")

    def __init__(self, items: tuple[object, ...]):
        self.items = items
        self.literal = (
            "".join(it.char for it in items)  # type: ignore[attr-defined]
            if all(isinstance(it, Lit) for it in items)
            else None
        )
        self._memo: dict[str, bool] = {}
        self._dfa: dict[tuple[frozenset[int], str], frozenset[int]] = {}
        if self.literal is None:
            self._tests: list[object] = []
            self._next: list[int] = []
            self._eps: list[list[int]] = []
            start = self._state(None)
            self._accept = self._build(items, start)
            self._closure = [self._close(s) for s in range(len(self._tests))]

    def _state(self, test: object) -> int:
        self._tests.append(test)
        self._next.append(-1)
        self._eps.append([])
        return len(self._tests) - 1

    def _consume(self, s: int, test: object) -> int:
        c = self._state(test)
        self._eps[s].append(c)
        n = self._state(None)
        self._next[c] = n
        return n

    def _build(self, items: tuple[object, ...], s: int) -> int:
        for item in items:
            if isinstance(item, Lit):
                for char in item.char:  # casefolding may turn one character into several
                    s = self._consume(s, char)
            elif item is ANY1:
                s = self._consume(s, True)
            elif isinstance(item, Class):
                s = self._consume(
                    s, re.compile(item.regex, re.IGNORECASE if item.ignore_case else 0).fullmatch
                )
            elif item is STAR:
                loop = self._state(True)
                self._eps[s].append(loop)
                self._next[loop] = s
            elif isinstance(item, Range):
                options = tuple(
                    tuple(Class(f"[{a}-{b}]") for a, b in seq) for seq in _range_sequences(item.lo, item.hi)
                )
                s = self._alt(options, s)
            elif isinstance(item, Alt):
                s = self._alt(item.options, s)
            else:  # pragma: no cover - the parser produces nothing else
                raise AssertionError(item)
        return s

    def _alt(self, options: tuple[tuple[object, ...], ...], s: int) -> int:
        end = self._state(None)
        for option in options:
            branch = self._state(None)
            self._eps[s].append(branch)
            self._eps[self._build(option, branch)].append(end)
        return end

    def _close(self, s: int) -> frozenset[int]:
        seen, stack = {s}, [s]
        while stack:
            for t in self._eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(seen)

    def match(self, text: str) -> bool:
        if self.literal is not None:
            return text == self.literal
        hit = self._memo.get(text)
        if hit is None:
            hit = self._run(text)
            if len(self._memo) > 65536:  # bound memory on adversarial inputs
                self._memo.clear()
            self._memo[text] = hit
        return hit

    def _run(self, text: str) -> bool:
        # The set of NFA states after each character, with the transitions
        # memoised per (states, character): the DFA built lazily, so the 1000
        # block indices of a model cost a dict lookup per digit after the first few.
        current = self._closure[0]
        dfa = self._dfa
        for ch in text:
            following = dfa.get((current, ch))
            if following is None:
                if len(dfa) > 65536:  # bound memory on adversarial inputs
                    dfa.clear()
                following = dfa[(current, ch)] = self._advance(current, ch)
            if not following:
                return False
            current = following
        return self._accept in current

    def _advance(self, current: frozenset[int], ch: str) -> frozenset[int]:
        tests, nxt, closure = self._tests, self._next, self._closure
        following: set[int] = set()
        for s in current:
            test = tests[s]
            if test is None:
                continue
            if test is True or test == ch or (callable(test) and test(ch)):
                following |= closure[nxt[s]]
        return frozenset(following)

    def regex(self, any_char: str = "[^.]") -> str:
        """The segment as a regex: over a rendered path by default (wildcards stop at a
        dot), or over one raw segment with `any_char="."` (a key may hold a dot)."""
        return "".join(_item_regex(it, any_char) for it in self.items)

    def literal_text(self) -> str:
        """The literal characters of the segment, wildcards and classes left out."""
        return (
            self.literal
            if self.literal is not None
            else "".join(it.char for it in self.items if isinstance(it, Lit))
        )


def _item_regex(item: object, any_char: str = "[^.]") -> str:
    if isinstance(item, Lit):
        return re.escape(item.char)
    if item is ANY1:
        return any_char
    if item is STAR:
        return any_char + "*"
    if isinstance(item, Class):
        return item.regex
    if isinstance(item, Range):
        return _range_regex(item.lo, item.hi)
    if isinstance(item, Alt):
        return "(?:" + "|".join("".join(_item_regex(i, any_char) for i in o) for o in item.options) + ")"
    raise AssertionError(item)  # pragma: no cover
