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
from bpf.ruleset import CompiledRules
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


def trie_policy_ids(trie: CompiledRules) -> set[int]:
    """Every policy id the trie's port sets carry (what the snapshot names)."""
    out: set[int] = set()
    for ps in set(trie.entries.values()):
        out |= policy_ids(ps)
    return out


def decide(req: ExplainRequest, snap: Snapshot) -> ExplainResult:
    peer = ipaddress.ip_address(req.peer)
    where = f"{req.direction} of {req.pod}"
    rec = snap.record

    def result(
        verdict: Literal["ALLOW", "DENY"], reason: str, summary: str, state: str
    ) -> ExplainResult:
        return ExplainResult(
            verdict=verdict,
            reason=reason,
            summary=summary,
            pod=req.pod,
            ifindex=snap.ifindex,
            state=state,
        )

    if rec is None:
        return result(
            "ALLOW", "unknown-pod", f"no record for interface {snap.ifindex}: packets pass", ""
        )
    state = rec.ingress_state if req.direction == "ingress" else rec.egress_state
    name = lay.STATE_NAMES.get(state, str(state))
    if snap.peer_is_host:
        return result("ALLOW", "host", f"{peer} is this node's address: always allowed", name)
    if state == lay.NP_STATE_DEFAULT_ALLOW:
        return result(
            "ALLOW", "default-allow", f"{where} is not isolated: everything is allowed", name
        )
    if state != lay.NP_STATE_POLICIES_APPLIED:
        return result("DENY", "default-deny", f"{where} is default-deny: nothing is allowed", name)
    if snap.trie is None:
        return result("DENY", "missing-trie", f"{where} points at a missing rule set", name)
    return _walk(snap.trie, req, peer, snap, state=name, where=where)


def _walk(
    trie: CompiledRules,
    req: ExplainRequest,
    peer: Address,
    snap: Snapshot,
    *,
    state: str,
    where: str,
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
        )
    ps = trie.entries[prefix]
    protocol = PROTOCOLS[req.protocol]
    port = 0 if req.protocol == "ICMP" else req.port
    policy_id = ps.allows(protocol, port)
    if policy_id is None:
        what = (
            "an except block (nothing allowed)"
            if ps.allows_nothing
            else f"{prefix}, whose rules do not allow {req.protocol} {port}"
        )
        return ExplainResult(
            verdict="DENY",
            reason="no-port-match",
            summary=f"{peer} matches {what} for the {where}",
            matched_cidr=str(prefix),
            state=state,
            pod=req.pod,
            ifindex=snap.ifindex,
        )
    policy_name = snap.policy_names.get(policy_id, "")
    if ps.any_policy is not None:
        rule = PortRuleView(protocol="ANY", start_port=0, end_port=65535, policy=policy_name)
    else:
        r = next(r for r in ps.rules if r.protocol == protocol and r.start <= port <= r.end)
        rule = PortRuleView(
            protocol=req.protocol, start_port=r.start, end_port=r.end, policy=policy_name
        )
    policy = rule.policy or f"policy #{policy_id}"
    return ExplainResult(
        verdict="ALLOW",
        reason="rule",
        matched_cidr=str(prefix),
        rule=rule,
        policy=rule.policy or None,
        summary=(
            f"{req.protocol} {port} with {peer} is allowed for the {where} by {policy}: "
            f"{prefix} {rule.protocol} {rule.start_port}-{rule.end_port}"
        ),
        state=state,
        pod=req.pod,
        ifindex=snap.ifindex,
    )
