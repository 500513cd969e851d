"""A DNS server for simulated pods (dnspython), and a client that asks like a pod does.

The server answers A and AAAA from ``records`` (name -> addresses, or {"cname": name}),
chasing CNAMEs so that one answer holds the chain, with ``ttl``; NXDOMAIN otherwise.
Garbage is ignored.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from simnode.netns import socket_in

Records = Mapping[str, list[str] | dict[str, str]]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _key(name: str) -> str:
    return name.rstrip(".").lower()


@dataclass
class DnsServer:
    netns: str | None
    records: dict[str, list[str] | dict[str, str]] = field(default_factory=dict)
    ttl: int = 3600
    queries: int = 0
    _transports: list[asyncio.DatagramTransport] = field(default_factory=list)

    def set(self, name: str, value: list[str] | dict[str, str]) -> None:
        self.records[_key(name)] = value

    async def start(self, port: int = 53) -> None:
        loop = asyncio.get_running_loop()
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            sock = socket_in(self.netns, family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
            self._transports.append(transport)

    def answer(self, data: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except (dns.exception.DNSException, ValueError):
            return None
        self.queries += 1
        response = dns.message.make_response(query)
        if not query.question:
            return response.to_wire()
        q = query.question[0]
        want = "AAAA" if q.rdtype == dns.rdatatype.AAAA else "A"
        name = q.name.to_text()
        seen: set[str] = set()
        while _key(name) in self.records and _key(name) not in seen:
            seen.add(_key(name))
            value = self.records[_key(name)]
            if isinstance(value, dict):
                target = value["cname"].rstrip(".") + "."
                response.answer.append(dns.rrset.from_text(name, self.ttl, "IN", "CNAME", target))
                name = target
                continue
            fits = [
                a for a in value if ipaddress.ip_address(a).version == (6 if want == "AAAA" else 4)
            ]
            if fits:
                response.answer.append(dns.rrset.from_text_list(name, self.ttl, "IN", want, fits))
            break
        answered = any(r.rdtype == q.rdtype for r in response.answer)
        if not answered and _key(name) not in self.records:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    async def close(self) -> None:
        for t in self._transports:
            t.close()
        self._transports.clear()


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        out = self.server.answer(data)
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)


async def resolve(
    *, netns: str | None, server: Address, name: str, family: int = 4, timeout: float = 1.0
) -> list[Address] | None:
    """Ask ``server`` (UDP 53) for ``name`` from ``netns`` as a pod does (no search list,
    no cache). The addresses of the answer (through its CNAMEs), or None if there was no
    answer (blocked, timed out, NXDOMAIN)."""
    loop = asyncio.get_running_loop()
    query = dns.message.make_query(name, "AAAA" if family == 6 else "A")
    sock = socket_in(
        netns, socket.AF_INET6 if server.version == 6 else socket.AF_INET, socket.SOCK_DGRAM
    )
    try:
        await loop.sock_connect(sock, (str(server), 53))
        await loop.sock_sendall(sock, query.to_wire())
        data = await asyncio.wait_for(loop.sock_recv(sock, 65535), timeout)
    except (TimeoutError, OSError):
        return None
    finally:
        sock.close()
    try:
        response = dns.message.from_wire(data)
    except (dns.exception.DNSException, ValueError):
        return None
    if response.rcode() != dns.rcode.NOERROR:
        return None
    return [
        ipaddress.ip_address(r.to_text())
        for rrset in response.answer
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        for r in rrset
    ]
