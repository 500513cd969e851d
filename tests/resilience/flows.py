"""Counted traffic for the resilience tests: a steady stream of fresh UDP flows from each
client pod to a server pod, counted by the sender and by the server.

Every datagram goes out of a new socket, so it is a new flow (a new source port): the
datapath decides it from the rules in force at that instant, never from a conntrack
entry an earlier datagram created. A lapse in enforcement therefore shows at once as an
allowed datagram that did not arrive or a denied one that did.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field

from simnode.netns import socket_in
from simnode.node import SimPod
from simnode.traffic import PodServer


@dataclass
class Tally:
    sent: int = 0
    received: int = 0


@dataclass
class FlowCounter:
    server: PodServer
    target: SimPod
    clients: dict[str, SimPod]  # name -> pod
    allowed: set[str]  # the clients the policy allows
    port: int = 5000
    interval: float = 0.01  # per client: 100 new flows per second
    _sent: dict[str, int] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _marks: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    _running: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> None:
        self._sent = dict.fromkeys(self.clients, 0)
        self._running.set()
        self._task = asyncio.create_task(self._run(), name="resilience-flows")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        target = (str(self.target.ipv4), self.port)
        while True:
            await self._running.wait()
            for name, pod in self.clients.items():
                sock = socket_in(pod.netns, socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    await loop.sock_sendto(sock, b"probe", target)
                    self._sent[name] += 1
                except OSError:
                    pass  # not sent: not counted
                finally:
                    sock.close()
            await asyncio.sleep(self.interval)

    def _received(self, name: str) -> int:
        return self.server.udp_received[str(self.clients[name].ipv4)]

    def mark(self, phase: str) -> None:
        """Remember the counters at the start of ``phase``."""
        self._marks[phase] = {n: (self._sent[n], self._received(n)) for n in self.clients}

    async def tally(self, since: str | None = None, *, settle: float = 0.3) -> dict[str, Tally]:
        """Counts per client (since the mark ``since``, or from the start). Sending
        pauses while the datagrams in flight arrive (``settle`` seconds), so that every
        datagram counted as sent had its chance to be received."""
        self._running.clear()
        await asyncio.sleep(settle)
        base = self._marks.get(since or "", {})
        out = {
            n: Tally(
                self._sent[n] - base.get(n, (0, 0))[0], self._received(n) - base.get(n, (0, 0))[1]
            )
            for n in self.clients
        }
        self._running.set()
        return out

    def lapses(self, counts: dict[str, Tally]) -> tuple[int, int]:
        """(allowed datagrams dropped, denied datagrams passed)."""
        dropped = sum(max(0, t.sent - t.received) for n, t in counts.items() if n in self.allowed)
        passed = sum(t.received for n, t in counts.items() if n not in self.allowed)
        return dropped, passed

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
