"""Fast CIDR parsing for bulk input (PolicyEndpoints carry hundreds of thousands).

``ipaddress.ip_network`` costs about 10 us per call; parsing the address with
``socket.inet_pton`` (C) and the prefix length by hand costs about 1 us, with the same
strictness on addresses (dotted quads only for IPv4, no zone for IPv6). Host bits are
cleared, and a bare address is a host prefix (/32, /128), as PolicyEndpoints use them.
"""

from __future__ import annotations

import socket
from typing import NamedTuple

from common.echo import bounded


class Cidr(NamedTuple):
    version: int  # 4 or 6
    length: int
    value: int  # the network address as an integer (host bits cleared)

    def contains(self, other: Cidr) -> bool:
        bits = 32 if self.version == 4 else 128
        return (
            other.version == self.version
            and other.length >= self.length
            and other.value >> (bits - self.length) == self.value >> (bits - self.length)
        )


def parse(text: str) -> Cidr:
    """``10.0.0.0/8``, ``10.1.2.3`` (a /32), ``fd00::/64``; ValueError naming the input."""
    if not isinstance(text, str):
        raise ValueError(f"invalid CIDR {bounded(text)}")
    addr, sep, length_text = text.strip().partition("/")
    version, family, bits = (6, socket.AF_INET6, 128) if ":" in addr else (4, socket.AF_INET, 32)
    try:
        raw = socket.inet_pton(family, addr)
    except OSError:
        raise ValueError(f"invalid CIDR {bounded(text)}") from None
    if sep:
        if not length_text.isascii() or not length_text.isdigit() or int(length_text) > bits:
            raise ValueError(f"invalid CIDR {bounded(text)}")
        length = int(length_text)
    else:
        length = bits
    value = int.from_bytes(raw, "big") >> (bits - length) << (bits - length) if length else 0
    return Cidr(version, length, value)
