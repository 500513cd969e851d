"""Build raw Ethernet frames for ``BPF_PROG_TEST_RUN`` (the programs do not check sums)."""

from __future__ import annotations

import ipaddress
import struct

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
TCP = 6
UDP = 17
SCTP = 132
ICMP = 1
ICMPV6 = 58

_MACS = bytes.fromhex("020000000002") + bytes.fromhex("020000000001")


def ethernet(ethertype: int, payload: bytes) -> bytes:
    return _MACS + struct.pack("!H", ethertype) + payload


def l4(protocol: int, *, sport: int, dport: int, payload: bytes = b"", icmp_type: int = 8) -> bytes:
    if protocol == TCP:
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0) + payload
    if protocol == UDP:
        return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if protocol == SCTP:
        return struct.pack("!HHII", sport, dport, 0, 0) + payload
    if protocol in (ICMP, ICMPV6):
        return struct.pack("!BBHHH", icmp_type, 0, 0, 1, 1) + payload
    return payload


def ipv4(
    *,
    src: Address,
    dst: Address,
    protocol: int,
    body: bytes,
    options: bytes = b"",
    ident: int = 1,
    frag_offset: int = 0,
    more_fragments: bool = False,
) -> bytes:
    """An IPv4 packet; ``frag_offset`` in bytes (multiple of 8); ``options`` padded to 4."""
    options = options + b"\x00" * (-len(options) % 4)
    ihl = 5 + len(options) // 4
    flags = (0x2000 if more_fragments else 0) | (frag_offset // 8)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        4 * ihl + len(body),
        ident,
        flags,
        64,
        protocol,
        0,
        src.packed,
        dst.packed,
    )
    return ethernet(ETH_P_IP, header + options + body)


def ipv6(
    *,
    src: Address,
    dst: Address,
    protocol: int,
    body: bytes,
    ext: list[tuple[int, bytes]] | None = None,
    fragment: tuple[int, bool, int] | None = None,
) -> bytes:
    """An IPv6 packet. ``ext``: (header type, options payload) for hop-by-hop (0),
    routing (43) or destination options (60), in order; ``fragment``: (offset in bytes,
    more fragments, identification), placed after them."""
    chain: list[tuple[int, bytes]] = []
    for kind, data in ext or []:
        data = data + b"\x00" * (-(len(data) + 2) % 8)
        chain.append((kind, data))
    encoded = b""
    headers = [k for k, _ in chain] + ([44] if fragment else [])
    next_types = [*headers[1:], protocol]
    for (_kind, data), nxt in zip(chain, next_types, strict=False):
        encoded += struct.pack("!BB", nxt, (len(data) + 2) // 8 - 1) + data
    if fragment:
        offset, more, ident = fragment
        encoded += struct.pack("!BBHI", protocol, 0, (offset & 0xFFF8) | int(more), ident)
    first = headers[0] if headers else protocol
    payload = encoded + body
    header = struct.pack("!IHBB16s16s", 0x60000000, len(payload), first, 64, src.packed, dst.packed)
    return ethernet(ETH_P_IPV6, header + payload)


def packet(
    *,
    src: Address,
    dst: Address,
    protocol: int,
    sport: int = 40000,
    dport: int = 80,
    payload: bytes = b"x" * 16,
    icmp_type: int | None = None,
) -> bytes:
    """A complete unfragmented packet of either family."""
    if icmp_type is None:
        icmp_type = 8 if src.version == 4 else 128
    body = l4(protocol, sport=sport, dport=dport, payload=payload, icmp_type=icmp_type)
    if src.version == 4:
        return ipv4(src=src, dst=dst, protocol=protocol, body=body)
    return ipv6(src=src, dst=dst, protocol=protocol, body=body)


def arp_request(*, sender: ipaddress.IPv4Address, target: ipaddress.IPv4Address) -> bytes:
    body = struct.pack(
        "!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 1, _MACS[6:], sender.packed, b"\x00" * 6, target.packed
    )
    return ethernet(ETH_P_ARP, body)
