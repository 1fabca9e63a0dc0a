"""Sphinx configuration of the treeglob documentation (`sphinx-build -W docs build/docs`).

Pages are Markdown (MyST), so that pytest runs their examples as doctests, as it does the
README's; the API reference is generated from the docstrings, which are Google style.
"""

import treeglob

project = "treeglob"
author = "the treeglob authors"
copyright = "2026, the treeglob authors"
release = treeglob.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence"]
# Docstrings write code in single backticks, as Markdown does.
default_role = "code"
# Headings get anchors, so that a page can link to a section: [text](page.md#section).
myst_heading_anchors = 3

# The docstrings' signatures carry the types; the descriptions say what they mean.
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
# Defaults as written (`rules=presets.DEFAULT`), not as their long reprs.
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "sphinx_book_theme"
html_title = "treeglob"
html_theme_options = {"show_toc_level": 2, "home_page_in_toc": True}
