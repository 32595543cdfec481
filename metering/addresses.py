"""Client addresses as the Redis scripts see them: fixed-width hex, and
allowlist networks as ``hex/bits`` (the comparison is done in Lua)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence


def ip_hex(ip: str) -> str:
    """Client address as fixed-width hex (8 nibbles IPv4, 32 IPv6) for the script."""
    try:
        return socket.inet_pton(socket.AF_INET, ip).hex()
    except OSError:
        pass
    addr = ipaddress.ip_address(ip)  # raises ValueError for garbage
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.packed.hex()


def network_hex(cidr: str) -> str:
    net = ipaddress.ip_network(cidr, strict=False)
    return f"{net.network_address.packed.hex()}/{net.prefixlen}"


def allowed(client_ip: str, allowlist: Sequence[str]) -> bool:
    try:
        addr = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    return any(addr in ipaddress.ip_network(c, strict=False) for c in allowlist)
