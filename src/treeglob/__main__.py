"""`python -m treeglob`: see `treeglob._cli`."""

import sys

from ._cli.main import main

sys.exit(main())
