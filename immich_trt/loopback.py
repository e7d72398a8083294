"""Whether an address is loopback: the sidecar's access rule without an API key, and the
only destination of the project's benchmarks and tests."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str | None) -> bool:
    """True for an IP literal in 127.0.0.0/8, ``::1`` or IPv4-mapped loopback (an IPv6
    scope id such as ``%eth0`` ignored); False for anything else, including an empty or
    unknown peer and host names (resolve them first)."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback
