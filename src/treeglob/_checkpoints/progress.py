"""Progress of a load or a save on a terminal: tensors, bytes and rate, drawn by tqdm.

Shown only when asked (`progress=True`; the command line always asks), when
the transfer moves at least `THRESHOLD_BYTES`, and when standard error is a
terminal: a log file or a pipe gets nothing. tqdm is an optional dependency
(`pip install "treeglob[progress]"`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["THRESHOLD_BYTES", "progress"]

#: A transfer smaller than this is over before a bar would tell anything.
THRESHOLD_BYTES = 64 * 2**20


def _tqdm(caller: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        raise ImportError(
            f"{caller}(progress=True) draws its bar with tqdm, which is not installed: "
            'pip install tqdm, or treeglob with its extra: pip install "treeglob[progress]".'
        ) from None
    return tqdm


@contextlib.contextmanager
def progress(
    show: bool, caller: str, what: str, tensors: int, total_bytes: int
) -> Iterator[Callable[[int], None]]:
    """A function to call with the bytes of each tensor moved, which advances a bar on
    standard error when `show`, standard error is a terminal and `total_bytes` is at least
    `THRESHOLD_BYTES`; else it does nothing.

    Raises:
        ImportError: `show` without tqdm installed (whatever the size and the terminal, so
            that the missing dependency shows on the first small try).
    """
    tqdm = _tqdm(caller) if show else None
    if tqdm is None or total_bytes < THRESHOLD_BYTES or not sys.stderr.isatty():
        yield lambda nbytes: None
        return
    bar = tqdm(
        total=total_bytes,
        desc=what,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        leave=True,  # the finished bar: the totals and the rate
        dynamic_ncols=True,
    )
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += 1
        bar.set_postfix_str(f"{done}/{tensors} tensors", refresh=False)
        bar.update(nbytes)

    try:
        yield advance
    finally:
        bar.close()
