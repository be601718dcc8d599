"""Header pairs a wire decoder already checked (shared/protocol/heads.py), so that
:func:`shared.headers.header_pairs` need not check them again.

A module of its own because :class:`ValidPairs` subclasses ``list``: it stays a plain Python
class, which the modules compiled with mypyc (shared/compiled.py) use as any other object; a
class in a compiled module cannot subclass ``list``.
"""

from __future__ import annotations


class ValidPairs(list[tuple[str, str]]):
    """Header pairs a wire decoder already checked at least as strictly as
    :func:`shared.headers.header_pairs` does (token names, no CR/LF/NUL)."""

    __slots__ = ()
