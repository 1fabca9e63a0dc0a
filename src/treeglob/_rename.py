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
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import NoMatchError, suggest
from ._pattern import compile_glob, compile_regex

__all__ = ["RenameRule", "apply_renames", "pairs", "parse_renames"]

_CAPTURE = re.compile(r"(?<!\\)\{([A-Za-z_]\w*)\}")
_FIELD = re.compile(r"\{(\w+)\}")
# Private-use characters stand in for captures while the glob compiles: they are
# literal text to the glob and pass through its regex unescaped.
_HOLE = "\ue000{}\ue001"


def _glob_regex(pattern: str) -> tuple[re.Pattern[str], list[str]]:
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
        anchors = compile_glob(same_length)
    except ValueError as exc:
        raise ValueError(str(exc).replace(repr(same_length), repr(pattern))) from None
    body = _CAPTURE.sub(lambda m: _HOLE.format(names.index(m.group(1))), pattern)
    body = body[1:] if anchors.anchored_start else body
    body = body[:-1] if anchors.anchored_end else body
    # The matched part alone (anchored both ends); the segments before and after are kept.
    core = compile_glob("^" + body + "$").regex()
    for k, name in enumerate(names):
        core = core.replace(_HOLE.format(k), f"(?P<c_{name}>[^.]+)")
    before = "" if anchors.anchored_start else r"(?:[^.]+\.)*?"  # the leftmost match
    after = "" if anchors.anchored_end else r"(?:\..*)?"
    return re.compile(f"^(?P<before>{before})(?P<core>{core})(?P<after>{after})$"), names


@dataclass(frozen=True)
class RenameRule:
    """One parsed rename rule: `index` counts from 0 in the list as written."""

    index: int
    pattern: str | re.Pattern[str]
    replacements: tuple[str, ...]
    regex: re.Pattern[str]
    is_glob: bool

    def describe(self) -> str:
        shown = self.replacements[0] if len(self.replacements) == 1 else self.replacements
        pattern = self.pattern if isinstance(self.pattern, str) else f"re.compile({self.pattern.pattern!r})"
        return f"rename rule {self.index} ({pattern!r} -> {shown!r})"

    def apply(self, name: str) -> list[str] | None:
        """The names `name` becomes, or None where the rule does not match it."""
        if self.is_glob:
            m = self.regex.match(name)
            if m is None:
                return None
            fields = {k[2:]: v for k, v in m.groupdict().items() if k.startswith("c_")}
            head, tail = m.group("before")[:-1], m.group("after")[1:]
            return [".".join(p for p in (head, _fill(r, fields, m), tail) if p) for r in self.replacements]
        m = self.regex.search(name)
        if m is None:
            return None
        return [name[: m.start()] + _fill(r, m.groupdict(), m) + name[m.end() :] for r in self.replacements]


def _fill(template: str, fields: dict[str, Any], m: re.Match[str]) -> str:
    def field(f: re.Match[str]) -> str:
        key = f.group(1)
        return m.group(int(key)) or "" if key.isdigit() else fields[key]

    return _FIELD.sub(field, template)


def _check_fields(rule: RenameRule, allowed: set[str], groups: int) -> None:
    for template in rule.replacements:
        for key in _FIELD.findall(template):
            if key.isdigit() and not rule.is_glob and int(key) <= groups:
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
            rule = RenameRule(index, pattern, replacements, regex, is_glob=False)
            _check_fields(rule, set(regex.groupindex), regex.groups)
        elif isinstance(pattern, str):
            regex, names = _glob_regex(pattern)
            rule = RenameRule(index, pattern, replacements, regex, is_glob=True)
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
) -> dict[str, list[str]]:
    """Per name, the names it becomes after every rule (in order; fan-outs included).

    Raises:
        NoMatchError: with `strict`, a rule that matches none of the names it sees.
    """
    current = {name: [name] for name in names}
    for rule in rules:
        hit = False
        for name, outs in current.items():
            renamed = []
            for out in outs:
                new = rule.apply(out)
                hit |= new is not None
                renamed += [out] if new is None else new
            current[name] = renamed
        if strict and not hit:
            seen = [out for outs in current.values() for out in outs]
            text = rule.pattern if isinstance(rule.pattern, str) else rule.pattern.pattern
            close = suggest(_CAPTURE.sub("0", text.removeprefix("re:")), seen)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise NoMatchError(
                f"{caller}(): {rule.describe()} matches no checkpoint name ({len(seen)} names, "
                f"after the rules before it).{hint} Remove the rule, or fix its pattern; pass strict=False "
                "to allow rules that match nothing."
            )
    return current
