"""What an address a pod learned from a DNS answer opens, by its domain rules (pure).

A pod's egress may hold domain rules: an ApplicationNetworkPolicy's ``domainName``
entries (the NetworkPolicy tier: a union with the NetworkPolicies' rules) and a
ClusterNetworkPolicy's ``domainNames`` Accepts (their tier and priority). When the pod
asks the cluster DNS for a name and the answer carries addresses, each address is what
the rules whose pattern matches the *asked* name (common.dnsnames; a CNAME chain's
members do not count) allow, as if those rules named the address itself: the decision is
computed by the same folding as the pod's trie (bpf.tiers), for that one address, with
the matching rules added where they sit. It is what a new egress flow from the pod to
the address gets while the entry lives (np_learned); it never opens more than the rules
do, and a name no rule matches teaches nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from agent.endpoints import Domain
from bpf.ruleset import CompiledRules, Decision, PortRange, Portset, Prefix, normalise_ports
from bpf.tiers import ACTION_ACCEPT, ClusterRule, NetworkPolicyAt, portset_at
from common.dnsnames import matches, normal

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class NpDomain:
    """A domain rule in the NetworkPolicy tier (an ApplicationNetworkPolicy's)."""

    domain: Domain
    policy_id: int


@dataclass(frozen=True)
class ClusterDomain:
    """A ClusterNetworkPolicy ``domainNames`` Accept."""

    domain: Domain
    tier: int
    priority: int
    policy_id: int


@dataclass(frozen=True)
class EgressInputs:
    """What a pod's egress was compiled from (agent.desired), kept to decide learned
    addresses: the cluster rules, the NetworkPolicy trie if a NetworkPolicy isolates
    egress (else None), the default, and the domain rules."""

    cluster: tuple[ClusterRule, ...]
    networkpolicy: CompiledRules | None
    default: Decision
    np_domains: tuple[NpDomain, ...] = ()
    cluster_domains: tuple[ClusterDomain, ...] = ()

    @property
    def has_domains(self) -> bool:
        return bool(self.np_domains or self.cluster_domains)

    def patterns(self) -> list[str]:
        return [d.domain.pattern for d in self.np_domains] + [
            d.domain.pattern for d in self.cluster_domains
        ]


def decision_for(inputs: EgressInputs, *, name: str, address: Address) -> Portset | None:
    """What a new egress flow to ``address``, learned under ``name``, gets; None if no
    domain rule matches the name (nothing is learned)."""
    np_matching = [d for d in inputs.np_domains if matches(d.domain.pattern, name)]
    cluster_matching = [d for d in inputs.cluster_domains if matches(d.domain.pattern, name)]
    if not np_matching and not cluster_matching:
        return None
    host = Prefix.of(ipaddress.ip_network(address))
    holding = [r for r in inputs.cluster if _holds(r.cidr, host)]
    holding += [
        ClusterRule(host, d.domain.ports, d.tier, d.priority, ACTION_ACCEPT, d.policy_id)
        for d in cluster_matching
    ]
    np_at = NetworkPolicyAt(False, None)
    if inputs.networkpolicy is not None or np_matching:
        existing = _at(inputs.networkpolicy, address)
        contributions = _contributions(existing) + [
            (d.policy_id, d.domain.ports) for d in np_matching
        ]
        merged = (
            normalise_ports(contributions, where=f"{name} {address}") if contributions else None
        )
        np_at = NetworkPolicyAt(True, merged)
    return portset_at(tuple(holding), np_at, inputs.default, where=host)


def _holds(cidr: Prefix, host: Prefix) -> bool:
    return (
        cidr.family == host.family
        and cidr.length <= host.length
        and (host.ancestor(cidr.length) == cidr)
    )


def _at(trie: CompiledRules | None, address: Address) -> Portset | None:
    if trie is None:
        return None
    prefix = trie.lookup(address)
    return trie.entries[prefix] if prefix is not None else None


def _contributions(ps: Portset | None) -> list[tuple[int, tuple[PortRange, ...]]]:
    """A NetworkPolicy port set as (policy, ports) contributions again."""
    if ps is None:
        return []
    if ps.any_policy is not None:
        return [(ps.any_policy, ())]
    return [(r.policy_id, (PortRange(r.protocol, r.start, r.end),)) for r in ps.rules if not r.deny]


def final_addresses(
    asked: str, answers: Sequence[tuple[str, str, str, int]]
) -> list[tuple[Address, int]]:
    """The addresses an answer gives for the asked name, through its CNAME chain:
    ``answers`` are (owner name, type, data, ttl) in answer order; returns (address,
    ttl) of the A/AAAA records of the chain's last name (the smallest TTL along the
    chain)."""
    name, ttl = normal(asked), None
    seen = {name}
    cnames = {normal(o): (normal(d), t) for o, typ, d, t in answers if typ == "CNAME"}
    while name in cnames:
        name, t = cnames[name]
        ttl = t if ttl is None else min(ttl, t)
        if name in seen:
            return []  # a loop: nothing
        seen.add(name)
    out = []
    for owner, typ, data, t in answers:
        if typ in ("A", "AAAA") and normal(owner) == name:
            try:
                addr = ipaddress.ip_address(data)
            except ValueError:
                continue
            out.append((addr, t if ttl is None else min(ttl, t)))
    return out
