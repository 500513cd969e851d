"""The node's network as the enforcer needs it, kept current from netlink events.

- pod interfaces: veth links whose name has one of the configured prefixes (host-side
  veths). Other kinds are never pod interfaces, whatever their name: with security
  groups for pods the VPC CNI names the branch ENI's VLAN link ``vlan.eth.<id>``, which
  the ``vlan`` prefix of branch-ENI pod veths would otherwise match;
- host routes: a pod IP's /32 or /128 route names the pod's interface (VPC CNI, kindnet,
  ptp, Calico all route pod IPs this way). Routes are read from the main table and from
  every table a policy routing rule looks up: branch-ENI pods (security groups for pods,
  strict) are routed only in their VLAN's table (``ip rule iif vlan.eth.N lookup N+100``).
  A route lookup is the fallback;
- CNI names: the VPC CNI names a pod's host veth by its namespace and name (see
  :func:`cni_veth_name`), so the interfaces of a pod it announces (EnforceNpToPod) are
  found before the pod has an address;
- node addresses: global addresses on non-pod interfaces; traffic between a pod and its
  node always passes, and they tell which PolicyEndpoints concern this node.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import ipaddress
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from common.netlink import (
    RT_TABLE_MAIN,
    Addr,
    Link,
    NetEvent,
    Netlink,
    NetlinkOpError,
    Route,
    Rule,
)

log = structlog.get_logger("agent.hostnet")

_SCOPE_UNIVERSE = 0
# interfaces of a pod the VPC CNI names (one per network card; EC2 instances have at most
# a few dozen cards, far fewer are used for pods)
MAX_POD_INTERFACES = 16
POD_LINK_KINDS = ("veth",)
IFNAME_MAX = 15  # IFNAMSIZ - 1: longer names cannot exist


def cni_veth_name(prefix: str, namespace: str, name: str, index: int = 0) -> str:
    """The host veth name the VPC CNI gives interface ``index`` of a pod: the prefix and
    the first 11 hex digits of SHA-1 over "<namespace>.<name>" (".<index>" appended to
    the name for interfaces after the first)."""
    pod = f"{name}.{index}" if index > 0 else name
    return prefix + hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()[:11]


@dataclass
class HostNet:
    prefixes: tuple[str, ...]
    netns: str | None = None
    links: dict[int, Link] = field(default_factory=dict)
    by_name: dict[str, int] = field(default_factory=dict)
    # (table, pod IP) -> ifindex, for host routes in any table
    routes: dict[tuple[int, str], int] = field(default_factory=dict)
    # (family, table) -> rules of that family looking it up
    rule_tables: Counter[tuple[int, int]] = field(default_factory=Counter)
    addresses: dict[tuple[int, str], int] = field(default_factory=dict)  # (ifindex, ip) -> scope
    extra_addresses: frozenset[str] = frozenset()  # the node's, as ipamd reports them
    on_change: Callable[[NetEvent], None] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    _node: frozenset[str] | None = field(default=None, repr=False)

    def is_pod_interface(self, link: Link) -> bool:
        return link.kind in POD_LINK_KINDS and any(link.name.startswith(p) for p in self.prefixes)

    def pod_interfaces(self) -> dict[int, Link]:
        return {i: ln for i, ln in self.links.items() if self.is_pod_interface(ln)}

    def node_addresses(self) -> set[str]:
        """Kept until a link or address changes: the cache asks for every policy it
        settles (hundreds when a pod arrives)."""
        if self._node is None:
            pods = self.pod_interfaces()
            self._node = frozenset(
                {
                    ip
                    for (idx, ip), scope in self.addresses.items()
                    if scope == _SCOPE_UNIVERSE and idx not in pods
                }
                | self.extra_addresses
            )
        return set(self._node)

    def routed_interfaces(self, ip: str) -> set[int]:
        """Pod interfaces a host route for ``ip`` names, in the main table or in any
        table a rule looks up."""
        family = socket.AF_INET if ipaddress.ip_address(ip).version == 4 else socket.AF_INET6
        tables = {RT_TABLE_MAIN} | {t for (f, t), n in self.rule_tables.items() if f == family}
        out = set()
        for table in tables:
            link = self.links.get(self.routes.get((table, ip), -1))
            if link is not None and self.is_pod_interface(link):
                out.add(link.index)
        return out

    async def interfaces_of(self, nl: Netlink, ip: str) -> set[int]:
        """The pod interfaces ``ip`` is routed over (empty if none, or not yet)."""
        found = self.routed_interfaces(ip)
        if found:
            return found
        ifindex = await nl.route_get(ip)
        if ifindex is None or ifindex not in self.links:
            return set()
        return {ifindex} if self.is_pod_interface(self.links[ifindex]) else set()

    def named_interfaces(self, namespace: str, name: str, count: int = 0) -> list[int]:
        """The pod interfaces named after the pod as the VPC CNI names them, by index;
        ``count`` 0: as many as exist (from the first, stopping at a gap)."""
        out: list[int] = []
        for index in range(count or MAX_POD_INTERFACES):
            found = None
            for prefix in self.prefixes:
                ifindex = self.by_name.get(cni_veth_name(prefix, namespace, name, index))
                if ifindex is not None and self.is_pod_interface(self.links[ifindex]):
                    found = ifindex
                    break
            if found is None:
                if count:
                    continue
                break
            out.append(found)
        return out

    # ---- state ------------------------------------------------------------------------
    def _apply_link(self, link: Link, added: bool) -> None:
        self._node = None
        old = self.links.get(link.index)
        if old is not None and self.by_name.get(old.name) == link.index:
            del self.by_name[old.name]
        if added:
            self.links[link.index] = link
            self.by_name[link.name] = link.index
        else:
            self.links.pop(link.index, None)
            for key in [k for k, idx in self.routes.items() if idx == link.index]:
                del self.routes[key]

    def _apply_addr(self, addr: Addr, added: bool) -> None:
        self._node = None
        key = (addr.index, addr.address)
        if added:
            self.addresses[key] = addr.scope
        else:
            self.addresses.pop(key, None)

    def _apply_route(self, route: Route, added: bool) -> None:
        width = 32 if route.family == socket.AF_INET else 128
        if route.dst_len != width or not route.dst:
            return
        key = (route.table, str(ipaddress.ip_address(route.dst)))
        if added and route.oif:
            self.routes[key] = route.oif
        elif not added and self.routes.get(key) == route.oif:
            del self.routes[key]

    def _apply_rule(self, rule: Rule, added: bool) -> None:
        key = (rule.family, rule.table)
        if added:
            self.rule_tables[key] += 1
        elif self.rule_tables[key] > 1:
            self.rule_tables[key] -= 1
        else:
            self.rule_tables.pop(key, None)

    def _apply(self, ev: NetEvent) -> None:
        if ev.link is not None:
            self._apply_link(ev.link, ev.added)
        elif ev.addr is not None:
            self._apply_addr(ev.addr, ev.added)
        elif ev.route is not None:
            self._apply_route(ev.route, ev.added)
        elif ev.rule is not None:
            self._apply_rule(ev.rule, ev.added)

    async def load(self, nl: Netlink) -> None:
        """Read the node's links, addresses, rules and routes and apply them."""
        self._install(await self._read(nl))

    async def reload(self, nl: Netlink) -> None:
        """Read everything again in place of what is known (after announcements were
        lost), and announce the difference: links gone as removed, then all that was
        read as added (whoever listens looks again at what depends on them). What is
        known is replaced only once all is read: nothing sees it half loaded."""
        fresh = await self._read(nl)
        before = dict(self.links)
        self.links.clear()
        self.by_name.clear()
        self.routes.clear()
        self.rule_tables.clear()
        self.addresses.clear()
        self._install(fresh)
        if self.on_change is None:
            return
        for index, link in before.items():
            if index not in self.links:
                self.on_change(NetEvent("link", False, link=link))
        for ev in fresh:
            self.on_change(ev)

    @staticmethod
    async def _read(nl: Netlink) -> list[NetEvent]:
        """The four lists, asked at once (each on a socket of its own), as events."""
        links, addrs, rules, routes = await asyncio.gather(
            nl.links(), nl.addresses(), nl.rules(), nl.routes()
        )
        return [
            *(NetEvent("link", True, link=x) for x in links),
            *(NetEvent("addr", True, addr=x) for x in addrs),
            *(NetEvent("rule", True, rule=x) for x in rules),
            *(NetEvent("route", True, route=x) for x in routes),
        ]

    def _install(self, fresh: list[NetEvent]) -> None:
        for ev in fresh:
            self._apply(ev)
        self._node = None
        self.ready.set()
        log.info(
            "hostnet.loaded",
            pod_interfaces=len(self.pod_interfaces()),
            node_addresses=sorted(self.node_addresses()),
            rule_tables=sorted({t for _, t in self.rule_tables}),
        )

    async def find_named(self, nl: Netlink, namespace: str, name: str, count: int) -> list[int]:
        """:meth:`named_interfaces` for a pod the CNI has just wired (``count``
        interfaces): names not seen yet are asked of the kernel, since the netlink event
        of a link created a moment ago may still be queued; found links are applied as
        if their event had arrived."""
        for index in range(count):
            names = [
                n
                for p in self.prefixes
                if len(n := cni_veth_name(p, namespace, name, index)) <= IFNAME_MAX
            ]
            if any(n in self.by_name for n in names):
                continue
            for n in names:
                link = await nl.link_by_name(n)
                if link is not None:
                    self._apply_link(link, True)
                    if self.on_change is not None:
                        self.on_change(NetEvent("link", True, link=link))
                    break
        return self.named_interfaces(namespace, name, count)

    async def run(self) -> None:
        """Subscribe, load the current state, then apply changes forever. Subscribing
        first means nothing that changes during the initial dump is missed. Should the
        kernel drop announcements (the subscription's queue overran while the loop was
        busy), the state is read again and the difference announced: a change missed
        is never missed for good."""
        loaded = False
        while True:
            try:
                async with Netlink(netns=self.netns) as sub:
                    await sub.subscribe()
                    async with Netlink(netns=self.netns) as nl:
                        if loaded:
                            await self.reload(nl)
                        else:
                            await self.load(nl)
                    loaded = True
                    async for ev in sub.events():
                        self._apply(ev)
                        if self.on_change is not None:
                            self.on_change(ev)
            except NetlinkOpError as exc:
                if exc.errno != errno.ENOBUFS or not loaded:
                    raise
                log.warning(
                    "hostnet.changes_lost",
                    error=str(exc),
                    effect="the node's links, addresses, rules and routes are read again",
                )
