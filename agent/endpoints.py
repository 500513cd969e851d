"""PolicyEndpoints as the agent keeps them: validated once, then compact.

Rules are stored with integer prefixes and interned port ranges (a node may hold many
thousands of CIDRs); the policy id each rule carries in the datapath is filled in when a
pod's rules are compiled.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bpf import layout as lay
from bpf.ruleset import PeerRule, PortRange, Prefix
from common.policyendpoint import TRIGGER_ANNOTATION, EndpointInfo, Port, parse

PodRef = tuple[str, str]  # (namespace, name)
_PROTOCOLS = {"TCP": lay.NP_PROTO_TCP, "UDP": lay.NP_PROTO_UDP, "SCTP": lay.NP_PROTO_SCTP}


@dataclass(frozen=True, slots=True)
class Endpoints:
    namespace: str
    name: str
    uid: str
    generation: int
    policy: PodRef                  # the NetworkPolicy (namespace, name)
    trigger_time: float | None      # epoch seconds of the change that produced it
    isolate_ingress: bool
    isolate_egress: bool
    pods: frozenset[PodRef]         # selected pods
    host_ips: frozenset[str]        # nodes of the selected pods
    ingress: tuple[PeerRule, ...]   # policy_id 0: set at compile time
    egress: tuple[PeerRule, ...]

    @property
    def key(self) -> PodRef:
        return (self.namespace, self.name)


@functools.lru_cache(maxsize=4096)
def _port_range(protocol: int, start: int, end: int) -> PortRange:
    return PortRange(protocol, start, end)


@functools.lru_cache(maxsize=65536)
def _prefix(cidr: str) -> Prefix:
    from common.policyendpoint import parse_cidr

    return Prefix.of(parse_cidr(cidr))


def _ports(ports: list[Port] | None) -> tuple[PortRange, ...]:
    if not ports:
        return ()
    out = []
    for p in ports:
        proto = _PROTOCOLS[p.protocol]
        if p.port is None:
            out.append(_port_range(proto, 0, 65535))
        else:
            out.append(_port_range(proto, p.port, p.end_port or p.port))
    return tuple(out)


def _rules(entries: list[EndpointInfo]) -> tuple[PeerRule, ...]:
    return tuple(
        PeerRule(_prefix(e.cidr), tuple(_prefix(x) for x in e.except_), _ports(e.ports))
        for e in entries
        if e.cidr  # FQDN (domainName) rules are not enforced on this path
    )


def _trigger_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def from_api(obj: dict[str, Any]) -> Endpoints:
    """Validate and compact; raises common.policyendpoint.PolicyEndpointError."""
    pe = parse(obj)
    spec, meta = pe.spec, pe.metadata
    return Endpoints(
        namespace=meta.namespace,
        name=meta.name,
        uid=meta.uid,
        generation=meta.generation,
        policy=(spec.policy_ref.namespace or meta.namespace, spec.policy_ref.name),
        trigger_time=_trigger_time(meta.annotations.get(TRIGGER_ANNOTATION)),
        isolate_ingress="Ingress" in spec.pod_isolation or bool(spec.ingress),
        isolate_egress="Egress" in spec.pod_isolation or bool(spec.egress),
        pods=frozenset((e.namespace, e.name) for e in spec.pod_selector_endpoints),
        host_ips=frozenset(e.host_ip for e in spec.pod_selector_endpoints if e.host_ip),
        ingress=_rules(spec.ingress),
        egress=_rules(spec.egress),
    )
