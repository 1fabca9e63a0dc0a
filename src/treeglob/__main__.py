"""`python -m treeglob`: see `treeglob._cli`."""

import sys

from ._cli import main

sys.exit(main())
