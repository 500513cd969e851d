"""A simulated Kubernetes node built from network namespaces.

One "node" namespace holds the host side of every pod's veth pair, the node's own
addresses (on its loopback: some kernels lack the dummy driver) and IP forwarding.
Each pod is its own namespace with ``eth0``, a /32 and a /128 address, and a default
route via the host veth (VPC-CNI style: gateway 169.254.1.1 with a static neighbour
entry, and fe80::1 for IPv6), so pods reach each other through their host veths, where
the policy programs sit.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
from dataclasses import dataclass, field

from simnode import netns

GATEWAY_V4 = "169.254.1.1"
GATEWAY_V6 = "fe80::1"


@dataclass
class SimPod:
    name: str
    netns: str
    host_veth: str
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address
    ifindex: int = 0  # of the host veth, inside the node namespace
    labels: dict[str, str] = field(default_factory=dict)

    def address(self, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return self.ipv4 if family == 4 else self.ipv6


class SimNode:
    """Create with a short unique ``tag`` (it prefixes every namespace and veth name)."""

    def __init__(
        self,
        tag: str,
        *,
        pod_net_v4: str = "10.66.0.0/16",
        pod_net_v6: str = "fd00:66::/64",
        node_ipv4: str = "172.31.255.1",
        node_ipv6: str = "fd00:ff::1",
    ) -> None:
        if len(tag) > 8:
            raise ValueError("tag must be at most 8 characters (interface names are short)")
        self.tag = tag
        self.netns = f"{tag}-node"
        self.node_ipv4 = ipaddress.IPv4Address(node_ipv4)
        self.node_ipv6 = ipaddress.IPv6Address(node_ipv6)
        self._v4 = ipaddress.IPv4Network(pod_net_v4).hosts()
        self._v6 = ipaddress.IPv6Network(pod_net_v6).hosts()
        self._seq = itertools.count(1)
        self.pods: dict[str, SimPod] = {}
        self.started = False

    async def start(self) -> None:
        await netns.arun(f"ip netns add {self.netns}")
        self.started = True
        await netns.arun(
            f"""
            sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
            sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
            ip link set lo up
            ip addr add {self.node_ipv4}/32 dev lo
            ip -6 addr add {self.node_ipv6}/128 dev lo
            """,
            netns=self.netns,
        )

    async def add_pod(self, name: str, *, labels: dict[str, str] | None = None) -> SimPod:
        if name in self.pods:
            raise ValueError(f"pod {name} exists")
        seq = next(self._seq)
        pod = SimPod(
            name=name,
            netns=f"{self.tag}-p{seq}",
            host_veth=f"{self.tag}h{seq}",
            ipv4=next(self._v4),
            ipv6=next(self._v6),
            labels=dict(labels or {}),
        )
        if len(pod.host_veth) > 15:
            raise ValueError(f"interface name {pod.host_veth} too long")
        mac = "02:" + ":".join(f"{b:02x}" for b in seq.to_bytes(4, "big")) + ":01"
        await netns.arun(f"ip netns add {pod.netns}")
        self.pods[name] = pod
        await netns.arun(
            "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0",
            netns=pod.netns,
        )
        out = await netns.arun(
            f"""
            ip link add {pod.host_veth} address {mac} type veth peer name eth0 netns {pod.netns}
            ip link set {pod.host_veth} up
            ip -6 addr add {GATEWAY_V6}/64 dev {pod.host_veth} nodad
            ip route add {pod.ipv4}/32 dev {pod.host_veth} scope link
            ip -6 route add {pod.ipv6}/128 dev {pod.host_veth}
            cat /sys/class/net/{pod.host_veth}/ifindex
            """,
            netns=self.netns,
        )
        pod.ifindex = int(out.split()[-1])
        await netns.arun(
            f"""
            ip link set lo up
            ip link set eth0 up
            ip addr add {pod.ipv4}/32 dev eth0
            ip -6 addr add {pod.ipv6}/128 dev eth0 nodad
            ip route add {GATEWAY_V4} dev eth0 scope link
            ip route add default via {GATEWAY_V4} dev eth0
            ip neigh replace {GATEWAY_V4} lladdr {mac} dev eth0 nud permanent
            ip -6 route add default via {GATEWAY_V6} dev eth0
            """,
            netns=pod.netns,
        )
        return pod

    async def remove_pod(self, name: str) -> None:
        pod = self.pods.pop(name)
        netns.delete(pod.netns)  # deleting the namespace deletes the veth pair

    async def close(self) -> None:
        for name in list(self.pods):
            await self.remove_pod(name)
        if self.started:
            netns.delete(self.netns)
            self.started = False


def unique_tag(prefix: str = "npt") -> str:
    return f"{prefix}{os.getpid() % 1000:03d}{os.urandom(1).hex()}"[:8]
