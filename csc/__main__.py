"""``python -m csc``: the same as the ``csc`` command."""

import sys

from csc.cli import main

sys.exit(main())
