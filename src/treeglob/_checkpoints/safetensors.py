"""The `.safetensors` format: the header read with bounded memory, tensors read one at a
time (or one device's shard of one: only the runs of its bytes), and files written.

The format (documented with the `safetensors` package): 8 bytes, a little-endian
unsigned header length `N`; `N` bytes of UTF-8 JSON mapping each tensor name to
`{"dtype", "shape", "data_offsets": [begin, end]}` (plus an optional
`"__metadata__"` of strings), padded with spaces; then the tensor data.

A checkpoint of a million small tensors has a header of tens of megabytes;
decoding it into one JSON object costs many times that (Python dicts and lists
per entry). Here each entry becomes a small record as soon as the decoder has
read it, and headers longer than `MAX_HEADER_BYTES` are refused.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import mmap
import os
import pathlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import jax.numpy as jnp
import numpy as np

from .._core.errors import SourceError
from .base import Checkpoint, tensor_to_write, written_beside
from .layout import box, byte_runs, extent, run_count

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_RUNS",
    "SafetensorsCheckpoint",
    "TensorInfo",
    "header",
    "little_endian",
    "read_header",
    "write",
]

#: The longest header read, in bytes (the `safetensors` package's own limit).
MAX_HEADER_BYTES = 100_000_000

#: The most reads of one slice (runs of its bytes) before the slice is read through a memory
#: map: a column split of a tall, narrow tensor would otherwise be a read per row.
MAX_RUNS = 16_384

_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
_NUMPY_DTYPES = {name: jnp.dtype(kind) for name, kind in _DTYPES.items()}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of the file: array-like metadata (`shape`, `dtype`) and where its bytes are."""

    shape: tuple[int, ...]
    dtype: np.dtype
    begin: int  # byte offsets into the data that follows the header
    end: int


def _entry(name: str, value: Any, where: str) -> TensorInfo:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise SourceError(
            f"{where}: the entry of tensor {name!r} must be an object with exactly the keys dtype, "
            f"shape and data_offsets, got {str(value)[:100]}."
        )
    kind, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    dtype = _NUMPY_DTYPES.get(kind) if isinstance(kind, str) else None
    if dtype is None:
        raise SourceError(f"{where}: tensor {name!r} has the dtype {kind!r}, which treeglob does not know.")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise SourceError(
            f"{where}: tensor {name!r} has the shape {shape!r}; a shape is a list of sizes >= 0."
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize
    ):
        raise SourceError(
            f"{where}: tensor {name!r} has the data_offsets {offsets!r}, which do not span its "
            f"{math.prod(shape) * dtype.itemsize} bytes ({kind} of shape {tuple(shape)})."
        )
    return TensorInfo(tuple(shape), dtype, offsets[0], offsets[1])


def read_header(
    path: str | os.PathLike[str], file: BinaryIO | None = None
) -> tuple[dict[str, TensorInfo], int]:
    """The tensors of a `.safetensors` file by name, in file order, and the offset of its data
    (read from `file`, the file at `path` already open, if given).

    Raises:
        SourceError: the file is not a well-formed `.safetensors` file, or its
            header is longer than `MAX_HEADER_BYTES`.
    """
    where = str(path)
    with contextlib.nullcontext(file) if file is not None else open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SourceError(
                f"{where}: not a readable .safetensors file: shorter than its 8-byte header length."
            )
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES:
            raise SourceError(
                f"{where}: not a readable .safetensors file: its header length is {length:,} bytes, more than "
                f"the {MAX_HEADER_BYTES:,} treeglob reads (the limit of the format's own reader)."
            )
        if 8 + length > size:
            raise SourceError(
                f"{where}: not a readable .safetensors file: its header length is {length:,} bytes but the "
                f"file holds only {size - 8:,} after the length."
            )
        try:
            text = f.read(length).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SourceError(
                f"{where}: not a readable .safetensors file: the header is not UTF-8 ({exc})."
            ) from None
    tensors = _parse(text, where)
    data = size - 8 - length
    for name, info in tensors.items():
        if info.end > data:
            raise SourceError(
                f"{where}: tensor {name!r} ends at byte {info.end:,} of the data, which holds only {data:,} bytes."
            )
    return tensors, 8 + length


class _Pairs(list):
    """A JSON object that is not a tensor's entry, as its (key, value) pairs."""


def _decode_object(pairs: list[tuple[str, Any]]) -> Any:
    # Called by the JSON decoder for every object, innermost first: a tensor's
    # entry becomes its small record at once, so that the header's million dicts
    # never exist together. Anything else is checked, with its name, in `_parse`.
    if len(pairs) == 3 and {k for k, _ in pairs} == {"dtype", "shape", "data_offsets"}:
        try:
            return _entry("", dict(pairs), "")
        except SourceError:
            pass
    return _Pairs(pairs)


def _parse(text: str, where: str) -> dict[str, TensorInfo]:
    """The header's entries; each decoded into a record as soon as it is read."""
    try:
        header = json.loads(text, object_pairs_hook=_decode_object)
    except json.JSONDecodeError as exc:
        raise SourceError(
            f"{where}: not a readable .safetensors file: invalid JSON ({exc.msg}) at character {exc.pos} of the header."
        ) from None
    if not isinstance(header, _Pairs):
        raise SourceError(f"{where}: not a readable .safetensors file: the header is not a JSON object.")
    tensors: dict[str, TensorInfo] = {}
    for name, value in header:
        if name in tensors:
            raise SourceError(
                f"{where}: not a readable .safetensors file: the tensor name {name!r} appears twice."
            )
        if name == "__metadata__":
            if not isinstance(value, _Pairs) or not all(isinstance(v, str) for _, v in value):
                raise SourceError(
                    f"{where}: not a readable .safetensors file: __metadata__ must map strings to strings."
                )
        elif isinstance(value, TensorInfo):
            tensors[name] = value
        else:
            tensors[name] = _entry(name, dict(value) if isinstance(value, _Pairs) else value, where)
    return tensors


_NAMES = {dtype: name for name, dtype in _NUMPY_DTYPES.items()}


def header(tensors: list[tuple[str, tuple[int, ...], Any]]) -> tuple[bytes, list[int], int]:
    """The bytes a file of `tensors` (name, shape, dtype) starts with (the header's length,
    then the header, padded so that the data starts 8-byte aligned), the offset of each
    tensor's data from the start of the file, and the file's size."""
    entries: dict[str, Any] = {}
    offset, offsets = 0, []
    for name, shape, dtype in tensors:
        kind = _NAMES.get(jnp.dtype(dtype).newbyteorder("="))
        if kind is None:
            raise TypeError(
                f"tensor {name!r} has the dtype {dtype}, which .safetensors cannot store; "
                f"cast it to one of {', '.join(map(str, _NAMES))}."
            )
        size = math.prod(shape) * jnp.dtype(dtype).itemsize
        entries[name] = {"dtype": kind, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offsets.append(offset)
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, [start + o for o in offsets], start + offset


def little_endian(dtype: Any) -> np.dtype:
    """The dtype a tensor is written in: the format is little-endian."""
    return jnp.dtype(dtype).newbyteorder("<")


def write(
    path: str | os.PathLike[str],
    tensors: list[tuple[str, tuple[int, ...], Any]],
    read: Callable[[int], np.ndarray],
) -> None:
    """Write a `.safetensors` file of `tensors` (name, shape, dtype), in that order.

    The header is written first; then `read(k)` gives the `k`-th tensor's data,
    one tensor at a time. The file appears complete or not at all (it is
    written beside its final name, then renamed).
    """
    start, _, _ = header(tensors)
    with written_beside(path) as partial, open(partial, "wb") as f:
        f.write(start)
        for k, (name, shape, dtype) in enumerate(tensors):
            array = tensor_to_write(read, k, name, shape, little_endian(dtype))
            f.write(array.reshape(-1).view(np.uint8).data)


class SafetensorsCheckpoint(Checkpoint):
    slices = True

    def __init__(self, path: pathlib.Path):
        self.path = path
        # The file stays open from its header to its last tensor: a file replaced at `path`
        # meanwhile (a new save renamed over it) is not read, the one planned from is.
        self._fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        with os.fdopen(os.dup(self._fd), "rb") as f:
            header, self.data_start = read_header(path, f)
        super().__init__(str(path), header)

    def _read(self, row: int, path: str) -> np.ndarray:
        return self.read_tensor(self.view.leaves[row], path)

    def read_tensor(self, info: TensorInfo, name: str) -> np.ndarray:
        """The tensor `info` describes (`name` for messages)."""
        out = (
            _aligned_empty(info.shape, info.dtype)
            if info.end - info.begin >= _ALIGNED_FROM
            else np.empty(info.shape, info.dtype)
        )
        self._read_into(out.reshape(-1).view(np.uint8), self.data_start + info.begin, name)
        return out

    def read_slice(self, path: str, index: Any) -> np.ndarray:
        return self.read_tensor_slice(self.meta[path], path, index)

    def read_tensor_slice(self, info: TensorInfo, name: str, index: Any) -> np.ndarray:
        """`read_tensor(info, name)[index]`, reading only the slice's bytes: one read per run
        of them (a row split is one run, a column split one per row). Past `MAX_RUNS` runs,
        the pages of the slice are read through a memory map instead."""
        where = box(index, info.shape)
        out = np.empty(extent(where), info.dtype)
        if run_count(info.shape, where) > MAX_RUNS:
            tensor = self._mapped[info.begin : info.end].view(info.dtype).reshape(info.shape)
            out[...] = tensor[index]
            return out
        offsets, length = byte_runs(info.shape, info.dtype.itemsize, where)
        buffer = out.reshape(-1).view(np.uint8)
        start = self.data_start + info.begin
        for k, offset in enumerate(offsets.tolist()):
            self._read_into(buffer[k * length : (k + 1) * length], start + offset, name)
        return out

    def _read_into(self, buffer: np.ndarray, offset: int, name: str) -> None:
        done = 0
        while done < len(buffer):  # a read returns at most about 2 GiB
            got = os.preadv(self._fd, [buffer[done:].data], offset + done)
            if got == 0:
                raise SourceError(f"{self.where}: tensor {name!r} is cut short; the file is truncated.")
            done += got

    @functools.cached_property
    def _mapped(self) -> np.ndarray:
        """The data section mapped once (a map per tensor costs more than a small tensor's read)."""
        return np.frombuffer(mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ), np.uint8)[self.data_start :]


#: XLA's CPU client takes a host buffer aligned to this many bytes as it is, without a copy:
#: worth it from a size on (below, a copy costs less than the aliasing's bookkeeping).
_ALIGNMENT, _ALIGNED_FROM = 64, 2**20


def _aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """`np.empty(shape, dtype)` on a 64-byte boundary (NumPy guarantees 16): a tensor read
    into it becomes a CPU JAX array without a second copy of its bytes."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    return raw[start : start + size].view(dtype).reshape(shape)
