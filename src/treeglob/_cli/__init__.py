"""The command line (`treeglob`, `python -m treeglob`), on the public API."""

from .main import main as main
