"""Operating-system errors in words for people: above all, a listener that cannot bind.

asyncio reports a failed bind as ``error while attempting to bind on address ('127.0.0.1',
8080): address already in use``; :func:`describe_os_error` turns that (or any ``OSError`` with a
known address) into ``127.0.0.1:8080 is already in use``. Pure: no I/O.
"""

from __future__ import annotations

import ast
import errno
import re

_ASYNCIO_BIND = re.compile(r"error while attempting to bind on address (\(.*?\)): (.*)$")
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]")
_BY_ERRNO = {
    errno.EADDRINUSE: "{address} is already in use",
    errno.EADDRNOTAVAIL: "{address} is not an address of this machine",
    errno.EACCES: "{address}: permission denied (ports below 1024 need privileges)",
}


def hostport(host: str, port: int | str) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address_from(message: str) -> tuple[str | None, str]:
    """The address asyncio put in ``message`` (``host:port``) and the reason after it."""
    match = _ASYNCIO_BIND.search(message)
    if match is None:
        return None, message
    try:
        sockaddr = ast.literal_eval(match.group(1))
        address = hostport(str(sockaddr[0]), int(sockaddr[1]))
    except (ValueError, SyntaxError, TypeError, IndexError):
        return None, match.group(2)
    return address, match.group(2)


def describe_os_error(exc: OSError, address: str | None = None) -> str:
    """``exc`` in words; a bind error names the address (``address`` when asyncio did not)."""
    message = exc.strerror or str(exc) or exc.__class__.__name__
    found, reason = _address_from(message)
    where = found or address
    if where is None:
        return reason
    template = _BY_ERRNO.get(exc.errno or 0)
    if template is not None:
        return template.format(address=where)
    return f"{where}: {reason}"


_CONNECT_BY_ERRNO = {
    errno.ECONNREFUSED: "the connection was refused (nothing listens there: is it running?)",
    errno.ECONNRESET: "the connection was reset",
    errno.ECONNABORTED: "the connection was aborted",
    errno.EHOSTUNREACH: "no route to the host",
    errno.ENETUNREACH: "the network is unreachable",
    errno.ETIMEDOUT: "the connection timed out",
    errno.EPIPE: "the connection was closed",
}


def describe_connect_error(exc: BaseException) -> str:
    """Why a connection could not be made or was lost, in words (no ``[Errno 111]``)."""
    import socket
    import ssl

    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its TLS certificate was not accepted ({exc.verify_message or exc.reason})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc})"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, OSError):
        known = _CONNECT_BY_ERRNO.get(exc.errno or 0)
        if known is not None:
            return known
        inner = _ERRNO_IN_TEXT.search(str(exc)) if exc.errno is None else None
        if inner is not None:  # several addresses tried: "Multiple exceptions: [Errno 111] ..."
            return _CONNECT_BY_ERRNO.get(int(inner.group(1)), "the connection failed")
        return (exc.strerror or str(exc) or exc.__class__.__name__).lower()
    return str(exc) or exc.__class__.__name__
