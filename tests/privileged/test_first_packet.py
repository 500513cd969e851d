"""Strict means from the first packet: a new pod sends and receives nothing before its
interface is judged by the datapath, whether the CNI announces it (EnforceNpToPod) or the
agent only sees its veth appear (the netlink path, for pods wired without the call), and
also while the agent is down.

Each trial: a peer pod already aims datagrams at the new pod's address before the pod
exists; on the netlink path the new pod sends from the moment its network works (a
sender already running as the wiring finishes), on the CNI path from the answer on
(containers start after the CNI's ADD). No policy selects the new pod: strict mode
denies it everything, so any datagram that arrives is a leak.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections import Counter
from dataclasses import dataclass

import pytest

from simnode.netns import socket_in
from simnode.node import SimPod
from tests.privileged.agentrig import AgentRig

pytestmark = pytest.mark.privileged

PORT = 9
TRIALS = 25
AFTER = 0.2  # seconds of traffic after the pod is created


class Blaster:
    """Datagrams from ``netns`` to ``target`` every millisecond until stopped."""

    def __init__(self, netns: str, target: ipaddress.IPv4Address, port: int) -> None:
        self.sock = socket_in(netns, socket.AF_INET, socket.SOCK_DGRAM)
        self.target = (str(target), port)
        self.task = asyncio.create_task(self._run(), name="blaster")

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.sock.sendto(b"x", self.target)
            await asyncio.sleep(0.001)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.sock.close()


class Catcher(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.sources: Counter[str] = Counter()

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.sources[str(addr[0])] += 1


async def catch(netns: str, port: int) -> tuple[asyncio.DatagramTransport, Catcher]:
    sock = socket_in(netns, socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    catcher = Catcher()
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: catcher, sock=sock
    )
    return transport, catcher


@dataclass
class PodTraffic:
    """The new pod's side: it receives on PORT and sends to the observer."""

    transport: asyncio.DatagramTransport
    caught: Catcher
    outbound: Blaster

    @classmethod
    async def start(cls, pod: SimPod, observer: SimPod) -> PodTraffic:
        transport, caught = await catch(pod.netns, PORT)
        return cls(transport, caught, Blaster(pod.netns, observer.ipv4, 9999))

    async def stop(self) -> None:
        await self.outbound.stop()
        self.transport.close()


async def setup(rig: AgentRig) -> tuple[SimPod, SimPod]:
    """A peer that may send anywhere and an observer that accepts everything."""
    peer = await rig.add_pod("peer", labels={"role": "peer"})
    observer = await rig.add_pod("observer", labels={"role": "observer"})
    rig.open_policy("open", [peer, observer])
    return peer, observer


def busy(rig: AgentRig, peer: SimPod, observer: SimPod, n: int) -> None:
    """Keep the enforcer busy: a large policy change to program, as on a loaded node
    (the new pod's veth appears while it is being compiled and switched)."""
    cidrs = [{"cidr": f"10.{100 + n % 50}.{i // 256}.{i % 256}/32"} for i in range(20_000)]
    rig.apply(
        rig.policy_endpoint(
            "bulk-abc",
            policy="bulk",
            targets=[peer, observer],
            isolation=["Ingress"],
            ingress=cidrs,
        )
    )


async def trial(
    rig: AgentRig, peer: SimPod, observer: SimPod, seen: Catcher, n: int, *, cni: bool
) -> int:
    """Leaked datagrams of one new pod (``seen``: what the observer receives)."""
    busy(rig, peer, observer, n)
    v4, v6 = rig.sim.reserve()
    inbound = Blaster(peer.netns, v4, PORT)
    inside: list[PodTraffic] = []

    async def start_pod_traffic(pod: SimPod) -> None:
        inside.append(await PodTraffic.start(pod, observer))

    name = f"new-{'c' if cni else 'n'}{n}"
    try:
        pod = await rig.sim.add_pod(
            name, address=(v4, v6), on_wired=None if cni else start_pod_traffic
        )
        if cni:
            await start_pod_traffic(pod)
        await asyncio.sleep(AFTER)
    finally:
        await inbound.stop()
        for traffic in inside:
            await traffic.stop()
    (traffic,) = inside
    caught = traffic.caught
    leaked = caught.sources[str(peer.ipv4)] + seen.sources[str(v4)]
    await rig.sim.remove_pod(name)
    return leaked


@pytest.mark.parametrize("path", ["cni", "netlink"])
async def test_a_new_pod_leaks_nothing_before_it_is_judged(rig: AgentRig, path: str) -> None:
    rig.mode = "strict"
    peer, observer = await setup(rig)
    if path == "cni":
        rig.sim.cni_socket = rig.npa_socket
        rig.sim.mode = "strict"
    await rig.start_agent()
    await rig.ready()
    await rig.settle_agent()
    watch, seen = await catch(observer.netns, 9999)
    try:
        leaks = [
            await trial(rig, peer, observer, seen, n, cni=path == "cni") for n in range(TRIALS)
        ]
    finally:
        watch.close()
    assert leaks == [0] * TRIALS, f"datagrams leaked per trial: {leaks}"


async def test_pods_created_while_the_agent_is_down_leak_nothing(rig: AgentRig) -> None:
    """Netlink path: the gate outlives the agent, so a pod wired while it is down stays
    dark until the restarted agent judges it; then it enforces strict mode as usual."""
    rig.mode = "strict"
    peer, observer = await setup(rig)
    await rig.start_agent()
    await rig.ready()
    await rig.settle_agent()
    assert await rig.probe(peer, observer, protocol="UDP")
    assert await rig.stop_agent() == 0
    watch, seen = await catch(observer.netns, 9999)
    try:
        leaks = [await trial(rig, peer, observer, seen, n, cni=False) for n in range(5)]
    finally:
        watch.close()
    assert leaks == [0] * 5, f"datagrams leaked while the agent was down: {leaks}"
    # the running pods keep their enforcement meanwhile
    assert await rig.probe(peer, observer, protocol="UDP")
    await rig.start_agent()
    await rig.ready()
    assert await rig.probe(peer, observer, protocol="UDP")
