"""Rules: ordered `(selector, label)` pairs, normalized once into an immutable value."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax.tree_util as jtu

from .selector import Selector, coerce

__all__ = ["MISSING", "Rule", "Rules", "check_label", "normalize_rules", "same_label"]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: Sentinel for "no default label given".
MISSING: Any = _Missing()


@dataclass(frozen=True)
class Rule:
    """One `(selector, label)` rule, numbered from 0 in the order given."""

    index: int
    selector: Selector
    label: Any

    def describe(self) -> str:
        return f"rule {self.index} (label {self.label!r})"


@dataclass(frozen=True)
class Rules:
    """Normalized rules: what `normalize_rules` returns, and returns unchanged when given again."""

    rules: tuple[Rule, ...]

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __getitem__(self, index: int) -> Rule:
        return self.rules[index]

    def labels(self, default: Any = MISSING) -> list[Any]:
        """The distinct labels, in rule order, then the default (when given)."""
        out: list[Any] = []
        for label in [r.label for r in self.rules] + ([] if default is MISSING else [default]):
            if not any(same_label(label, seen) for seen in out):
                out.append(label)
        return out


def same_label(a: Any, b: Any) -> bool:
    """Equal labels of the same type; labels whose `==` is not a bool compare by identity."""
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except (TypeError, ValueError):  # e.g. NumPy array labels
        return False


def check_label(label: Any, where: str) -> None:
    """A label must be one PyTree leaf: None or a container would change the tree's structure."""
    structure = jtu.tree_structure(label)
    if label is None or structure.num_nodes != 1 or structure.num_leaves != 1:
        kind = "None" if label is None else f"a {type(label).__name__} container ({label!r})"
        raise TypeError(
            f"The label of {where} is {kind}. A label must be a PyTree leaf "
            "(a string, number, PartitionSpec, ...): None or a container would change the "
            "structure of the label tree."
        )


def normalize_rules(rules: Any, default: Any = MISSING) -> Rules:
    """Accept a dict `{label: selector}` or a sequence of `(selector, label)` pairs.

    Also checks that every label, and `default` when given, is a PyTree leaf.
    Given a `Rules` value, returns it unchanged.
    """
    if default is not MISSING:
        check_label(default, "default")
    if isinstance(rules, Rules):
        return rules
    if isinstance(rules, Selector | str):
        raise TypeError(
            f"rules must be a dict {{label: selector}} or a list of (selector, label) pairs, "
            f"got the single selector {rules!r}. Write [({rules!r}, 'label')], or use "
            "treeglob.mask(tree, selector) for a plain selection."
        )
    if isinstance(rules, Mapping):
        pairs = [(selector, label) for label, selector in rules.items()]
    elif isinstance(rules, Sequence):
        pairs = []
        for i, pair in enumerate(rules):
            if isinstance(pair, Rule):
                pair = (pair.selector, pair.label)
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise TypeError(
                    f"rules[{i}] is {pair!r}; each rule is a (selector, label) pair, e.g. "
                    "('*.bias', 'no_decay'). Or pass a dict {label: selector}."
                )
            pairs.append(tuple(pair))
    else:
        raise TypeError(
            f"rules must be a dict {{label: selector}} or a list of (selector, label) pairs, "
            f"got {type(rules).__name__}: {rules!r}."
        )
    out = []
    for i, (selector, label) in enumerate(pairs):
        check_label(label, f"rule {i}")
        out.append(Rule(i, coerce(selector), label))
    return Rules(tuple(out))
