"""Which PolicyEndpoint objects decided a verdict (pure): ``np-cli explain`` names them.

A policy's rules may be spread over many objects (the controller's chunks), so naming
the policy is not enough to find the entry that allowed or refused a flow. Given the
objects of the pod's policies and the datapath's verdict:

- allowed by a rule: the objects with an entry whose CIDR holds the peer (outside its
  excepts) and whose ports admit the flow;
- refused although the peer is in a CIDR (the ports, or an except): the objects with an
  entry whose CIDR holds the peer;
- refused with the peer in no CIDR, or with no entry at all: the objects that isolate
  the direction (their ``podIsolation`` or their entries).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from agent.endpoints import Endpoints
from bpf import layout as lay
from bpf.ruleset import PeerRule, Prefix

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _holds(net: object, peer: Address) -> bool:
    prefix = Prefix.of(net)  # type: ignore[arg-type]
    family = lay.NP_FAMILY_IPV4 if peer.version == 4 else lay.NP_FAMILY_IPV6
    if prefix.family != family:
        return False
    width = 32 if peer.version == 4 else 128
    shift = width - prefix.length
    return (int(peer) >> shift) == (prefix.value >> shift) if shift < width else True


def _admits(rule: PeerRule, protocol: int, port: int) -> bool:
    if not rule.ports:
        return True
    return any(r.protocol == protocol and r.start <= port <= r.end for r in rule.ports)


def deciding_objects(
    endpoints: Iterable[Endpoints],
    *,
    ingress: bool,
    peer: Address,
    protocol: int,
    port: int,
    allowed: bool,
) -> list[str]:
    """``namespace/name`` of the objects that decided (sorted)."""
    isolating, in_cidr, admitting = set(), set(), set()
    for e in endpoints:
        name = f"{e.namespace}/{e.name}"
        if e.isolate_ingress if ingress else e.isolate_egress:
            isolating.add(name)
        for rule in e.ingress if ingress else e.egress:
            if not _holds(rule.cidr, peer):
                continue
            in_cidr.add(name)
            if not any(_holds(x, peer) for x in rule.excepts) and _admits(rule, protocol, port):
                admitting.add(name)
    if allowed:
        return sorted(admitting)
    return sorted(in_cidr or isolating)


def deciding_cluster_objects(
    endpoints: Iterable[Endpoints],
    *,
    policy: str,
    ingress: bool,
    peer: Address,
    protocol: int,
    port: int,
) -> list[str]:
    """Names of the ClusterPolicyEndpoints of ClusterNetworkPolicy ``policy`` with an
    entry whose CIDR holds the peer and whose ports admit the flow (sorted)."""
    out = set()
    for e in endpoints:
        if e.cluster is None or e.policy[1] != policy:
            continue
        for rule in e.cluster.rules(ingress=ingress, policy_id=0):
            if _holds(rule.cidr, peer) and (
                not rule.ports
                or any(r.protocol == protocol and r.start <= port <= r.end for r in rule.ports)
            ):
                out.add(e.name)
                break
    return sorted(out)
