"""Client addresses as the Redis scripts see them: fixed-width hex, and
allowlist networks as ``hex/bits`` (the comparison is done in Lua)."""

from __future__ import annotations

import functools
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


def bucket_hex(addr_hex: str, ipv6_prefix: int) -> str:
    """The throttles' bucket for an address (:func:`ip_hex` form): an IPv4
    address is its own; an IPv6 one shares its bucket with its /``ipv6_prefix``
    (whoever holds a /64 has 2^64 addresses, not 2^64 budgets)."""
    if len(addr_hex) != 32 or ipv6_prefix >= 128:
        return addr_hex
    full, rest = divmod(ipv6_prefix, 4)
    out = addr_hex[:full]
    if rest:
        nibble = int(addr_hex[full], 16) & (0xF << (4 - rest)) & 0xF
        out += f"{nibble:x}"
    return out.ljust(32, "0") + f"/{ipv6_prefix}"


def client_bucket(ip: str, ipv6_prefix: int) -> str:
    """:func:`bucket_hex`'s bucket written as an address (usage records): the
    IPv4 address, or the IPv6 address's network of ``ipv6_prefix`` bits."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "0.0.0.0"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/{ipv6_prefix}", strict=False).network_address)
    return str(addr)


def network_hex(cidr: str) -> str:
    net = ipaddress.ip_network(cidr, strict=False)
    return f"{net.network_address.packed.hex()}/{net.prefixlen}"


def allowed(client_ip: str, allowlist: Sequence[str]) -> bool:
    """The Python twin of the script's allowlist check (IPv4-mapped IPv6
    addresses count as their IPv4 address, as there)."""
    try:
        addr = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in ipaddress.ip_network(c, strict=False) for c in allowlist)


@functools.lru_cache(maxsize=65536)
def v6_network(ip: str, bits: int) -> str:
    """The network of ``bits`` around an IPv6 address; an IPv4-mapped address
    (``::ffff:a.b.c.d``, a dual-stack listener's IPv4 client) is its IPv4 address."""
    addr = ipaddress.IPv6Address(ip.split("%", 1)[0])
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))


def address_of(ip: str) -> str:
    """The unit of the fan-out count: the address, or for IPv6 its /64."""
    return ip if ":" not in ip else v6_network(ip, 64)


def prefix_of(ip: str) -> str:
    """The unit of the per-prefix failed-authentication count: IPv4 /24, IPv6 /48."""
    if ":" in ip:
        ip = v6_network(ip, 48)
        if ":" in ip:
            return ip
    head, _, _ = ip.rpartition(".")
    return f"{head}.0/24"
