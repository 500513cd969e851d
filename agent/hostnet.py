"""The node's network as the enforcer needs it, kept current from netlink events.

- pod interfaces: links whose name has one of the configured prefixes (host-side veths);
- host routes: a pod IP's /32 or /128 route names the pod's interface (VPC CNI, kindnet,
  ptp, Calico all route pod IPs this way), with a route lookup as the fallback;
- node addresses: global addresses on non-pod interfaces; traffic between a pod and its
  node always passes, and they tell which PolicyEndpoints concern this node.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from common.netlink import Link, NetEvent, Netlink, Route

log = structlog.get_logger("agent.hostnet")

_SCOPE_UNIVERSE = 0


@dataclass
class HostNet:
    prefixes: tuple[str, ...]
    netns: str | None = None
    links: dict[int, Link] = field(default_factory=dict)
    host_routes: dict[str, int] = field(default_factory=dict)  # pod IP -> ifindex
    addresses: dict[tuple[int, str], int] = field(default_factory=dict)  # (ifindex, ip) -> scope
    on_change: Callable[[NetEvent], None] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def is_pod_interface(self, link: Link) -> bool:
        return any(link.name.startswith(p) for p in self.prefixes)

    def pod_interfaces(self) -> dict[int, Link]:
        return {i: ln for i, ln in self.links.items() if self.is_pod_interface(ln)}

    def node_addresses(self) -> set[str]:
        pods = self.pod_interfaces()
        return {
            ip
            for (idx, ip), scope in self.addresses.items()
            if scope == _SCOPE_UNIVERSE and idx not in pods
        }

    async def interface_of(self, nl: Netlink, ip: str) -> int | None:
        """The pod interface ``ip`` is routed over, or None if it is not (yet)."""
        ifindex = self.host_routes.get(ip)
        if ifindex is None:
            ifindex = await nl.route_get(ip)
        if ifindex is None or ifindex not in self.links:
            return None
        return ifindex if self.is_pod_interface(self.links[ifindex]) else None

    # ---- state ------------------------------------------------------------------------
    def _apply_link(self, link: Link, added: bool) -> None:
        if added:
            self.links[link.index] = link
        else:
            self.links.pop(link.index, None)
            for ip in [ip for ip, idx in self.host_routes.items() if idx == link.index]:
                del self.host_routes[ip]

    def _apply_route(self, route: Route, added: bool) -> None:
        width = 32 if route.family == socket.AF_INET else 128
        if route.dst_len != width or not route.dst:
            return
        ip = str(ipaddress.ip_address(route.dst))
        if added and route.oif:
            self.host_routes[ip] = route.oif
        elif not added and self.host_routes.get(ip) == route.oif:
            del self.host_routes[ip]

    async def load(self, nl: Netlink) -> None:
        for link in await nl.links():
            self._apply_link(link, True)
        for addr in await nl.addresses():
            self.addresses[(addr.index, addr.address)] = addr.scope
        for route in await nl.routes():
            self._apply_route(route, True)
        self.ready.set()
        log.info(
            "hostnet.loaded",
            pod_interfaces=len(self.pod_interfaces()),
            node_addresses=sorted(self.node_addresses()),
        )

    async def run(self) -> None:
        """Subscribe, load the current state, then apply changes forever. Subscribing
        first means nothing that changes during the initial dump is missed."""
        async with Netlink(netns=self.netns) as sub:
            await sub.subscribe()
            async with Netlink(netns=self.netns) as nl:
                await self.load(nl)
            async for ev in sub.events():
                if ev.link is not None:
                    self._apply_link(ev.link, ev.added)
                elif ev.addr is not None:
                    key = (ev.addr.index, ev.addr.address)
                    if ev.added:
                        self.addresses[key] = ev.addr.scope
                    else:
                        self.addresses.pop(key, None)
                elif ev.route is not None:
                    self._apply_route(ev.route, ev.added)
                if self.on_change is not None:
                    self.on_change(ev)
