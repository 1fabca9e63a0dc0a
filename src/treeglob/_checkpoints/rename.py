"""Rename rules: checkpoint names to model paths, in the pattern language of selectors.

A rule `(pattern, replacement)` replaces the part of a name the pattern
matches. A glob matches whole segments (with the usual unanchored start and
end: `c_attn` renames that segment wherever it is, `^transformer.h` only at
the start) and may capture one segment or part of one with `{name}`, used in
the replacement: `("h.{i}.attn", "blocks.{i}.attn")`. A `re:` pattern (or a
compiled regex) replaces its first match, with `{name}` for a named group and
`{1}` for a numbered one. A tuple of replacements sends one tensor to several
paths (a fused `c_attn` to `query_proj`, `key_proj`, `value_proj`; a
`transform` per path then takes its part).

Rules apply in order, each to the names the previous ones produced, as a
conversion script's chain of substitutions does. Each rule changes one part
of a name: a glob its leftmost match (`h` on `h.0.h.w` gives `blocks.0.h.w`),
with `**` and captures taking as much as they can; a regex its first match,
found with `re.search` (anchor it with `^` to match from the start), unlike
selector regexes, which match whole paths. `{name}` with an identifier inside
is a capture here, not a brace group (which needs two alternatives anyway).

Export runs the rules backwards (`undo_renames`): each glob rule whose
pattern and replacements are written out segment by segment (captures aside)
is undone, the last first, and every name found is checked by renaming it
forward again. A regex, or a glob with wildcards, has no inverse: the names
it stands for are not known.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from .._core.errors import NoMatchError, suggest_path
from .._core.keys import quote, split_path
from .._core.pattern import compile_glob, compile_regex
from .._core.segment import ANY1, ANY_SEGMENTS, STAR, Lit, SegmentMatcher

__all__ = ["RenameRule", "apply_renames", "most_renamed", "pairs", "parse_renames", "undo_renames"]

_CAPTURE = re.compile(r"(?<!\\)\{([A-Za-z_]\w*)\}")
_FIELD = re.compile(r"\{(\w+)\}")
_WILDCARDS = re.compile(r"[*?\[\]{}\\]")  # in a glob, once its captures are taken out
# Private-use characters stand in for captures while the glob compiles: they are
# literal text to the glob, found again in its parsed segments.
_OPEN, _CLOSE = "\ue000", "\ue001"


class _Token(NamedTuple):
    """One segment of a rename glob: what it matches, and how its captures are read."""

    matcher: SegmentMatcher | None  # None for `**`
    captures: re.Pattern[str] | None  # over the raw segment, one group per capture; None without


class _SegmentGlob(NamedTuple):
    """A rename glob compiled by the selector's compiler: the same segments, quoting and
    braces as a selector, with `{name}` captures of one segment or part of one."""

    alternatives: tuple[tuple[_Token, ...], ...]
    anchored_start: bool
    anchored_end: bool

    def find(self, segments: tuple[str, ...]) -> tuple[int, int, dict[str, str]] | None:
        """The leftmost run of segments the glob matches, as long as it can be (first
        alternative on a tie): `(start, end, captures)`, or None."""
        starts = [0] if self.anchored_start else range(len(segments) + 1)
        for start in starts:
            best = None
            for tokens in self.alternatives:
                found = _match_at(tokens, segments, start, self.anchored_end)
                if found is not None and (best is None or found[0] > best[0]):
                    best = found
            if best is not None:
                return start, best[0], best[1]
        return None


def _match_at(
    tokens: tuple[_Token, ...], segments: tuple[str, ...], start: int, to_end: bool
) -> tuple[int, dict[str, str]] | None:
    """The longest match of `tokens` from `start` and its captures (`**` taking as much as
    it can), by the set of positions each token can reach: linear, no backtracking."""
    reach = [{start}]
    for token in tokens:
        before = reach[-1]
        if not before:
            return None
        if token.matcher is None:
            reach.append(set(range(min(before), len(segments) + 1)))
        else:
            matcher = token.matcher
            reach.append({p + 1 for p in before if p < len(segments) and matcher.match(segments[p])})
    ends = [e for e in reach[-1] if (e > start or not tokens) and (not to_end or e == len(segments))]
    if not ends:
        return None
    end = position = max(ends)
    captures: dict[str, str] = {}
    for k in range(len(tokens) - 1, -1, -1):
        token = tokens[k]
        if token.matcher is None:
            position = min(p for p in reach[k] if p <= position)
        else:
            position -= 1
            if token.captures is not None:
                m = token.captures.fullmatch(segments[position])
                assert m is not None
                captures.update(m.groupdict())
    return end, captures


def _compile_glob(pattern: str) -> tuple[_SegmentGlob, list[str]]:
    names = _CAPTURE.findall(pattern)
    for name in names:
        if names.count(name) > 1:
            raise ValueError(
                f"rename pattern {pattern!r} captures {{{name}}} twice; give each capture its own name."
            )
    # Errors point into the pattern as written: check it with each capture as
    # letters of the same length, then compile it with the stand-ins.
    same_length = _CAPTURE.sub(lambda m: "x" * len(m.group(0)), pattern)
    try:
        compile_glob(same_length)
    except ValueError as exc:
        raise ValueError(str(exc).replace(repr(same_length), repr(pattern))) from None
    compiled = compile_glob(_CAPTURE.sub(lambda m: _OPEN + m.group(1) + _CLOSE, pattern))
    alternatives = tuple(tuple(map(_token, tokens)) for tokens in compiled.alternatives)
    for tokens in alternatives:
        # A capture inside braces is missing from the other alternatives (`{a,{i}}.w`, or
        # within a segment, `h{a,{i}}`), which then could not fill the replacement.
        held = [name for token in tokens if token.captures is not None for name in token.captures.groupindex]
        if sorted(held) != sorted(names):
            raise ValueError(
                f"rename pattern {pattern!r}: a capture cannot stand inside braces; capture the "
                "segment, or write one rule per alternative."
            )
    return _SegmentGlob(alternatives, compiled.anchored_start, compiled.anchored_end), names


def _token(token: Any) -> _Token:
    if token is ANY_SEGMENTS:
        return _Token(None, None)
    items, plain, regex = list(token.items), [], []
    while items:
        item = items.pop(0)
        if isinstance(item, Lit) and item.char == _OPEN:
            name = ""
            while (item := items.pop(0)).char != _CLOSE:  # type: ignore[attr-defined]
                name += item.char  # type: ignore[attr-defined]
            plain += [ANY1, STAR]  # a capture takes one character at least
            regex.append(f"(?P<{name}>.+)")
        else:
            plain.append(item)
            regex.append(SegmentMatcher((item,)).regex(any_char="."))
    if len(plain) == len(token.items):
        return _Token(token, None)
    return _Token(SegmentMatcher(tuple(plain)), re.compile("".join(regex), re.DOTALL))


@dataclass(frozen=True)
class RenameRule:
    """One parsed rename rule: `index` counts from 0 in the list as written."""

    index: int
    pattern: str | re.Pattern[str]
    replacements: tuple[str, ...]
    regex: re.Pattern[str] | None  # a `re:` rule's
    glob: _SegmentGlob | None  # a glob rule's

    def describe(self) -> str:
        shown = self.replacements[0] if len(self.replacements) == 1 else self.replacements
        return f"rename rule {self.index} ({self.pattern!r} -> {shown!r})"  # a compiled regex with its flags

    def apply(self, name: str) -> list[str] | None:
        """The names `name` (a printed path) becomes, or None where the rule does not match it."""
        if self.glob is not None:
            segments = split_path(name)
            found = self.glob.find(segments)
            if found is None:
                return None
            start, end, captures = found
            return [
                ".".join(map(quote, (*segments[:start], *_filled(r, captures), *segments[end:])))
                for r in self.replacements
            ]
        assert self.regex is not None
        m = self.regex.search(name)
        if m is None:
            return None
        return [name[: m.start()] + _fill(r, m.groupdict(), m) + name[m.end() :] for r in self.replacements]

    @functools.cached_property
    def inverse(self) -> tuple[tuple[_SegmentGlob, ...], str] | str:
        """What undoes the rule (for export), or why it cannot be undone."""
        try:
            return _inverse(self)
        except ValueError as exc:
            return str(exc)


def _inverse(rule: RenameRule) -> tuple[tuple[_SegmentGlob, ...], str]:
    """What undoes a glob rule: a glob per replacement that finds what the rule wrote, and
    the pattern as a template that writes back what it matched.

    Raises:
        ValueError: why the rule cannot be undone.
    """
    if rule.glob is None:
        raise ValueError("a regex has no inverse; write it as a glob with {name} captures")
    pattern = rule.pattern
    assert isinstance(pattern, str)
    body = pattern.removeprefix("^")
    body = body[:-1] if rule.glob.anchored_end else body
    captured = sorted(_CAPTURE.findall(body))
    for text, what in [(body, "pattern"), *((r, "replacement") for r in rule.replacements)]:
        if _WILDCARDS.search(_CAPTURE.sub("", text)):
            raise ValueError(
                f"its {what} {text!r} has wildcards, braces or escapes, so the names it stands for are "
                "not known; write the segments out, capturing what varies with {name}"
            )
        if what == "replacement" and sorted(_CAPTURE.findall(text)) != captured:
            raise ValueError(
                f"the replacement {text!r} does not use each capture of the pattern exactly once, so "
                "what it matched cannot be written back"
            )
    anchors = ("^" if rule.glob.anchored_start else "", "$" if rule.glob.anchored_end else "")
    # An empty replacement wrote nothing: an empty glob, found at the anchor (or anywhere).
    empty = _SegmentGlob(((),), rule.glob.anchored_start, rule.glob.anchored_end)
    globs = tuple(_compile_glob(anchors[0] + r + anchors[1])[0] if r else empty for r in rule.replacements)
    return globs, body


def undo_renames(path: str, rules: list[RenameRule]) -> dict[str, tuple[int, ...]]:
    """Every checkpoint name that `rules` rename into `path`, with the rules that renamed it.

    Raises:
        ValueError: a rule that could have written `path` but cannot be undone, naming it.
    """
    found: dict[str, tuple[int, ...]] = {path: ()}
    for rule in reversed(rules):
        before: dict[str, tuple[int, ...]] = {}
        for name, history in found.items():
            if rule.apply(name) is None:  # the rule leaves this name as it is
                before.setdefault(name, history)
            for source in _undo(rule, name):
                before.setdefault(source, (rule.index, *history))
        found = before
    return found


def most_renamed(found: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Of the names `undo_renames` found, those renamed by the most rules: no other name went
    through every rule it went through and more. A name a rule would rename is taken to be
    the rule's source, not a name the checkpoint held as it is."""
    histories = {name: set(history) for name, history in found.items()}
    return {
        name: found[name]
        for name, history in histories.items()
        if not any(history < other for other in histories.values())
    }


def _undo(rule: RenameRule, name: str) -> list[str]:
    """The names `rule` renames into `name` (each checked by renaming it)."""
    inverse = rule.inverse
    if isinstance(inverse, str):
        if not _could_have_written(rule, name):
            return []
        raise ValueError(f"{rule.describe()} cannot be undone: {inverse}")
    globs, template = inverse
    segments = split_path(name)
    out = []
    for glob in globs:
        for start in [0] if glob.anchored_start else range(len(segments) + 1):
            for tokens in glob.alternatives:
                found = _match_at(tokens, segments, start, glob.anchored_end)
                if found is None:
                    continue
                end, captures = found
                source = ".".join(
                    map(quote, (*segments[:start], *_filled(template, captures), *segments[end:]))
                )
                if name in (rule.apply(source) or ()) and source not in out:
                    out.append(source)
    return out


def _could_have_written(rule: RenameRule, name: str) -> bool:
    """Whether a replacement of `rule` could be part of `name`: each of its literal pieces (the
    text around its `{fields}`) is. A rule that cannot be undone stops an export only where
    it could have written the name."""
    return any(all(piece in name for piece in _FIELD.split(r)[::2]) for r in rule.replacements)


def _filled(template: str, captures: dict[str, str]) -> tuple[str, ...]:
    """The raw segments of a glob rule's replacement, a printed path whose `{name}` fields
    take the captured text (which may hold a dot: it stays inside its segment)."""
    return tuple(_FIELD.sub(lambda f: captures[f.group(1)], segment) for segment in split_path(template))


def _fill(template: str, fields: dict[str, Any], m: re.Match[str]) -> str:
    def field(f: re.Match[str]) -> str:
        key = f.group(1)
        return m.group(int(key)) or "" if key.isdigit() else fields[key]

    return _FIELD.sub(field, template)


def _check_fields(rule: RenameRule, allowed: set[str], groups: int) -> None:
    for template in rule.replacements:
        for key in _FIELD.findall(template):
            if key.isdigit() and rule.glob is None and int(key) <= groups:
                continue
            if key in allowed:
                continue
            known = ", ".join(f"{{{k}}}" for k in sorted(allowed)) or "none"
            raise ValueError(
                f"{rule.describe()}: the replacement uses {{{key}}}, which the pattern does not capture "
                f"(captures: {known}). In a glob, capture a segment with {{name}}, e.g. 'h.{{i}}.attn'."
            )


def pairs(value: Any, argument: str, second: str, example: str) -> list[tuple[Any, Any]]:
    """A list of `(pattern, second)` pairs, from a list of pairs or a dict (in order)."""
    items = list(value.items()) if isinstance(value, Mapping) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple)):
        raise TypeError(
            f"{argument} must be a list of (pattern, {second}) pairs or a dict, e.g. [{example}], "
            f"got {type(value).__name__}: {value!r}."
        )
    for index, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"{argument}[{index}] must be a (pattern, {second}) pair, got {item!r}.")
    return [(pattern, other) for pattern, other in items]


def parse_renames(rename: Any, argument: str = "rename") -> list[RenameRule]:
    """Check and compile a list of `(pattern, replacement)` pairs (or a dict in order)."""
    out = []
    for index, (pattern, replacement) in enumerate(
        pairs(rename, argument, "replacement", "('h.{i}', 'blocks.{i}')")
    ):
        replacements = (replacement,) if isinstance(replacement, str) else replacement
        if not (
            isinstance(replacements, tuple) and replacements and all(isinstance(r, str) for r in replacements)
        ):
            raise TypeError(
                f"{argument}[{index}]: the replacement must be a str (or a tuple of str for one tensor "
                f"feeding several paths), got {replacement!r}."
            )
        if isinstance(pattern, re.Pattern) or (isinstance(pattern, str) and pattern.startswith("re:")):
            regex = compile_regex(pattern if isinstance(pattern, re.Pattern) else pattern[3:])
            rule = RenameRule(index, pattern, replacements, regex, None)
            _check_fields(rule, set(regex.groupindex), regex.groups)
        elif isinstance(pattern, str):
            glob, names = _compile_glob(pattern)
            rule = RenameRule(index, pattern, replacements, None, glob)
            _check_fields(rule, set(names), 0)
        else:
            raise TypeError(
                f"{argument}[{index}]: the pattern must be a glob str, a 're:' regex or a compiled "
                f"regex, got {type(pattern).__name__}: {pattern!r}."
            )
        out.append(rule)
    return out


def apply_renames(
    names: list[str], rules: list[RenameRule], *, caller: str, strict: bool = True
) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Per name, the names it becomes after every rule (in order; fan-outs included), each
    with the indices of the rules that changed it on the way (what orders several tensors
    renamed onto one leaf).

    Raises:
        NoMatchError: with `strict`, a rule that matches none of the names it sees.
    """
    current: dict[str, list[tuple[str, tuple[int, ...]]]] = {name: [(name, ())] for name in names}
    for rule in rules:
        hit = False
        for name, outs in current.items():
            renamed: list[tuple[str, tuple[int, ...]]] = []
            for out, history in outs:
                new = rule.apply(out)
                hit |= new is not None
                renamed += [(out, history)] if new is None else [(n, (*history, rule.index)) for n in new]
            current[name] = renamed
        if strict and not hit:
            seen = [out for outs in current.values() for out, _ in outs]
            text = rule.pattern if isinstance(rule.pattern, str) else rule.pattern.pattern
            literal = _CAPTURE.sub("0", text.removeprefix("re:")).strip("^$")
            close = suggest_path(literal, seen, [split_path(name) for name in seen])
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise NoMatchError(
                f"{caller}(): {rule.describe()} matches no checkpoint name ({len(seen)} names, "
                f"after the rules before it).{hint} Remove the rule, or fix its pattern; pass strict=False "
                "to allow rules that match nothing."
            )
    return current
