"""The tenant agent: dials out to the CSC and serves its streams from the configured upstreams."""

__version__ = "0.1.0"
