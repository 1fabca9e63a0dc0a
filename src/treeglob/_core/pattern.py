"""Glob and regex patterns over paths: parsing, compiling, matching, `translate`.

A glob is matched against the *list of segments* of a path, never against a
string split on dots, so a dict key that contains a dot is one segment.
Matching is two-level and linear in the path length for any pattern:

* inside one segment, a Thompson NFA over characters (no backtracking, so
  `*a*a*a*...b` cannot explode), memoised per distinct segment text;
* across segments, a set-of-states simulation over the segment tokens, which
  handles `**` and the unanchored start and end in a single pass.

Braces whose alternatives contain a `.` or `**` change the segment structure,
so they are expanded (bounded by `MAX_ALTERNATIVES`); all other braces stay
inside the segment matcher, and integer ranges are compiled to digit classes,
never expanded.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import pattern_error
from .segment import ANY1, ANY_SEGMENTS, STAR, Alt, Class, DoubleStar, Lit, Range, SegmentMatcher, Sep

__all__ = ["MAX_ALTERNATIVES", "CompiledGlob", "compile_glob", "compile_regex", "translate"]

#: Upper bound on the alternatives that braces spanning segments may expand to.
MAX_ALTERNATIVES = 256
#: Upper bound on brace nesting: deeper patterns are machine-made mistakes, and
#: the parser and the matchers recurse once per level.
MAX_NESTING = 32


class _Parser:
    """Recursive-descent parser for the glob body (anchors already removed)."""

    def __init__(self, pattern: str, body: str, offset: int):
        self.pattern = pattern  # the full pattern, quoted in errors
        self.body = body
        self.offset = offset  # position of body[0] inside pattern
        self.i = 0
        self.depth = 0  # brace nesting

    def fail(self, pos: int, problem: str, fix: str) -> ValueError:
        return pattern_error(self.pattern, pos + self.offset, problem, fix)

    def parse(self) -> list[object]:
        items = self.sequence(in_braces=False)
        if self.i < len(self.body):  # only a stray "}" stops the top level
            raise self.fail(
                self.i,
                "'}' without a matching '{'.",
                "Escape a literal brace as '\\}', or open the group with '{'.",
            )
        return items

    def sequence(self, in_braces: bool) -> list[object]:
        body, items = self.body, []
        while self.i < len(body):
            c = body[self.i]
            if c == "}" or (c == "," and in_braces):
                break
            start = self.i
            self.i += 1
            if c == "\\":
                if self.i == len(body):
                    raise self.fail(
                        start,
                        "the pattern ends with a lone '\\'.",
                        "Remove it, or write '\\\\' to match a backslash.",
                    )
                items.append(Lit(body[self.i]))
                self.i += 1
            elif c == '"':
                items.extend(self.quoted(start))
            elif c == ".":
                items.append(Sep(start))
            elif c == "*":
                if body.startswith("*", self.i):
                    if body.startswith("*", self.i + 1):
                        raise self.fail(
                            start,
                            "'***' is not a wildcard.",
                            "Use '*' inside a segment or '**' as a whole segment.",
                        )
                    self.i += 1
                    items.append(DoubleStar(start))
                else:
                    items.append(STAR)
            elif c == "?":
                items.append(ANY1)
            elif c == "[":
                items.append(self.char_class(start))
            elif c == "{":
                items.append(self.braces(start))
            else:
                items.append(Lit(c))
        return items

    def quoted(self, start: int) -> list[Lit]:
        body, chars = self.body, []
        while self.i < len(body):
            c = body[self.i]
            self.i += 1
            if c == '"':
                # An empty quoted key still occupies its segment.
                return [Lit(ch) for ch in chars] or [Lit("")]
            if c == "\\" and self.i < len(body):
                c = body[self.i]
                self.i += 1
            chars.append(c)
        raise self.fail(
            start,
            "unterminated quoted segment.",
            'Close the quote: a quoted segment such as "conv.1" matches a key literally.',
        )

    def char_class(self, start: int) -> Class:
        body = self.body
        j = self.i
        if body.startswith("^", j):
            # As in the class itself, a ']' right after '[^' is a member, not the end.
            end = body.find("]", j + 2)
            raise self.fail(
                j,
                "'[^...]' is regex syntax; globs negate a class with '!'.",
                f"Write '[!{body[j + 1 : end] if end >= 0 else '...'}]'.",
            )
        negate = body.startswith("!", j)
        if negate:
            j += 1
        first = j
        if body.startswith("]", j):  # a ']' right after '[' or '[!' is literal
            j += 1
        end = body.find("]", j)
        if end < 0:
            raise self.fail(
                start,
                "unbalanced '[': no closing ']'.",
                "Close the class, e.g. '[abc]', or escape a literal bracket as '\\['.",
            )
        members = body[first:end]
        for m in re.finditer(r"(.)-(.)", members):
            if m.group(1) > m.group(2):
                raise self.fail(
                    start + 1 + (first - self.i) + m.start(),
                    f"the class range '{m.group(0)}' is reversed.",
                    f"Write '{m.group(2)}-{m.group(1)}'.",
                )
        self.i = end + 1
        escaped = "".join("\\" + ch if ch in "\\^[]" else ch for ch in members)
        return Class("[" + ("^" if negate else "") + escaped + "]")

    def braces(self, start: int) -> Alt | Range:
        body = self.body
        m = re.compile(r"(\d+)\.\.(\d+)\}").match(body, self.i)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                raise self.fail(
                    start,
                    f"the range {{{m.group(1)}..{m.group(2)}}} is reversed.",
                    f"Write the smaller bound first: {{{hi}..{lo}}}.",
                )
            self.i = m.end()
            return Range(lo, hi)
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.fail(
                start,
                f"braces are nested more than {MAX_NESTING} deep.",
                "Flatten the alternatives, or escape literal braces as '\\{' and '\\}'.",
            )
        options = [self.sequence(in_braces=True)]
        while self.i < len(body) and body[self.i] == ",":
            self.i += 1
            options.append(self.sequence(in_braces=True))
        if self.i == len(body):
            raise self.fail(
                start,
                "unbalanced '{': no closing '}'.",
                "Close the group, e.g. '{qkv,proj}' or '{0..11}', or escape a literal brace as '\\{'.",
            )
        self.i += 1  # the closing "}"
        self.depth -= 1
        if len(options) < 2:
            content = body[start + 1 : self.i - 1]
            hint = (
                "An integer range takes two decimal bounds, e.g. '{0..11}'."
                if ".." in content
                else "List two or more alternatives, e.g. '{qkv,proj}', or escape the braces as '\\{' and '\\}'."
            )
            raise self.fail(start, f"the brace group '{{{content}}}' has a single alternative.", hint)
        return Alt(tuple(tuple(o) for o in options))


def _fold(items: Sequence[object]) -> list[object]:
    """The items for case-insensitive matching against casefolded segments."""
    out: list[object] = []
    for item in items:
        if isinstance(item, Lit):
            out.append(Lit(item.char.casefold()))
        elif isinstance(item, Class):
            out.append(Class(item.regex, ignore_case=True))
        elif isinstance(item, Alt):
            out.append(Alt(tuple(tuple(_fold(o)) for o in item.options)))
        else:
            out.append(item)
    return out


def _spans_segments(items: tuple[object, ...] | list[object]) -> bool:
    for item in items:
        if isinstance(item, Sep | DoubleStar):
            return True
        if isinstance(item, Alt) and any(_spans_segments(o) for o in item.options):
            return True
    return False


def _expand(items: list[object], pattern: str) -> list[list[object]]:
    """Expand the brace groups that span segments into whole alternatives."""
    results: list[list[object]] = [[]]
    for item in items:
        if isinstance(item, Alt) and _spans_segments([item]):
            choices = [alt for option in item.options for alt in _expand(list(option), pattern)]
            results = [r + c for r, c in itertools.product(results, choices)]
        else:
            results = [r + [item] for r in results]
        if len(results) > MAX_ALTERNATIVES:
            raise ValueError(
                f"Invalid pattern {pattern!r}: its brace groups spanning segments expand to more "
                f"than {MAX_ALTERNATIVES} alternatives.\n"
                "Keep alternatives inside one segment ('{a,b}' without dots stays unexpanded), or "
                "split the pattern into several rules or a list."
            )
    return results


def _split_segments(items: list[object], parser: _Parser) -> tuple[object, ...]:
    """Split one expanded alternative on separators into segment tokens."""
    segments: list[list[object]] = [[]]
    seps: list[int] = []
    for item in items:
        if isinstance(item, Sep):
            segments.append([])
            seps.append(item.pos)
        else:
            segments[-1].append(item)
    tokens: list[object] = []
    for k, segment in enumerate(segments):
        if not segment:
            # The separator after the empty segment, else the one before it; an
            # alternative with no separator at all (the empty one of '{a.b,}') has neither.
            pos = seps[k] if k < len(seps) else seps[k - 1] if seps else 0
            raise parser.fail(
                pos,
                "empty segment: a path segment cannot be empty.",
                "Remove the extra '.', or use '**' for any number of segments (e.g. 'blocks.**.weight').",
            )
        stars = [it for it in segment if isinstance(it, DoubleStar)]
        if stars and len(segment) > 1:
            raise parser.fail(
                stars[0].pos,
                "'**' must be a whole segment.",
                "Use '*' to match inside a segment (e.g. 'attn*'), or put '**' between dots "
                "(e.g. 'blocks.**.bias').",
            )
        if stars:
            if not tokens or tokens[-1] is not ANY_SEGMENTS:  # '**.**' is one '**'
                tokens.append(ANY_SEGMENTS)
        else:
            tokens.append(SegmentMatcher(tuple(segment)))
    return tuple(tokens)


# ----------------------------------------------------------------------------
# A whole glob.


#: The state of a glob that has matched a run of segments: with an unanchored
#: end, every leaf below is selected whatever follows.
MATCHED: frozenset[tuple[int, int]] = frozenset({(-1, -1)})
_MAX_TRANSITIONS = 65536


@dataclass(frozen=True, eq=False)
class CompiledGlob:
    """A parsed glob: alternatives of segment tokens plus anchors.

    Matching is a deterministic walk over segments: `start()`, then
    `step(state, segment)` per segment, then `accepts(state)`. A state is
    the frozenset of `(alternative, token index)` positions reached (the
    set-of-states simulation of the NFA, so no backtracking), or `MATCHED`.
    Transitions are memoised per (state, segment text), which is what makes
    walking a model's many identical subtrees cheap.
    """

    pattern: str
    alternatives: tuple[tuple[object, ...], ...]
    anchored_start: bool
    anchored_end: bool
    ignore_case: bool
    _transitions: dict = field(default_factory=dict, repr=False, compare=False)
    # A segment moves a state only through which tokens it matches: segments with the
    # same matches (the 1000 block indices, for most patterns) share their transitions.
    _by_signature: dict = field(default_factory=dict, repr=False, compare=False)
    _literals: frozenset = field(init=False, repr=False, compare=False)  # literal tokens' texts
    _general: tuple = field(init=False, repr=False, compare=False)  # the other tokens but `*`

    def __post_init__(self) -> None:
        tokens = dict.fromkeys(t for tokens in self.alternatives for t in tokens if t is not ANY_SEGMENTS)
        literals = frozenset(t.literal for t in tokens if t.literal is not None)  # type: ignore[attr-defined]
        general = tuple(t for t in tokens if t.literal is None and t.items != (STAR,))  # type: ignore[attr-defined]
        object.__setattr__(self, "_literals", literals)
        object.__setattr__(self, "_general", general)

    def start(self) -> frozenset[tuple[int, int]]:
        return self._settle({(a, 0) for a in range(len(self.alternatives))})

    def _settle(self, positions: set[tuple[int, int]]) -> frozenset[tuple[int, int]]:
        # `**` may match zero segments: reaching it also reaches the next token.
        for a, k in list(positions):
            tokens = self.alternatives[a]
            while k < len(tokens) and tokens[k] is ANY_SEGMENTS:
                k += 1
                positions.add((a, k))
        if not self.anchored_end and self._complete(positions):
            return MATCHED
        return frozenset(positions)

    def _complete(self, positions: frozenset[tuple[int, int]] | set[tuple[int, int]]) -> bool:
        return any(k == len(self.alternatives[a]) for a, k in positions)

    def step(self, state: frozenset[tuple[int, int]], segment: str) -> frozenset[tuple[int, int]]:
        """The state after one more segment."""
        if state is MATCHED:
            return MATCHED
        key = (state, segment)
        following = self._transitions.get(key)
        if following is None:
            if len(self._transitions) > _MAX_TRANSITIONS:  # bound memory on adversarial inputs
                self._transitions.clear()
                self._by_signature.clear()
            by_signature = (state, self._signature(segment))
            following = self._by_signature.get(by_signature)
            if following is None:
                following = self._by_signature[by_signature] = self._advance(state, segment)
            self._transitions[key] = following
        return following

    def _signature(self, segment: str) -> tuple[Any, ...]:
        """What decides which tokens `segment` matches: the text itself if a literal token
        has it (none does otherwise), then whether each other token matches (`*` does)."""
        text = segment.casefold() if self.ignore_case else segment
        return (text if text in self._literals else None, *(t.match(text) for t in self._general))

    def _advance(self, state: frozenset[tuple[int, int]], segment: str) -> frozenset[tuple[int, int]]:
        text = segment.casefold() if self.ignore_case else segment
        following = set() if self.anchored_start else {(a, 0) for a in range(len(self.alternatives))}
        for a, k in state:
            tokens = self.alternatives[a]
            if k == len(tokens):
                continue
            token = tokens[k]
            if token is ANY_SEGMENTS:
                following.add((a, k))
            elif token.match(text):  # type: ignore[attr-defined]
                following.add((a, k + 1))
        return self._settle(following)

    def accepts(self, state: frozenset[tuple[int, int]]) -> bool:
        """Whether a leaf whose path led to `state` is selected."""
        # With an unanchored end, a complete state has already become MATCHED.
        return state is MATCHED or (self.anchored_end and self._complete(state))

    def dead(self, state: frozenset[tuple[int, int]]) -> bool:
        """Whether no leaf below can be selected (an anchored start that failed)."""
        return not state and self.anchored_start

    def match(self, segments: tuple[str, ...]) -> bool:
        """Whether the pattern matches a run of whole segments of `segments`."""
        state = self.start()
        for segment in segments:
            state = self.step(state, segment)
            if state is MATCHED:
                return True
            if self.dead(state):
                return False
        return self.accepts(state)

    def literal(self) -> str:
        """The literal text of the first alternative, wildcards left out: what a typo is compared with."""
        parts = [t.literal_text() for t in self.alternatives[0] if t is not ANY_SEGMENTS]  # type: ignore[attr-defined]
        return ".".join(p for p in parts if p)

    def regex(self) -> str:
        """An equivalent regex over the rendered path, for `re.fullmatch`."""
        alts = []
        for tokens in self.alternatives:
            full = list(tokens)
            if not self.anchored_start and full[0] is not ANY_SEGMENTS:
                full.insert(0, ANY_SEGMENTS)
            if not self.anchored_end and full[-1] is not ANY_SEGMENTS:
                full.append(ANY_SEGMENTS)
            text = ""
            for k, token in enumerate(full):
                if token is ANY_SEGMENTS:
                    if len(full) == 1:
                        text = r"(?:[^.]+(?:\.[^.]+)*)?"
                    elif k == 0:
                        text += r"(?:[^.]+\.)*"
                    else:
                        text += r"(?:\.[^.]+)*"
                else:
                    if k > 0 and not (k == 1 and full[0] is ANY_SEGMENTS):
                        text += r"\."
                    text += token.regex()  # type: ignore[attr-defined]
            alts.append(text)
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return ("(?i)" if self.ignore_case else "") + body


@functools.lru_cache(maxsize=4096, typed=True)
def compile_glob(pattern: str, ignore_case: bool = False) -> CompiledGlob:
    """Parse and compile a glob once; later calls with the same arguments are cached."""
    if not isinstance(pattern, str):
        raise TypeError(f"A glob pattern must be a str, got {type(pattern).__name__}: {pattern!r}.")
    body, offset = pattern, 0
    anchored_start = body.startswith("^")
    if anchored_start:
        body, offset = body[1:], 1
    anchored_end = body.endswith("$") and not _escaped_at(body, len(body) - 1)
    if anchored_end:
        body = body[:-1]
    if not body:
        raise pattern_error(
            pattern,
            0,
            "the pattern is empty.",
            "Write a path glob such as '*.bias' or 'blocks.{0..5}'; use '**' to select every leaf.",
        )
    parser = _Parser(pattern, body, offset)
    items = parser.parse()
    if ignore_case:  # after parsing, so that error positions point into the text as written
        items = _fold(items)
    alternatives = tuple(_split_segments(alt, parser) for alt in _expand(items, pattern))
    return CompiledGlob(pattern, alternatives, anchored_start, anchored_end, ignore_case)


def _escaped_at(text: str, pos: int) -> bool:
    backslashes = len(text[:pos]) - len(text[:pos].rstrip("\\"))
    return backslashes % 2 == 1


@functools.lru_cache(maxsize=4096, typed=True)
def compile_regex(pattern: str | re.Pattern[str], ignore_case: bool = False) -> re.Pattern[str]:
    """Compile a regex pattern (the text after `re:`), wrapping `re.error` in `ValueError`."""
    if isinstance(pattern, re.Pattern):
        if ignore_case and not pattern.flags & re.IGNORECASE:
            return re.compile(pattern.pattern, pattern.flags | re.IGNORECASE)
        return pattern
    try:
        return re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    except re.error as exc:
        pos = exc.pos or 0
        raise pattern_error(
            "re:" + pattern,
            pos + 3,
            f"invalid regular expression ({exc.msg}).",
            "Fix the regex (it is matched with re.fullmatch against the whole dotted path), "
            "or drop the 're:' prefix to write a glob.",
        ) from exc


def translate(pattern: str | re.Pattern[str], *, ignore_case: bool = False) -> str:
    """Show the regex a pattern becomes, for `re.fullmatch` against a dotted path.

    treeglob matches globs segment by segment, not with this regex; the regex
    is the exact equivalent for paths whose keys need no quoting, and serves
    to read and debug a pattern. `**`, the unanchored start (any parent
    segments) and the unanchored end (any leaves below a matched node) all
    become runs of whole segments. A `re:` pattern is returned as written.

    Args:
        pattern: a glob, a `re:`-prefixed regex string, or a compiled regex.
        ignore_case: match case-insensitively.

    Returns:
        The regex source string.

    Raises:
        ValueError: the pattern is malformed.

    Examples:
        >>> import treeglob
        >>> treeglob.translate("^head.weight$")
        'head\\\\.weight'
        >>> treeglob.translate("blocks.{0..11}$")
        '(?:[^.]+\\\\.)*blocks\\\\.(?:[0-9]|1[0-1])'
        >>> treeglob.translate("re:.*bias")
        '.*bias'
    """
    if isinstance(pattern, re.Pattern):
        return compile_regex(pattern, ignore_case).pattern
    if isinstance(pattern, str) and pattern.startswith("re:"):
        return compile_regex(pattern[3:], ignore_case).pattern
    return compile_glob(pattern, ignore_case).regex()
