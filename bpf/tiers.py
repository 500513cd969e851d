"""Fold ClusterNetworkPolicy tiers and NetworkPolicy into one trie per direction (pure).

For a pod with cluster rules, a packet is decided per direction by, in order:

1. **Admin** rules whose CIDR holds the peer and whose ports admit the flow: the lowest
   priority number wins, at equal priority Deny > Accept > Pass (within one policy or
   across policies; ties beyond that go to the lowest policy id, for attribution).
   Accept allows, Deny denies, Pass (or no match) goes on;
2. **NetworkPolicy**, if one isolates the direction: its rules decide (allowed, or
   denied: no peer or no port matched);
3. **Baseline** rules, as Admin;
4. the **default** decision (the mode's, for a pod no NetworkPolicy selects).

The datapath does none of this at packet time. :func:`compile_tiers` evaluates the
order above once per stored prefix and per elementary port range, and stores the
result as an ordinary trie whose port sets carry a decision per range (allow or deny,
with tier and policy) and an ``other`` decision for every port and protocol no range
covers. The lookup then costs one LPM match and one port-set scan, whatever the number
of tiers, policies and CIDRs.

Every prefix that matters is stored: each cluster rule's CIDR, each entry of the
NetworkPolicy trie, and 0.0.0.0/0 and ::/0 (what an address in no CIDR gets). Prefixes
are nested or disjoint, so the rules that hold an address are exactly those whose CIDR
holds its longest stored prefix: one decision per prefix is exact. A prefix whose port
set equals its nearest stored ancestor's is dropped.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

from bpf.errors import RuleLimitError
from bpf.layout import (
    NP_FAMILY_IPV4,
    NP_FAMILY_IPV6,
    NP_MAX_PORT_RULES,
    NP_REASON_NO_PEER_MATCH,
    NP_REASON_NO_PORT_MATCH,
    NP_REASON_RULE,
    NP_TIER_ADMIN,
    NP_TIER_BASELINE,
    NP_TIER_NETWORK_POLICY,
    NP_VERDICT_ALLOW,
    NP_VERDICT_DENY,
)
from bpf.ruleset import (
    PORT_PROTOCOLS,
    CompiledRules,
    Decision,
    PortRange,
    PortRule,
    Portset,
    Prefix,
    nearest_kept,
)

# Rule actions, numbered as the reference ranks them at equal priority (and as its maps
# encode them: priority * 10 + action): the lowest number wins.
ACTION_DENY = 0
ACTION_ACCEPT = 1
ACTION_PASS = 2
ACTION_NAMES = {ACTION_DENY: "Deny", ACTION_ACCEPT: "Accept", ACTION_PASS: "Pass"}
ACTIONS = {name: number for number, name in ACTION_NAMES.items()}
CLUSTER_TIERS = {"Admin": NP_TIER_ADMIN, "Baseline": NP_TIER_BASELINE}

ROOTS = (Prefix(NP_FAMILY_IPV4, 0, 0), Prefix(NP_FAMILY_IPV6, 0, 0))


class ClusterRule(NamedTuple):
    """One ClusterPolicyEndpoint entry: peers in ``cidr`` on ``ports`` (empty: all
    traffic) get ``action``, at ``priority`` in ``tier`` (Admin or Baseline)."""

    cidr: Prefix
    ports: tuple[PortRange, ...]
    tier: int
    priority: int
    action: int
    policy_id: int


class NetworkPolicyAt(NamedTuple):
    """The NetworkPolicy tier at one prefix: not isolating (``isolates`` False), or
    the port set of the longest NetworkPolicy entry holding it (None: none does)."""

    isolates: bool
    portset: Portset | None


def compile_tiers(
    rules: Sequence[ClusterRule], *, networkpolicy: CompiledRules | None, default: Decision
) -> CompiledRules:
    """One direction's trie. ``networkpolicy``: the direction's NetworkPolicy trie if a
    NetworkPolicy isolates it, else None; ``default``: the decision when every tier
    passes. RuleLimitError if a prefix needs more port ranges than a port set holds."""
    by_cidr: dict[Prefix, list[ClusterRule]] = {}
    for r in rules:
        by_cidr.setdefault(r.cidr, []).append(r)
    np_entries = networkpolicy.entries if networkpolicy is not None else {}
    prefixes = set(by_cidr) | set(np_entries) | set(ROOTS)
    lengths: dict[int, list[int]] = {NP_FAMILY_IPV4: [], NP_FAMILY_IPV6: []}
    for p in prefixes:
        lengths[p.family].append(p.length)
    for fam in lengths:
        lengths[fam] = sorted(set(lengths[fam]))

    kept: dict[Prefix, Portset] = {}
    memo: dict[tuple[tuple[ClusterRule, ...], NetworkPolicyAt], Portset] = {}
    for p in sorted(prefixes):  # shorter prefixes (ancestors) first
        ancestors = [p.ancestor(n) for n in lengths[p.family] if n <= p.length]
        holding = tuple(r for a in ancestors for r in by_cidr.get(a, ()))
        if networkpolicy is None:
            np_here = NetworkPolicyAt(False, None)
        else:
            nearest_np = next((a for a in reversed(ancestors) if a in np_entries), None)
            np_here = NetworkPolicyAt(
                True, np_entries[nearest_np] if nearest_np is not None else None
            )
        key = (holding, np_here)
        portset = memo.get(key)
        if portset is None:
            portset = memo[key] = portset_at(holding, np_here, default, where=p)
        if p.length and nearest_kept(p, lengths[p.family], kept) == portset:
            continue
        kept[p] = portset
    return CompiledRules(entries=kept)


def decide(
    rules: Sequence[ClusterRule],
    *,
    isolates: bool,
    np_portset: Portset | None,
    default: Decision,
    protocol: int | None,
    port: int | None,
) -> Decision:
    """The tiers' decision for one flow, given the cluster rules holding the peer and
    the NetworkPolicy port set there. ``protocol`` None: a protocol no port rule can
    name (ICMP and the like), which only all-traffic rules match."""
    admin = _tier(rules, NP_TIER_ADMIN, protocol, port)
    if admin is not None:
        return admin
    if isolates:
        if np_portset is None:
            return Decision(NP_VERDICT_DENY, NP_TIER_NETWORK_POLICY, NP_REASON_NO_PEER_MATCH)
        if protocol is None:
            allowed_by = np_portset.any_policy
        else:
            allowed_by = np_portset.allows(protocol, port)
        if allowed_by is not None:
            return Decision(NP_VERDICT_ALLOW, NP_TIER_NETWORK_POLICY, NP_REASON_RULE, allowed_by)
        return Decision(NP_VERDICT_DENY, NP_TIER_NETWORK_POLICY, NP_REASON_NO_PORT_MATCH)
    baseline = _tier(rules, NP_TIER_BASELINE, protocol, port)
    if baseline is not None:
        return baseline
    return default


def _admits(ports: tuple[PortRange, ...], protocol: int | None, port: int | None) -> bool:
    if not ports:
        return True
    if protocol is None or port is None:
        return False
    return any(r.protocol == protocol and r.start <= port <= r.end for r in ports)


def _tier(
    rules: Sequence[ClusterRule], tier: int, protocol: int | None, port: int | None
) -> Decision | None:
    best: tuple[int, int, int] | None = None
    for r in rules:
        if r.tier != tier or not _admits(r.ports, protocol, port):
            continue
        rank = (r.priority, r.action, r.policy_id)
        if best is None or rank < best:
            best = rank
    if best is None or best[1] == ACTION_PASS:
        return None
    verdict = NP_VERDICT_ALLOW if best[1] == ACTION_ACCEPT else NP_VERDICT_DENY
    return Decision(verdict, tier, NP_REASON_RULE, best[2])


def _cuts(holding: tuple[ClusterRule, ...], nps: Portset | None, protocol: int) -> list[int]:
    """Where a decision may change along the protocol's ports (starts and ends + 1)."""
    cuts = {0, 65536}
    spans: list[tuple[int, int, int]] = [
        (p.protocol, p.start, p.end) for r in holding for p in r.ports
    ]
    if nps is not None:
        spans += [(r.protocol, r.start, r.end) for r in nps.rules]
    for proto, start, end in spans:
        if proto == protocol:
            cuts.update((start, end + 1))
    return sorted(cuts)


def portset_at(
    holding: tuple[ClusterRule, ...], np_here: NetworkPolicyAt, default: Decision, *, where: Prefix
) -> Portset:
    def at(protocol: int | None, port: int | None) -> Decision:
        return decide(
            holding,
            isolates=np_here.isolates,
            np_portset=np_here.portset,
            default=default,
            protocol=protocol,
            port=port,
        )

    other = at(None, None)
    out: list[PortRule] = []
    for protocol in PORT_PROTOCOLS:
        bounds = _cuts(holding, np_here.portset, protocol)
        pieces: list[tuple[int, int, Decision]] = []
        for start, stop in itertools.pairwise(bounds):
            d = at(protocol, start)
            if pieces and pieces[-1][2] == d:
                pieces[-1] = (pieces[-1][0], stop - 1, d)
            else:
                pieces.append((start, stop - 1, d))
        for start, end, d in pieces:
            if d == other:
                continue
            deny = d.verdict == NP_VERDICT_DENY
            out.append(PortRule(protocol, start, end, d.policy_id, deny, d.tier, d.reason))
    if len(out) > NP_MAX_PORT_RULES:
        raise RuleLimitError(
            f"{where}: {len(out)} distinct port ranges after folding the tiers, "
            f"the datapath holds at most {NP_MAX_PORT_RULES} per CIDR"
        )
    if not out and other == Decision(
        NP_VERDICT_ALLOW, NP_TIER_NETWORK_POLICY, NP_REASON_RULE, other.policy_id
    ):
        return Portset(any_policy=other.policy_id)  # what NetworkPolicy alone writes
    return Portset(rules=tuple(out), other=other)
