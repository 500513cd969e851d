"""A simulated node with the datapath attached to every pod veth, and probes."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable, Sequence

from bpf.attach import attach
from bpf.datapath import ALLOW_ALL, Datapath, DirectionPolicy, PodPolicy
from common.netlink import Netlink
from simnode.node import SimNode, SimPod
from simnode.traffic import PodServer, tcp_probe, udp_probe

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# client (None: the node), target, port, protocol, family
Case = tuple[SimPod | None, SimPod, int, str, int]


class PodNet:
    def __init__(self, sim: SimNode, dp: Datapath) -> None:
        self.sim = sim
        self.dp = dp
        self.servers: dict[str, PodServer] = {}
        self.node_server: PodServer | None = None

    async def add_pod(self, name: str, *, ports: Iterable[int] = (80, 81)) -> SimPod:
        pod = await self.sim.add_pod(name)
        server = PodServer(name=name, netns=pod.netns, ports=ports)
        await server.start()
        self.servers[name] = server
        pod_id = self.dp.register_pod(namespace="default", name=name, uid=f"uid-{name}")
        self.dp.program_pods({pod.ifindex: PodPolicy(pod_id, ALLOW_ALL, ALLOW_ALL)})
        async with Netlink(netns=self.sim.netns) as nl:
            await attach(nl, pod.ifindex, ingress=self.dp.ingress_prog, egress=self.dp.egress_prog)
        return pod

    def program(
        self,
        pod: SimPod,
        *,
        ingress: DirectionPolicy = ALLOW_ALL,
        egress: DirectionPolicy = ALLOW_ALL,
    ) -> None:
        record = self.dp.pod_record(pod.ifindex)
        assert record is not None
        self.dp.program_pods({pod.ifindex: PodPolicy(record.pod_id, ingress, egress)})

    async def probe(
        self,
        client: SimPod | None,
        target: SimPod,
        *,
        port: int = 80,
        protocol: str = "TCP",
        family: int = 4,
        timeout: float = 0.5,
    ) -> bool:
        """Real traffic from ``client`` (None: the node itself) to ``target``."""
        netns = client.netns if client else self.sim.netns
        probe = tcp_probe if protocol == "TCP" else udp_probe
        return await probe(
            netns=netns,
            target=target.address(family),
            port=port,
            timeout=timeout,
            expect=target.name,
        )

    async def matrix(self, cases: Sequence[Case]) -> list[bool]:
        return list(
            await asyncio.gather(
                *(self.probe(c, t, port=p, protocol=proto, family=f) for c, t, p, proto, f in cases)
            )
        )

    async def close(self) -> None:
        for server in self.servers.values():
            await server.close()
