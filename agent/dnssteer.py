"""Steering the DNS queries of pods with domain rules to the node-local proxy.

    table inet np_agent_dns
      set pods4, pods6      addresses of the local pods whose egress has domain rules
      chain prerouting (nat, before kube-proxy's)
        ip saddr @pods4 ip daddr <cluster DNS> udp dport 53 dnat ip to <node>:<port>
        ...                                               one rule per cluster DNS address

Only queries to the cluster DNS are steered (a pod asking another resolver teaches
nothing: its answers open nothing). The datapath has already judged the query against
the pod's egress at the veth (its destination is still the cluster DNS there), so a
domain rule never opens DNS itself. Replies come back through conntrack's reverse NAT,
from the address the pod asked. The table is removed on a clean stop, so DNS then goes
to the cluster DNS directly.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable, Sequence

import structlog

from agent.dnsproxy import Upstream
from agent.gate import GateError, _nft

log = structlog.get_logger("agent.dnssteer")

TABLE = "np_agent_dns"
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def ruleset(
    upstreams: Sequence[Upstream], node: dict[int, Address], pods: Iterable[Address]
) -> str:
    """One transaction: the table, its sets replaced with ``pods``, its rules."""
    lines = [
        f"add table inet {TABLE}",
        f"add set inet {TABLE} pods4 {{ type ipv4_addr; }}",
        f"add set inet {TABLE} pods6 {{ type ipv6_addr; }}",
        f"add chain inet {TABLE} prerouting "
        "{ type nat hook prerouting priority dstnat - 10; policy accept; }",
        f"flush chain inet {TABLE} prerouting",
        f"flush set inet {TABLE} pods4",
        f"flush set inet {TABLE} pods6",
    ]
    for up in upstreams:
        v = up.address.version
        target = node.get(v)
        if target is None:
            continue
        ip, setname = ("ip", "pods4") if v == 4 else ("ip6", "pods6")
        to = f"{target}:{up.local_port}" if v == 4 else f"[{target}]:{up.local_port}"
        lines.append(
            f"add rule inet {TABLE} prerouting {ip} saddr @{setname} {ip} daddr {up.address} "
            f"udp dport {up.port} counter dnat {ip} to {to}"
        )
    lines += _elements("add", pods)
    return "\n".join(lines) + "\n"


def _elements(verb: str, pods: Iterable[Address]) -> list[str]:
    out = []
    for v, setname in ((4, "pods4"), (6, "pods6")):
        members = sorted(str(a) for a in pods if a.version == v)
        if members:
            out.append(f"{verb} element inet {TABLE} {setname} {{ {', '.join(members)} }}")
    return out


class Steering:
    """The steering of one node (the agent's network namespace)."""

    def __init__(self, upstreams: Sequence[Upstream]) -> None:
        self.upstreams = tuple(upstreams)
        self.pods: set[Address] = set()
        self.errors = 0
        self.installed = False

    async def install(self, node: dict[int, Address], pods: Iterable[Address]) -> None:
        self.pods = set(pods)
        await _nft(ruleset(self.upstreams, node, self.pods))
        self.installed = True
        log.info("dnssteer.installed", table=TABLE, pods=len(self.pods))

    async def set_pods(self, pods: Iterable[Address]) -> None:
        """Steer exactly ``pods`` (incremental)."""
        want = set(pods)
        add, drop = want - self.pods, self.pods - want
        if not self.installed or not (add or drop):
            return
        script = _elements("add", add) + _elements("delete", drop)
        try:
            await _nft("\n".join(script) + "\n")
        except GateError as exc:
            self.errors += 1
            log.error("dnssteer.update_failed", error=str(exc))
            return
        self.pods = want

    async def remove(self) -> None:
        with contextlib.suppress(GateError):  # there was none
            await _nft(f"delete table inet {TABLE}\n")
        self.installed = False
