"""``python -m portal``: the same as ``csc-portal``."""

import sys

from portal.cli import main

sys.exit(main())
