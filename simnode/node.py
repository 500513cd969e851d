"""A simulated Kubernetes node built from network namespaces.

One "node" namespace holds the host side of every pod's veth pair, the node's own
addresses (on its loopback: some kernels lack the dummy driver) and IP forwarding.
Each pod is its own namespace with ``eth0``, a /32 and a /128 address, and a default
route via the host veth (VPC-CNI style: gateway 169.254.1.1 with a static neighbour
entry, and fe80::1 for IPv6), so pods reach each other through their host veths, where
the policy programs sit.

With ``cni_socket`` set the node wires pods as the VPC CNI does: host veths named after
the pod (``eni`` + SHA-1 of namespace and name, see agent.hostnet.cni_veth_name), and
``EnforceNpToPod`` called over the agent's socket once the pod is wired and before
:meth:`SimNode.add_pod` returns (so before the pod's first packet); a refusal fails the
pod's creation, as it fails the CNI's ADD. :meth:`SimNode.remove_pod` calls
``DeletePodNp``. Two EKS shapes are available: a pod with several network cards (one
host veth and address each) and a branch-ENI pod (security groups for pods, strict):
its veth is ``vlan``-named and routed only in a table of its own, chosen by rules, next
to a stand-in for the branch ENI's VLAN link (``vlan.eth.<id>``; a macvlan, since test
kernels may lack 802.1Q).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent.cni.service import NpClient
from agent.hostnet import cni_veth_name
from simnode import netns

GATEWAY_V4 = "169.254.1.1"
GATEWAY_V6 = "fe80::1"


class CniRefusedError(RuntimeError):
    """The agent did not answer EnforceNpToPod with Success: the pod is not created."""


@dataclass
class SimPod:
    name: str
    netns: str
    host_veth: str
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address
    ifindex: int = 0  # of the host veth, inside the node namespace
    labels: dict[str, str] = field(default_factory=dict)
    namespace: str = "default"
    # further network cards (the CNI's InterfaceCount - 1): (host veth, ifindex, IPv4)
    extra: list[tuple[str, int, ipaddress.IPv4Address]] = field(default_factory=list)
    table: int = 0  # branch-ENI pods: the routing table of their VLAN
    vlan_link: tuple[str, int] = ("", 0)  # branch-ENI pods: their VLAN link (name, ifindex)

    @property
    def ifindexes(self) -> list[int]:
        return [self.ifindex, *(i for _, i, _ in self.extra)]

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
        cni_socket: str | None = None,
        mode: str = "standard",
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
        self.cni_socket = cni_socket
        self.mode = mode  # what the CNI sends as NETWORK_POLICY_MODE
        self.cni_prefix = "eni"
        self.call_cni = True  # False: CNI-wired pods whose call the test makes itself

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

    async def add_pod(
        self,
        name: str,
        *,
        labels: dict[str, str] | None = None,
        namespace: str = "default",
        interfaces: int = 1,
        branch_table: int = 0,
        address: tuple[ipaddress.IPv4Address, ipaddress.IPv6Address] | None = None,
        on_wired: Callable[[SimPod], Awaitable[None]] | None = None,
    ) -> SimPod:
        """A wired pod; ``interfaces`` > 1: several network cards; ``branch_table``: a
        branch-ENI pod routed in that table (CNI naming only); ``address``: from
        :meth:`reserve`; ``on_wired``: called once the pod's namespace exists, before its
        veth (what it starts there runs from the pod's first possible packet, before the
        CNI's call and before any container could)."""
        if name in self.pods:
            raise ValueError(f"pod {name} exists")
        seq = next(self._seq)
        cni = self.cni_socket is not None
        prefix = "vlan" if branch_table else self.cni_prefix
        pod = SimPod(
            name=name,
            netns=f"{self.tag}-p{seq}",
            host_veth=cni_veth_name(prefix, namespace, name) if cni else f"{self.tag}h{seq}",
            ipv4=address[0] if address else next(self._v4),
            ipv6=address[1] if address else next(self._v6),
            labels=dict(labels or {}),
            namespace=namespace,
            table=branch_table,
        )
        if len(pod.host_veth) > 15:
            raise ValueError(f"interface name {pod.host_veth} too long")
        mac = "02:" + ":".join(f"{b:02x}" for b in seq.to_bytes(4, "big")) + ":01"
        await netns.arun(f"ip netns add {pod.netns}")
        self.pods[name] = pod
        if on_wired is not None:
            await on_wired(pod)
        await netns.arun(
            "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0",
            netns=pod.netns,
        )
        table = f"table {branch_table}" if branch_table else ""
        # one script for both sides, as fast as a CNI wires a pod: the pod can send a
        # few milliseconds after its host veth appears
        p = f"ip -n {pod.netns}"
        out = await netns.arun(
            f"""
            ip link add {pod.host_veth} address {mac} type veth peer name eth0 netns {pod.netns}
            ip link set {pod.host_veth} up
            ip -6 addr add {GATEWAY_V6}/64 dev {pod.host_veth} nodad
            ip route add {pod.ipv4}/32 dev {pod.host_veth} scope link {table}
            ip -6 route add {pod.ipv6}/128 dev {pod.host_veth} {table}
            {p} link set lo up
            {p} link set eth0 up
            {p} addr add {pod.ipv4}/32 dev eth0
            {p} -6 addr add {pod.ipv6}/128 dev eth0 nodad
            {p} route add {GATEWAY_V4} dev eth0 scope link
            {p} route add default via {GATEWAY_V4} dev eth0
            {p} neigh replace {GATEWAY_V4} lladdr {mac} dev eth0 nud permanent
            {p} -6 route add default via {GATEWAY_V6} dev eth0
            cat /sys/class/net/{pod.host_veth}/ifindex
            """,
            netns=self.netns,
        )
        pod.ifindex = int(out.split()[-1])
        if branch_table:
            await self._branch_routing(pod, seq)
        for index in range(1, interfaces):
            await self._add_card(pod, index, seq)
        if self.cni_socket is not None and self.call_cni:
            await self._enforce(pod, interfaces)
        return pod

    def reserve(self) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]:
        """The addresses of a pod to be added (traffic can be aimed at it before)."""
        return next(self._v4), next(self._v6)

    async def _branch_routing(self, pod: SimPod, seq: int) -> None:
        """The VLAN's table is looked up for traffic from the pod's veth, from the VLAN
        link and (here, where other pods share the node) to the pod's addresses; it
        holds only the pod's routes (other lookups fall through to main)."""
        t, vlan = pod.table, f"vlan.eth.{seq}"
        out = await netns.arun(
            f"""
            ip link add link lo name {vlan} type macvlan 2>/dev/null \
              || ip link add {vlan} type bridge
            ip rule add iif {pod.host_veth} lookup {t} pref 10
            ip rule add iif {vlan} lookup {t} pref 10
            ip rule add to {pod.ipv4} lookup {t} pref 10
            ip -6 rule add iif {pod.host_veth} lookup {t} pref 10
            ip -6 rule add to {pod.ipv6} lookup {t} pref 10
            cat /sys/class/net/{vlan}/ifindex
            """,
            netns=self.netns,
        )
        pod.vlan_link = (vlan, int(out.split()[-1]))

    async def _add_card(self, pod: SimPod, index: int, seq: int) -> None:
        """Network card ``index`` of a multi-NIC pod: a host veth named for it, an
        address of its own, and the pod's source routing for that address."""
        host = cni_veth_name(self.cni_prefix, pod.namespace, pod.name, index)
        inner = f"eth{index}"
        ip = next(self._v4)
        mac = "02:" + ":".join(f"{b:02x}" for b in seq.to_bytes(4, "big")) + f":{index + 1:02x}"
        out = await netns.arun(
            f"""
            ip link add {host} address {mac} type veth peer name {inner} netns {pod.netns}
            ip link set {host} up
            ip route add {ip}/32 dev {host} scope link
            cat /sys/class/net/{host}/ifindex
            """,
            netns=self.netns,
        )
        await netns.arun(
            f"""
            ip link set {inner} up
            ip addr add {ip}/32 dev {inner}
            ip route add {GATEWAY_V4} dev {inner} scope link table {100 + index}
            ip route add default via {GATEWAY_V4} dev {inner} table {100 + index}
            ip rule add from {ip} lookup {100 + index}
            ip neigh replace {GATEWAY_V4} lladdr {mac} dev {inner} nud permanent
            """,
            netns=pod.netns,
        )
        pod.extra.append((host, int(out.split()[-1]), ip))

    async def _enforce(self, pod: SimPod, interfaces: int) -> None:
        assert self.cni_socket is not None
        client = NpClient(self.cni_socket)
        try:
            ok = await client.enforce(
                namespace=pod.namespace,
                name=pod.name,
                mode=self.mode,
                interfaces=interfaces,
                timeout=30,
            )
        except Exception as exc:  # grpc.aio.AioRpcError: the CNI's ADD fails
            raise CniRefusedError(f"EnforceNpToPod {pod.namespace}/{pod.name}: {exc}") from exc
        finally:
            await client.close()
        if not ok:
            raise CniRefusedError(f"EnforceNpToPod {pod.namespace}/{pod.name}: Success false")

    async def remove_pod(self, name: str) -> None:
        pod = self.pods.pop(name)
        if self.cni_socket is not None:
            client = NpClient(self.cni_socket)
            try:
                await client.delete(namespace=pod.namespace, name=pod.name, timeout=10)
            except Exception:  # the CNI logs and goes on: the sandbox is deleted anyway
                pass
            finally:
                await client.close()
        netns.delete(pod.netns)  # deleting the namespace deletes the veth pair
        if pod.table:
            await netns.arun(
                f"""
                ip rule del to {pod.ipv4} lookup {pod.table} 2>/dev/null || true
                ip -6 rule del to {pod.ipv6} lookup {pod.table} 2>/dev/null || true
                ip rule del lookup {pod.table} 2>/dev/null || true
                ip link del {pod.vlan_link[0]} 2>/dev/null || true
                """,
                netns=self.netns,
            )

    async def close(self) -> None:
        for name in list(self.pods):
            await self.remove_pod(name)
        if self.started:
            netns.delete(self.netns)
            self.started = False


def unique_tag(prefix: str = "npt") -> str:
    return f"{prefix}{os.getpid() % 1000:03d}{os.urandom(1).hex()}"[:8]
