"""The tenant agent: dials out to the CSC and serves its streams from the configured upstreams."""

import shared  # noqa: F401  (first: shared/compiled.py guards the compiled modules)

__version__ = "0.1.0"
