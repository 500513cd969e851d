"""The DNS proxy on loopback, against a DNS server built with dnspython: answers are held
until their addresses are learned, CNAME chains are followed, garbage teaches nothing and
breaks nothing."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import cast

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from agent.dnsproxy import DnsProxy, Upstream

A = ipaddress.ip_address
RECORDS = {
    "api.example.com.": ("A", ["192.0.2.1", "192.0.2.2"]),
    "www.example.com.": ("CNAME", ["api.example.com."]),
}


class Server(asyncio.DatagramProtocol):
    """Answers A queries from RECORDS (chasing CNAMEs), NXDOMAIN otherwise."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        try:
            q = dns.message.from_wire(data)
        except Exception:
            return  # garbage: no answer
        r = dns.message.make_response(q)
        name = q.question[0].name.to_text().lower()
        while name in RECORDS:
            kind, values = RECORDS[name]
            r.answer.append(dns.rrset.from_text_list(name, 60, "IN", kind, values))
            if kind != "CNAME":
                break
            name = values[0]
        if not r.answer:
            r.set_rcode(dns.rcode.NXDOMAIN)
        self.transport.sendto(r.to_wire(), addr)


def _port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[DnsProxy, int, list[tuple[float, str, str, list[str]]]]]:
    loop = asyncio.get_running_loop()
    server, _ = await loop.create_datagram_endpoint(Server, local_addr=("127.0.0.1", 0))
    upstream_port = server.get_extra_info("sockname")[1]
    learned: list[tuple[float, str, str, list[str]]] = []

    async def learn(
        pod: str, name: str, addrs: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]
    ) -> bool:
        await asyncio.sleep(0.05)  # a slow datapath write: the answer must wait for it
        learned.append((time.monotonic(), pod, name, [str(a) for a, _ in addrs]))
        return True

    local = _port()
    p = DnsProxy(
        [Upstream(A("127.0.0.1"), upstream_port, local)], learn, bind4="127.0.0.1", timeout=0.5
    )
    task = asyncio.create_task(p.serve())
    await asyncio.sleep(0.05)
    try:
        yield p, local, learned
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.close()


async def ask(port: int, payload: bytes, timeout: float = 1.0) -> tuple[float, bytes | None]:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        await loop.sock_connect(s, ("127.0.0.1", port))
        await loop.sock_sendall(s, payload)
        try:
            data = await asyncio.wait_for(loop.sock_recv(s, 65535), timeout)
        except TimeoutError:
            return time.monotonic(), None
        return time.monotonic(), data


async def test_the_answer_waits_until_its_addresses_are_learned(proxy) -> None:  # type: ignore[no-untyped-def]
    p, port, learned = proxy
    at, data = await ask(port, dns.message.make_query("WWW.example.com", "A").to_wire())
    assert data is not None
    answer = dns.message.from_wire(data)
    assert [r.rdtype for r in answer.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    ((when, pod, name, addrs),) = learned
    assert (pod, name, sorted(addrs)) == (
        "127.0.0.1",
        "WWW.example.com.",
        ["192.0.2.1", "192.0.2.2"],
    )
    assert when <= at, "released only after learning"
    assert (p.stats.queries, p.stats.answers, p.stats.learned) == (1, 1, 1)


async def test_nxdomain_teaches_nothing_and_is_answered(proxy) -> None:  # type: ignore[no-untyped-def]
    _p, port, learned = proxy
    _, data = await ask(port, dns.message.make_query("nope.example.com", "A").to_wire())
    assert data is not None
    assert dns.message.from_wire(data).rcode() == dns.rcode.NXDOMAIN
    assert learned == []


async def test_garbage_and_oversized_queries_break_nothing(proxy) -> None:  # type: ignore[no-untyped-def]
    p, port, learned = proxy
    for payload in (b"", os.urandom(7), os.urandom(1500), b"\xff" * 60000):
        _, data = await ask(port, payload, timeout=0.8)
        assert data is None  # the server ignores it; the proxy times out quietly
    _, data = await ask(port, dns.message.make_query("api.example.com", "A").to_wire())
    assert data is not None, "still answering"
    assert p.stats.unparsable == 2, "shorter than a header: dropped at once"
    assert p.stats.timeouts == 2, "the others forwarded, unanswered"
    assert len(learned) == 1
