"""Progress of loads and saves: on a terminal, above a size, when asked; nothing otherwise."""

import contextlib
import io
import re
import sys

import numpy as np
import pytest

import treeglob as tg
from treeglob._checkpoints import progress

MODEL = {"blocks": [{"w": np.ones((64, 64), np.float32)} for _ in range(3)], "head": np.ones(8, np.float32)}
BYTES = 3 * 64 * 64 * 4 + 8 * 4


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def shown(monkeypatch, call, *, stream=None, threshold=1):
    """What `call()` writes to standard error (a terminal unless `stream` is given)."""
    monkeypatch.setattr(progress, "THRESHOLD_BYTES", threshold)
    out = stream or Terminal()
    with contextlib.redirect_stderr(out):  # in the test itself: pytest's capture resets sys.stderr
        call()
    return out.getvalue()


def test_a_load_and_a_save_show_tensors_bytes_and_rate_on_a_terminal(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    saved = shown(monkeypatch, lambda: tg.save(path, MODEL, progress=True))
    loaded = shown(monkeypatch, lambda: tg.load(MODEL, path, progress=True))
    assert saved.startswith(f"\rsaving {path}:") and f"\rloading {path}:" in loaded
    for text in (saved, loaded):
        last = text.splitlines()[-1]  # the finished bar stays
        assert "100%" in last and f"{BYTES / 1024:.1f}k/{BYTES / 1024:.1f}k" in last  # bytes of the total
        assert "B/s, 4/4 tensors]" in last  # the rate, the tensors


def test_nothing_is_shown_unless_asked_on_a_terminal_above_the_threshold(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    assert shown(monkeypatch, lambda: tg.save(path, MODEL)) == ""  # not asked
    assert shown(monkeypatch, lambda: tg.save(path, MODEL, progress=True), threshold=BYTES + 1) == ""
    log = io.StringIO()  # a log file, a pipe
    assert shown(monkeypatch, lambda: tg.load(MODEL, path, progress=True), stream=log) == ""


def test_progress_without_tqdm_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    with pytest.raises(
        ImportError, match=r"save\(progress=True\) draws its bar with tqdm.*treeglob\[progress\]"
    ):
        tg.save(tmp_path / "m.safetensors", MODEL, progress=True)


def test_a_bar_without_tqdm_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    message = (
        "load(progress=True) draws its bar with tqdm, which is not installed: pip install tqdm, "
        'or treeglob with its extra: pip install "treeglob[progress]".'
    )
    with pytest.raises(ImportError, match=f"^{re.escape(message)}$"):
        shown(monkeypatch, lambda: tg.load(MODEL, MODEL, progress=True))
