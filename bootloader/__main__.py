"""``python -m bootloader`` (and a zipapp whose ``__main__`` is this package) runs ``csc-bootloader``."""

import sys

from bootloader.cli import main

sys.exit(main())
