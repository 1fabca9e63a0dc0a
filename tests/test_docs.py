"""The documentation site: the API reference names every public name, every page is
reachable, every Python block runs (pytest collects the pages as doctests)."""

import re

import treeglob as tg
from conftest import ROOT

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


def test_the_api_reference_documents_every_public_name():
    text = (DOCS / "reference" / "api.md").read_text()
    documented = set(re.findall(r"^\.\. (?:autofunction|autoclass|py:data):: treeglob\.(\w+)$", text, re.M))
    assert ".. automodule:: treeglob.presets" in text  # the module, with its members
    assert documented | {"presets"} == set(tg.__all__)


def test_every_python_block_of_every_page_is_a_doctest():
    # A block of Python without prompts would be shown without ever being run.
    for page in PAGES:
        for block in re.findall(r"^```python\n(.*?)^```", page.read_text(), re.M | re.S):
            assert block.startswith(">>> "), (
                f"{page.relative_to(ROOT)}: a Python block without >>>: {block[:80]!r}"
            )


def test_every_page_links_only_to_pages_that_exist():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).resolve().is_file(), f"{page.relative_to(ROOT)} links to {target}"


def test_the_readme_links_into_the_site():
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).is_file(), target
