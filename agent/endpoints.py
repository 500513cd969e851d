"""PolicyEndpoints as the agent keeps them: validated once, then compact.

Rules are stored with integer prefixes and interned port ranges (a node may hold many
thousands of CIDRs); the policy id each rule carries in the datapath is filled in when a
pod's rules are compiled.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from agent.rulepack import PackedRules, pack, parse_packed, port_ranges
from bpf.ruleset import PortRange, Prefix
from bpf.tiers import ACTIONS, CLUSTER_TIERS, ClusterRule
from common import clusterpolicyendpoint as cpe
from common.echo import bounded
from common.policyendpoint import (
    GROUP_ANNOTATION,
    TRIGGER_ANNOTATION,
    PolicyEndpointError,
    Rule,
    parse_domains,
    parse_model,
)
from common.selectors import Matcher, compile_selector

PodRef = tuple[str, str]  # (namespace, name)
# The join key of a policy's objects: (namespace, policyRef.name, target group). The AWS
# controller splits one policy over several objects (pod-only, ingress-only, egress-only
# chunks); every object of one key belongs together. The group is "" except for objects
# np-resolver writes for targets whose named ports resolve differently (GROUP_ANNOTATION):
# agents that ignore the annotation join the groups, which allows the union of the groups'
# ports (what the AWS controller itself writes), never less.
PolicyKey = tuple[str, str, str]


class Domain(NamedTuple):
    """An egress rule by domain name: addresses the pod learned from its DNS answers
    under a name ``pattern`` matches may use ``ports`` (empty: everything)."""

    pattern: str
    ports: tuple[PortRange, ...]


@dataclass(frozen=True, slots=True)
class ClusterPart:
    """What a ClusterPolicyEndpoint adds: its tier and priority, and its entries by
    action (rules packed as for PolicyEndpoints)."""

    tier: int  # NP_TIER_ADMIN | NP_TIER_BASELINE
    priority: int
    ingress: tuple[tuple[int, PackedRules], ...]  # (ACTION_*, rules)
    egress: tuple[tuple[int, PackedRules], ...]
    domains: tuple[Domain, ...] = ()  # egress Accept by domain name

    def rules(self, *, ingress: bool, policy_id: int) -> Iterator[ClusterRule]:
        for action, packed in self.ingress if ingress else self.egress:
            for r in packed.rules(policy_id):
                cidr = r.cidr if isinstance(r.cidr, Prefix) else Prefix.of(r.cidr)
                yield ClusterRule(cidr, r.ports, self.tier, self.priority, action, policy_id)

    def weight(self) -> int:
        return sum(p.weight() for _, p in self.ingress + self.egress)


@dataclass(frozen=True, slots=True)
class Endpoints:
    namespace: str
    name: str
    uid: str
    generation: int
    policy: PodRef  # the NetworkPolicy (namespace, name)
    trigger_time: float | None  # epoch seconds of the change that produced it
    isolate_ingress: bool
    isolate_egress: bool
    group: str  # target group within the policy ("" nearly always)
    listed: frozenset[tuple[PodRef, str]]  # (pod, podIP) of its own namespace's entries
    pods: frozenset[PodRef]  # the pods of ``listed``
    host_ips: frozenset[str]  # nodes of the selected pods
    ingress: PackedRules  # policy_id 0: set at compile time
    egress: PackedRules
    foreign: tuple[str, ...] = ()  # "ns/name" of entries naming another namespace's pods
    # the policy's podSelector (canonical JSON; "" if absent or unusable): selects pods
    # the controller has not listed yet (see agent.cache, "Selection by labels")
    selector: str = ""
    # a ClusterPolicyEndpoint (namespace ""): its tier, priority and rules; the
    # NetworkPolicy fields above are then empty
    cluster: ClusterPart | None = None
    # egress to addresses learned under a matching domain name (an
    # ApplicationNetworkPolicy's; a cluster policy's are in ``cluster``)
    domains: tuple[Domain, ...] = ()

    @property
    def key(self) -> PodRef:
        return (self.namespace, self.name)

    @property
    def policy_key(self) -> PolicyKey:
        return (self.namespace, self.policy[1], self.group)

    def lists(self, pod: PodRef, ips: Iterable[str]) -> bool | None:
        """Whether it lists ``pod`` at one of ``ips``: True; listed under another
        address: False (a stale or forged entry); not listed: None."""
        found = False
        addresses = set(ips)
        for ref, ip in self.listed:
            if ref == pod:
                if ip in addresses:
                    return True
                found = True
        return False if found else None


def _trigger_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _address(text: str) -> str:
    return str(ipaddress.ip_address(text))  # canonical text (validated by the model)


def from_api(obj: dict[str, Any]) -> Endpoints:
    """Validate and compact; raises common.policyendpoint.PolicyEndpointError.

    Only entries of the object's own namespace can select pods: a PolicyEndpoint, like
    the NetworkPolicy it stands for, applies to its namespace's pods. Entries whose
    ``podIP`` equals their ``hostIP`` are hostNetwork pods, never enforced (as the
    reference agent skips them)."""
    pe = parse_model(obj)
    spec, meta = pe.spec, pe.metadata
    try:
        ingress = parse_packed(spec.ingress, "spec.ingress")
        egress = parse_packed(spec.egress, "spec.egress")
        domains = parse_domains(spec.egress, "spec.egress")
    except ValueError as exc:
        raise PolicyEndpointError(meta.namespace, meta.name, str(exc)) from None
    if spec.policy_ref.namespace and spec.policy_ref.namespace != meta.namespace:
        raise PolicyEndpointError(
            meta.namespace,
            meta.name,
            f"spec.policyRef.namespace: {bounded(spec.policy_ref.namespace)} is not the "
            f"object's namespace {bounded(meta.namespace)} (a policy's objects live in its "
            f"namespace)",
        )
    listed, foreign = [], []
    for e in spec.pod_selector_endpoints:
        if e.namespace != meta.namespace:
            foreign.append(f"{bounded(e.namespace)}/{bounded(e.name)}")
        elif not (e.host_ip and _address(e.host_ip) == _address(e.pod_ip)):
            listed.append(((e.namespace, e.name), _address(e.pod_ip)))
    return Endpoints(
        namespace=meta.namespace,
        name=meta.name,
        uid=meta.uid,
        generation=meta.generation,
        policy=(meta.namespace, spec.policy_ref.name),
        trigger_time=_trigger_time(meta.annotations.get(TRIGGER_ANNOTATION)),
        isolate_ingress="Ingress" in spec.pod_isolation or bool(spec.ingress),
        isolate_egress="Egress" in spec.pod_isolation or bool(spec.egress),
        group=meta.annotations.get(GROUP_ANNOTATION, ""),
        listed=frozenset(listed),
        pods=frozenset(ref for ref, _ in listed),
        host_ips=frozenset(
            _address(e.host_ip)
            for e in spec.pod_selector_endpoints
            if e.host_ip and e.namespace == meta.namespace
        ),
        ingress=ingress,
        egress=egress,
        foreign=tuple(sorted(foreign)),
        selector=_selector(spec.pod_selector),
        domains=tuple(Domain(d.pattern, port_ranges(d.ports) if d.ports else ()) for d in domains),
    )


def from_cluster_api(obj: dict[str, Any]) -> Endpoints:
    """A ClusterPolicyEndpoint as the agent keeps it (namespace "", policy
    ("", policyRef.name)); raises PolicyEndpointError. Its entries list pods of any
    namespace; host-network pods (podIP equal to hostIP) are never subjects."""
    c = cpe.parse(obj)
    listed = [((p.namespace, p.name), p.pod_ip) for p in c.pods if p.pod_ip != p.host_ip]
    return Endpoints(
        namespace="",
        name=c.name,
        uid=c.uid,
        generation=c.generation,
        policy=("", c.policy),
        trigger_time=_trigger_time(c.annotations.get(TRIGGER_ANNOTATION)),
        isolate_ingress=False,
        isolate_egress=False,
        group=c.annotations.get(GROUP_ANNOTATION, ""),
        listed=frozenset(listed),
        pods=frozenset(ref for ref, _ in listed),
        host_ips=frozenset(p.host_ip for p in c.pods if p.host_ip),
        ingress=PackedRules(),
        egress=PackedRules(),
        cluster=ClusterPart(
            tier=CLUSTER_TIERS[c.tier],
            priority=c.priority,
            ingress=_by_action(c.ingress),
            egress=_by_action(c.egress),
            domains=tuple(
                Domain(d.pattern, port_ranges(d.ports) if d.ports else ()) for d in c.domains
            ),
        ),
    )


def _by_action(entries: Iterable[cpe.ClusterEntry]) -> tuple[tuple[int, PackedRules], ...]:
    grouped: dict[int, list[Rule]] = {}
    for e in entries:
        grouped.setdefault(ACTIONS[e.action], []).append(Rule(e.cidr, (), e.ports))
    return tuple((action, pack(rules)) for action, rules in sorted(grouped.items()))


def parse_object(obj: dict[str, Any]) -> Endpoints:
    """A PolicyEndpoint or ClusterPolicyEndpoint (cluster-scoped: no namespace)."""
    meta = obj.get("metadata") or {}
    if obj.get("kind") == cpe.KIND or not meta.get("namespace"):
        return from_cluster_api(obj)
    return from_api(obj)


def _selector(selector: dict[str, Any] | None) -> str:
    """The podSelector as canonical JSON, or "" if absent or not a valid selector."""
    if selector is None:
        return ""
    text = sys.intern(json.dumps(selector, sort_keys=True, separators=(",", ":")))
    try:
        matcher(text)
    except (ValueError, TypeError, AttributeError):  # SelectorError is a ValueError
        return ""
    return text


@functools.lru_cache(maxsize=1024)
def matcher(selector: str) -> Matcher:
    """The predicate of a canonical selector (as :attr:`Endpoints.selector` holds)."""
    return compile_selector(json.loads(selector)) if selector else (lambda labels: False)
