"""`python -m treeglob`: see `treeglob._cli.main`."""

import sys

from ._cli.main import main

sys.exit(main())
