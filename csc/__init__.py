"""CSC, the alias switching center."""

__version__ = "0.1.0"
