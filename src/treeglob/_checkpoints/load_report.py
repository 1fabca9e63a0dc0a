"""The report of a checkpoint transfer: one row per model leaf and per checkpoint tensor."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .._core.errors import LoadError, suggest
from .._core.table import render_table

__all__ = ["UNCHECKED", "LoadReport", "LoadRow"]

_MAX_LISTED = 20
#: The statuses of the report, in the order it lists them.
STATUSES = ("loaded", "skipped", "missing", "mismatch", "unused", "ignored")
#: The statuses that stop a load (unless allowed per call).
PROBLEMS = ("missing", "mismatch", "unused")
#: The note of a loaded row whose function transform failed without data: only the load
#: itself can check it (a function that writes into its input, or needs real values).
UNCHECKED = "unchecked:"


@dataclass(frozen=True)
class LoadRow:
    """One model leaf (one layer under `stacked`) or one checkpoint tensor, and what the transfer does with it.

    `path` is the model path (None for a checkpoint tensor no leaf takes);
    `source` the checkpoint name (None for a model leaf that takes none).
    `shape`/`dtype` are the model's, `source_shape`/`source_dtype` the
    checkpoint's; `transform` names the function a tensor passes through.
    """

    status: str
    path: str | None
    source: str | None
    shape: tuple[int, ...] | None
    dtype: str | None
    source_shape: tuple[int, ...] | None = None
    source_dtype: str | None = None
    transform: str | None = None
    note: str = ""

    @property
    def size(self) -> int:
        shape = self.shape if self.shape is not None else self.source_shape
        return 0 if shape is None else math.prod(shape)


@dataclass(frozen=True)
class LoadReport:
    """The plan of a transfer: every model leaf loaded or skipped, every checkpoint tensor
    used or ignored, and what does not fit. `str()` renders it as a table."""

    rows: tuple[LoadRow, ...]
    source: str
    allow_missing: bool = False
    allow_unused: bool = False
    counts: dict[str, dict[str, int]] = field(init=False, compare=False, hash=False)  # from the rows

    def __post_init__(self) -> None:
        counts = {s: {"leaves": 0, "elements": 0} for s in STATUSES}
        for r in self.rows:
            counts[r.status]["leaves"] += 1
            counts[r.status]["elements"] += r.size
        counts["transformed"] = {
            "leaves": sum(1 for r in self.rows if r.transform and r.status == "loaded"),
            "elements": sum(r.size for r in self.rows if r.transform and r.status == "loaded"),
        }
        unchecked = [r for r in self.rows if r.status == "loaded" and r.note.startswith(UNCHECKED)]
        if unchecked:
            counts["unchecked"] = {"leaves": len(unchecked), "elements": sum(r.size for r in unchecked)}
        object.__setattr__(self, "counts", counts)

    def problems(self) -> list[str]:
        """The statuses that stop the load: mismatches always, missing and unused unless allowed."""
        allowed = {"missing": self.allow_missing, "unused": self.allow_unused, "mismatch": False}
        return [s for s in PROBLEMS if self.counts[s]["leaves"] and not allowed[s]]

    @property
    def ok(self) -> bool:
        return not self.problems()

    def check(self, caller: str = "load") -> None:
        """Raise `LoadError` listing every problem, if any."""
        problems = self.problems()
        if not problems:
            return
        unused = [r for r in self.rows if r.status == "unused"]
        parts = []
        for status in problems:
            rows = [r for r in self.rows if r.status == status]
            lines = [_problem_line(r, unused) for r in rows[:_MAX_LISTED]]
            if len(rows) > _MAX_LISTED:
                lines.append(f"... and {len(rows) - _MAX_LISTED} more")
            one = len(rows) == 1
            what = {
                "missing": "model leaf has" if one else "model leaves have",
                "mismatch": "tensor does not fit its" if one else "tensors do not fit their",
                "unused": "checkpoint tensor is" if one else "checkpoint tensors are",
            }[status] + {
                "missing": " no checkpoint tensor",
                "mismatch": " model leaf",
                "unused": " used by no model leaf",
            }[status]
            fix = {
                "missing": "Rename a tensor to them, skip=[...] them to keep their initial values, "
                "or pass allow_missing=True.",
                "mismatch": "Add a transform (e.g. 'transpose', a dtype name) or skip=[...] them.",
                "unused": "Rename them to model paths, ignore=[...] them, or pass allow_unused=True.",
            }[status]
            parts.append(f"{len(rows)} {what}:\n  " + "\n  ".join(lines) + f"\n{fix}")
        raise LoadError(f"{caller}() from {self.source}: " + "\n".join(parts), self)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for logging: `{"source", "counts": {status: {leaves, elements}}, "rows": [...]}`."""
        return {
            "source": self.source,
            "ok": self.ok,
            "counts": {k: dict(v) for k, v in self.counts.items()},
            "rows": [asdict(r) for r in self.rows],
        }

    def __str__(self) -> str:
        return self.format()

    def format(self, width: int | None = None) -> str:
        """The report as text: one row per model leaf and per unused or ignored tensor, then the counts."""
        table = [("path", "status", "source", "shape", "dtype", "note")]
        for r in self.rows:
            shape = r.shape if r.shape is not None else r.source_shape
            dtype = r.dtype if r.dtype is not None else r.source_dtype
            note = r.note or (f"via {r.transform}" if r.transform else "")
            source = r.source or "-"
            if r.path is not None and r.source is not None:
                source = ("= " if r.source == r.path else "<- ") + r.source
            table.append((r.path or "-", r.status, source, str(shape), str(dtype), note))
        return "\n".join([*render_table(table, right=set(), long=0, width=width), "", self.summary()])

    def summary(self) -> str:
        """The counts alone: leaves and elements per status, and what stops the load."""
        lines = []
        for status, count in self.counts.items():
            if count["leaves"] or status in ("loaded", "missing", "unused"):
                one = count["leaves"] == 1
                what = (
                    ("tensor" if one else "tensors")
                    if status in ("unused", "ignored")
                    else ("leaf" if one else "leaves")
                )
                flag = "  <- stops the load" if status in self.problems() else ""
                if status == "unchecked":
                    flag = "  <- their transform failed without data: checked when loaded"
                elements = "element" if count["elements"] == 1 else "elements"
                lines.append(
                    f"{status:<12}{count['leaves']:>7,} {what:<8}{count['elements']:>16,} {elements}{flag}"
                )
        return "\n".join(lines)


def _problem_line(row: LoadRow, unused: list[LoadRow]) -> str:
    if row.status == "mismatch":
        return f"{row.path} {row.dtype}{row.shape} <- {row.source} {row.note}"
    if row.status == "unused":
        renamed = f" (renamed {row.note})" if row.note else ""
        return f"{row.source}{renamed} {row.source_dtype}{row.source_shape}"
    close = suggest(row.path or "", [r.note or r.source or "" for r in unused])
    hint = f"  (close: {', '.join(close)})" if close else f"  ({row.note})" if row.note else ""
    return f"{row.path} {row.dtype}{row.shape}{hint}"
