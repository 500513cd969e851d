"""The node-local DNS proxy that teaches the datapath what pods resolve (domain rules).

Pods with domain rules have their DNS queries to the cluster DNS steered here
(agent.dnssteer: an nftables DNAT to this node, one local port per cluster DNS address).
Each query is forwarded to that address; the answer is parsed (dnspython, never by
hand) and, **before it is released to the pod**, the addresses it gives for the asked
name are written to the datapath for that pod (``learn``): the first connection the pod
opens after its lookup finds them in force, whatever the load. Then the answer goes back
to the pod unchanged; conntrack's reverse NAT makes it come from the address the pod
asked.

Failure modes (none opens egress a policy denies):
- a query or answer that does not parse is forwarded as it is and teaches nothing;
- the upstream does not answer within ``timeout``: the pod gets nothing (it retries);
- learning fails (the datapath, a full table): the answer is released anyway, and the
  pod's connection is judged without it (denied unless another rule allows it);
- more than ``max_inflight`` queries at once: the excess is dropped and counted;
- the proxy is down (the agent stopped): on a clean stop the steering is removed first,
  so DNS goes to the cluster DNS directly and nothing new is learned; after a crash the
  steered pods' lookups fail until the agent is back.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import dns.exception
import dns.message
import dns.rdatatype
import structlog

from agent.domains import final_addresses

log = structlog.get_logger("agent.dnsproxy")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# (pod address, asked name, [(address, ttl)]) -> learned (True) or not
Learn = Callable[[str, str, list[tuple[Address, int]]], Awaitable[bool]]
PARSED_MAX = 4096  # answers whose parse is kept


@dataclass
class ProxyStats:
    queries: int = 0
    answers: int = 0
    learned: int = 0  # answers whose addresses were written before release
    unparsable: int = 0  # queries shorter than a header, answers that do not parse
    timeouts: int = 0
    dropped: int = 0  # over max_inflight
    learn_failures: int = 0


@dataclass
class Upstream:
    """A cluster DNS address and the local port its steered queries arrive on."""

    address: Address
    port: int = 53
    local_port: int = 0


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, proxy: DnsProxy, upstream: Upstream) -> None:
        self.proxy = proxy
        self.upstream = upstream
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.proxy.received(self, data, addr)


class _Upstream(asyncio.DatagramProtocol):
    """One socket to a cluster DNS address for every query forwarded there: each query
    gets an ID of its own (16 bits, unused among those in flight), the answer is
    matched by it and given back its original ID."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self._next = 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if len(data) < 12:
            return
        fut = self.pending.pop(int.from_bytes(data[:2], "big"), None)
        if fut is not None and not fut.done():
            fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors: the queries in flight time out

    async def ask(self, query: bytes, timeout: float) -> bytes:
        if self.transport is None or len(query) < 12 or len(self.pending) >= 65535:
            raise OSError("upstream unavailable")
        while self._next in self.pending:
            self._next = self._next % 65535 + 1
        qid, self._next = self._next, self._next % 65535 + 1
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[qid] = fut
        try:
            self.transport.sendto(qid.to_bytes(2, "big") + query[2:])
            answer = await asyncio.wait_for(fut, timeout)
        finally:
            self.pending.pop(qid, None)
        return query[:2] + answer[2:]


@dataclass
class DnsProxy:
    upstreams: list[Upstream]
    learn: Learn
    bind4: str = "0.0.0.0"
    bind6: str = "::"
    timeout: float = 5.0
    max_inflight: int = 1024
    stats: ProxyStats = field(default_factory=ProxyStats)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _out: dict[int, _Upstream] = field(default_factory=dict)  # by local port
    # answers (without their ID) -> what they teach: bounded, oldest dropped first
    _parsed: dict[bytes, tuple[str, list[tuple[Address, int]]] | None] = field(default_factory=dict)

    async def serve(self) -> None:
        """Listen until cancelled (then stop answering)."""
        loop = asyncio.get_running_loop()
        transports: list[asyncio.DatagramTransport] = []
        try:
            for up in self.upstreams:
                family = socket.AF_INET if up.address.version == 4 else socket.AF_INET6
                host = self.bind4 if family == socket.AF_INET else self.bind6
                listener = _Listener(self, up)
                transport, _ = await loop.create_datagram_endpoint(
                    lambda listener=listener: listener,  # type: ignore[misc]
                    local_addr=(host, up.local_port),
                    family=family,
                    reuse_port=False,
                )
                transports.append(transport)
                out, self._out[up.local_port] = await loop.create_datagram_endpoint(
                    _Upstream, remote_addr=(str(up.address), up.port), family=family
                )
                transports.append(out)
                log.info(
                    "dnsproxy.listening",
                    upstream=f"{up.address}:{up.port}",
                    local=f"{host}:{up.local_port}",
                )
            await asyncio.Event().wait()
        finally:
            for t in transports:
                t.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def received(self, listener: _Listener, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.stats.queries += 1
        if len(data) < 12:  # not even a DNS header: nothing to forward
            self.stats.unparsable += 1
            return
        if len(self._tasks) >= self.max_inflight:
            self.stats.dropped += 1
            return
        host, port = addr[0], addr[1]
        if not isinstance(port, int):
            return
        task = asyncio.get_running_loop().create_task(
            self._one(listener, data, (str(host), port)), name="dnsproxy-query"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _one(self, listener: _Listener, query: bytes, client: tuple[str, int]) -> None:
        try:
            answer = await self._forward(listener.upstream, query)
        except TimeoutError:
            self.stats.timeouts += 1
            return
        except OSError as exc:
            log.warning(
                "dnsproxy.upstream_failed", upstream=str(listener.upstream.address), error=str(exc)
            )
            return
        try:
            await self._teach(client[0], answer)
        except Exception:  # never lose the answer to a bug in learning
            self.stats.learn_failures += 1
            log.exception("dnsproxy.learn_failed", pod=client[0])
        if listener.transport is not None:
            listener.transport.sendto(answer, client)
            self.stats.answers += 1

    async def _forward(self, up: Upstream, query: bytes) -> bytes:
        out = self._out.get(up.local_port)
        if out is None:
            raise OSError("no upstream socket")
        return await out.ask(query, self.timeout)

    async def _teach(self, pod: str, answer: bytes) -> None:
        # an answer repeated (but for its ID) teaches what it taught: parsed once
        key = answer[2:]
        taught = self._parsed.get(key)
        if taught is None:
            taught = self._parse(answer)
            if len(self._parsed) >= PARSED_MAX:
                self._parsed.pop(next(iter(self._parsed)))
            self._parsed[key] = taught
        if taught is None:
            return
        asked, addresses = taught
        if addresses and await self.learn(pod, asked, addresses):
            self.stats.learned += 1

    def _parse(self, answer: bytes) -> tuple[str, list[tuple[Address, int]]] | None:
        """(asked name, [(address, ttl)]) of an answer, None if it teaches nothing."""
        try:
            msg = dns.message.from_wire(answer, ignore_trailing=True)
        except (dns.exception.DNSException, ValueError):
            self.stats.unparsable += 1
            return None
        if not msg.question or not msg.answer:
            return None
        asked = msg.question[0].name.to_text()
        records = [
            (rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype), rdata.to_text(), rrset.ttl)
            for rrset in msg.answer
            for rdata in rrset
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.CNAME)
        ]
        return asked, final_addresses(asked, records)
