"""CSC, the alias switching center."""

import shared  # noqa: F401  (first: shared/compiled.py guards the compiled modules)

__version__ = "0.1.0"
