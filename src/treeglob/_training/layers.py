"""How a model is cut into layers for layer-wise learning-rate decay: blocks and placements."""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["JOIN_NEXT", "JOIN_PREVIOUS", "LayerGroups"]


class _Join:
    """A layer rule's label that places a leaf with a block found from its own path."""

    __slots__ = ("first",)

    def __init__(self, first: bool):
        self.first = first

    def __repr__(self) -> str:
        return "treeglob.JOIN_NEXT" if self.first else "treeglob.JOIN_PREVIOUS"

    def __reduce__(self) -> str:  # one instance each, also through copy and pickle
        return "JOIN_NEXT" if self.first else "JOIN_PREVIOUS"


#: A layer-rule label: the leaf joins the **first** of the blocks nearest to it,
#: those whose paths share the longest prefix with its path. A ConvNeXt or Swin
#: stage's `downsample` joins that stage's first block, as in timm.
JOIN_NEXT: Any = _Join(True)
#: A layer-rule label: the leaf joins the **last** of the blocks nearest to it
#: (a stage's final norm joins that stage's last block; a top-level norm, which
#: shares no prefix with any block, joins the last block of the model).
JOIN_PREVIOUS: Any = _Join(False)


class LayerGroups(NamedTuple):
    """A model family's layers: where the blocks are, and where everything else goes.

    Attributes:
        blocks: the path of the block sequence (its children are the blocks,
            numbered by their index: `"blocks"`), or a glob whose matched
            subtrees are the blocks, numbered in order (`"stages.*.blocks.*"`).
        rules: `(selector, layer)` pairs for the leaves outside the blocks: an
            int (0 the stem, negative from the top: -1 the top, -2 the last
            block), `JOIN_NEXT` or `JOIN_PREVIOUS`. Leaves no rule matches are
            the top (the head).
    """

    blocks: str
    rules: list[tuple[Any, Any]]
