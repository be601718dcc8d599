"""Test support: a deterministic upstream, a delay proxy and helpers to run real processes.

These modules are shared by the test suite, ``bench/`` and ``demo/``; they never import the
product's packages, they drive them through their command lines.
"""
