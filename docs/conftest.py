"""The pages' examples run as doctests; a page whose examples import a framework that
is not installed (the run with the core dependencies alone) is skipped, not failed."""

import importlib.util
import re

import pytest

_IMPORTS = re.compile(r"^>>> (?:import|from) (flax|haiku|penzai|orbax)\b", re.MULTILINE)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.suffix != ".md" or "docs" not in item.path.parts:
            continue
        missing = sorted(
            {
                name
                for name in _IMPORTS.findall(item.path.read_text())
                if importlib.util.find_spec(name) is None
            }
        )
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(missing)}"))
