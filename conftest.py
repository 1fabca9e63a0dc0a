"""For every test run from the repository, whatever paths it is given: the documentation's
pages run as doctests, and a page whose examples import a framework that is not installed
(the run with the core dependencies alone) is skipped, not failed. The tests' own fixtures
are in `tests/conftest.py`."""

import importlib.util
import re

import pytest

_FRAMEWORK_IMPORTS = re.compile(r"^>>> (?:import|from) (flax|haiku|penzai|orbax)\b", re.MULTILINE)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.suffix != ".md":
            continue
        imported = set(_FRAMEWORK_IMPORTS.findall(item.path.read_text()))
        missing = sorted(name for name in imported if importlib.util.find_spec(name) is None)
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(missing)}"))
