"""Real TCP and UDP traffic between simulated pods.

:class:`PodServer` answers on TCP and UDP ports inside a pod's namespace (IPv4 and IPv6
sockets apart): every line or datagram is echoed back prefixed with the pod's name, so
a probe knows it reached the right pod. Probes return True only when the answer came.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections import Counter
from collections.abc import Iterable
from typing import cast

from simnode.netns import socket_in

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _family(addr: Address) -> int:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: PodServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.server.udp_received[str(addr[0])] += 1
        if self.transport is not None:
            self.transport.sendto(self.server.name.encode() + b":" + data, addr)


class PodServer:
    """TCP and UDP echo responders on ``ports`` in ``netns`` for both address families."""

    def __init__(
        self,
        *,
        name: str,
        netns: str | None,
        ports: Iterable[int] = (80, 81),
        listen: Iterable[tuple[int, str]] | None = None,
    ) -> None:
        """``ports`` are served over TCP and UDP; ``listen`` gives exact (port, protocol)
        pairs instead."""
        self.name = name
        self.netns = netns
        self.listen = (
            tuple(listen)
            if listen is not None
            else tuple((p, proto) for p in ports for proto in ("TCP", "UDP"))
        )
        self.udp_received: Counter[str] = Counter()
        self.tcp_accepted: Counter[str] = Counter()
        self._servers: list[asyncio.Server] = []
        self._transports: list[asyncio.BaseTransport] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for port, proto in self.listen:
            for family, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                kind = socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM
                sock = socket_in(self.netns, family, kind)
                if proto == "TCP":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((any_addr, port))
                if proto == "TCP":
                    self._servers.append(await asyncio.start_server(self._on_tcp, sock=sock))
                else:
                    transport, _ = await loop.create_datagram_endpoint(
                        lambda: _Udp(self), sock=sock
                    )
                    self._transports.append(transport)

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        self.tcp_accepted[str(peer[0]) if peer else "?"] += 1
        try:
            while line := await reader.readline():
                writer.write(self.name.encode() + b":" + line)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for transport in self._transports:
            transport.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)
        self._servers.clear()
        self._transports.clear()


async def tcp_probe(
    *,
    netns: str | None,
    target: Address,
    port: int,
    timeout: float = 0.5,
    expect: str | None = None,
    source_port: int = 0,
) -> bool:
    """Connect from ``netns`` and exchange one line; True if the answer came back.
    ``source_port`` pins the client port (0: the kernel's choice)."""
    conn = await open_tcp(
        netns=netns, target=target, port=port, timeout=timeout, source_port=source_port
    )
    if conn is None:
        return False
    try:
        return await conn.exchange(b"probe", timeout=timeout, expect=expect)
    finally:
        await conn.close()


async def udp_probe(
    *,
    netns: str | None,
    target: Address,
    port: int,
    timeout: float = 0.5,
    expect: str | None = None,
    source_port: int = 0,
) -> bool:
    """Send one datagram from a fresh socket (a new flow); True if the echo came back."""
    loop = asyncio.get_running_loop()
    sock = socket_in(netns, _family(target), socket.SOCK_DGRAM)
    if source_port:  # a failure to bind is an error, not a verdict
        sock.bind(("::" if target.version == 6 else "0.0.0.0", source_port))
    try:
        await loop.sock_connect(sock, (str(target), port))
        await loop.sock_sendall(sock, b"probe")
        data = await asyncio.wait_for(loop.sock_recv(sock, 2048), timeout)
    except (TimeoutError, ConnectionError, OSError):
        return False
    finally:
        sock.close()
    return data.endswith(b":probe") and (expect is None or data.startswith(expect.encode()))


class TcpConnection:
    """An open connection to a :class:`PodServer`, for flows that outlive policy changes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""

    async def exchange(
        self, payload: bytes, *, timeout: float = 0.5, expect: str | None = None
    ) -> bool:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_sendall(self.sock, payload + b"\n"), timeout)
            while b"\n" not in self._buf:
                chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout)
                if not chunk:
                    return False
                self._buf += chunk
        except (TimeoutError, ConnectionError, OSError):
            return False
        line, _, self._buf = self._buf.partition(b"\n")
        name, _, echoed = line.partition(b":")
        return echoed == payload and (expect is None or name == expect.encode())

    async def close(self) -> None:
        self.sock.close()


async def open_tcp(
    *, netns: str | None, target: Address, port: int, timeout: float = 0.5, source_port: int = 0
) -> TcpConnection | None:
    loop = asyncio.get_running_loop()
    sock = socket_in(netns, _family(target), socket.SOCK_STREAM)
    if source_port:  # a failure to bind is an error, not a verdict
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::" if target.version == 6 else "0.0.0.0", source_port))
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (str(target), port)), timeout)
    except (TimeoutError, ConnectionError, OSError):
        sock.close()
        return None
    return TcpConnection(sock)
