"""The datapath's decision for one flow, walked over a snapshot of the maps.

A pure function: the worker thread reads what the walk needs (the pod's record, whether
the peer is a node address, the direction's trie with its port sets, the names of the
policies they carry) into a :class:`Snapshot`; :func:`decide` then follows the
programs' order (bpf/policy.bpf.c): node address, direction state, longest-prefix match,
port rules. Unit-tested without root.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from bpf import layout as lay
from bpf.codec import policy_ids
from bpf.ruleset import CompiledRules, Portset, Prefix
from common.apimodels import ExplainRequest, ExplainResult, PortRuleView

PROTOCOLS = {**lay.PROTOCOL_NUMBERS, "ICMP": 1}  # explain also answers for ICMP
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Snapshot:
    """What the decision reads from the maps, for one pod and direction."""

    ifindex: int
    record: lay.NpPod | None
    peer_is_host: bool
    trie: CompiledRules | None  # the direction's trie (None: missing or not applied)
    policy_names: Mapping[int, str] = field(default_factory=dict)
    # egress to an address the pod learned from a DNS answer (live np_learned entry):
    # what it decides, instead of the trie
    learned: Portset | None = None


def trie_policy_ids(trie: CompiledRules) -> set[int]:
    """Every policy id the trie's port sets carry (what the snapshot names)."""
    out: set[int] = set()
    for ps in set(trie.entries.values()):
        out |= policy_ids(ps)
    return out


def decide(
    req: ExplainRequest, snap: Snapshot, *, priorities: Mapping[str, int] | None = None
) -> ExplainResult:
    """The datapath's decision, explained. ``priorities``: the priority of each
    ClusterNetworkPolicy (by name) in force for the pod, to name it."""
    peer = ipaddress.ip_address(req.peer)
    where = f"{req.direction} of {req.pod}"
    rec = snap.record

    def result(
        verdict: Literal["ALLOW", "DENY"], reason: str, summary: str, state: str, tier: int
    ) -> ExplainResult:
        return ExplainResult(
            verdict=verdict,
            reason=reason,
            summary=summary,
            pod=req.pod,
            ifindex=snap.ifindex,
            state=state,
            tier=lay.TIER_NAMES[tier],
        )

    if rec is None:
        return result(
            "ALLOW",
            "unknown-pod",
            f"no record for interface {snap.ifindex}: packets pass",
            "",
            lay.NP_TIER_DEFAULT,
        )
    state = rec.ingress_state if req.direction == "ingress" else rec.egress_state
    name = lay.STATE_NAMES.get(state, str(state))
    if snap.peer_is_host:
        return result(
            "ALLOW",
            "host",
            f"{peer} is this node's address: always allowed (above every tier)",
            name,
            lay.NP_TIER_ADMIN,
        )
    if state == lay.NP_STATE_DEFAULT_ALLOW:
        return result(
            "ALLOW",
            "default-allow",
            f"{where} is not isolated: everything is allowed",
            name,
            lay.NP_TIER_DEFAULT,
        )
    if state != lay.NP_STATE_POLICIES_APPLIED:
        return result(
            "DENY",
            "default-deny",
            f"{where} is default-deny: nothing is allowed",
            name,
            lay.NP_TIER_DEFAULT,
        )
    if snap.learned is not None:
        host = Prefix.of(ipaddress.ip_network(peer))
        trie = CompiledRules(entries={host: snap.learned})
        return _walk(trie, req, peer, snap, state=name, where=where, priorities=priorities or {})
    if snap.trie is None:
        return result(
            "DENY",
            "missing-trie",
            f"{where} points at a missing rule set",
            name,
            lay.NP_TIER_ERROR,
        )
    return _walk(snap.trie, req, peer, snap, state=name, where=where, priorities=priorities or {})


_CLUSTER_TIERS = {lay.NP_TIER_ADMIN: "Admin", lay.NP_TIER_BASELINE: "Baseline"}


def _walk(
    trie: CompiledRules,
    req: ExplainRequest,
    peer: Address,
    snap: Snapshot,
    *,
    state: str,
    where: str,
    priorities: Mapping[str, int],
) -> ExplainResult:
    """The rule walk of the datapath over a trie's entries."""
    prefix = trie.lookup(peer)
    if prefix is None:
        return ExplainResult(
            verdict="DENY",
            reason="no-peer-match",
            summary=f"{peer} is in no CIDR allowed for the {where}",
            state=state,
            pod=req.pod,
            ifindex=snap.ifindex,
            tier=lay.TIER_NAMES[lay.NP_TIER_NETWORK_POLICY],
        )
    ps = trie.entries[prefix]
    protocol = PROTOCOLS[req.protocol]
    port = 0 if req.protocol == "ICMP" else req.port
    d = ps.decide(protocol, port)
    verdict: Literal["ALLOW", "DENY"] = "ALLOW" if d.allowed else "DENY"
    policy_name = snap.policy_names.get(d.policy_id, "") if d.policy_id else ""
    rule: PortRuleView | None = None
    if d.reason == lay.NP_REASON_RULE:
        r = ps.matching_rule(protocol, port) if ps.any_policy is None else None
        if r is not None:
            rule = PortRuleView(
                protocol=req.protocol, start_port=r.start, end_port=r.end, policy=policy_name
            )
        else:
            rule = PortRuleView(protocol="ANY", start_port=0, end_port=65535, policy=policy_name)
    out = ExplainResult(
        verdict=verdict,
        reason=lay.REASON_NAMES.get(d.reason, str(d.reason)),
        summary="",
        matched_cidr=str(prefix) if prefix.length or ps.other is None else None,
        rule=rule,
        policy=policy_name or None,
        state=state,
        pod=req.pod,
        ifindex=snap.ifindex,
        tier=lay.TIER_NAMES.get(d.tier, str(d.tier)),
    )
    flow = f"{req.protocol} {port} with {peer}"
    if d.tier in _CLUSTER_TIERS:
        out.priority = priorities.get(policy_name)
        out.action = ("Accept" if d.allowed else "Deny") if d.reason == lay.NP_REASON_RULE else None
        at = f" at priority {out.priority}" if out.priority is not None else ""
        out.summary = (
            f"{flow} is {'allowed' if d.allowed else 'denied'} for the {where} by the "
            f"{_CLUSTER_TIERS[d.tier]} tier: ClusterNetworkPolicy "
            f"{policy_name or f'#{d.policy_id}'}{at}, action {out.action}"
        )
    elif d.tier == lay.NP_TIER_DEFAULT:
        out.summary = (
            f"{flow}: every tier passed for the {where}; the default "
            f"{'allows' if d.allowed else 'denies'} it"
        )
    elif d.allowed:
        policy = policy_name or f"policy #{d.policy_id}"
        span = f"{rule.protocol} {rule.start_port}-{rule.end_port}" if rule else ""
        out.summary = f"{flow} is allowed for the {where} by {policy}: {prefix} {span}"
    elif d.reason == lay.NP_REASON_NO_PEER_MATCH:
        out.summary = f"{peer} is in no CIDR allowed for the {where}"
    else:
        what = (
            "an except block (nothing allowed)"
            if ps.allows_nothing
            else f"{prefix}, whose rules do not allow {req.protocol} {port}"
        )
        out.summary = f"{peer} matches {what} for the {where}"
    return out
