"""Peers trusted by address: the proxies whose word about a client a listener believes (the
portal's ``trusted_proxies``, the CSC's ``proxy_protocol``)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


class TrustedPeers:
    """IP addresses and networks; a peer is in them by its address, an IPv4 peer seen by a
    dual-stack listener (``::ffff:a.b.c.d``) by its IPv4 address."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)
