"""What a pod's enforcement must be, from its (Cluster)PolicyEndpoints and the mode (pure).

- No policy selects the pod: the mode's default in both directions (standard:
  allow, strict: deny), as the reference agent does.
- Otherwise, per direction: isolated if some PolicyEndpoint lists it in podIsolation or
  has rules for it; an isolated direction enforces the union of every such rule (no
  rules: deny all); a direction no policy isolates allows everything.
- A direction with ClusterNetworkPolicy rules folds every tier into one trie
  (bpf.tiers): Admin, then NetworkPolicy where one isolates the direction, then
  Baseline, then the default above. A direction without cluster rules is exactly as
  before (a NetworkPolicy-only pod pays nothing for the tiers).
The node's own addresses are allowed by the datapath in every state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.domains import ClusterDomain, EgressInputs, NpDomain
from agent.endpoints import Endpoints, PodRef
from bpf import layout as lay
from bpf.datapath import ALLOW_ALL, DENY_ALL, DirectionPolicy
from bpf.ruleset import Decision, compile_grouped, compile_rules
from bpf.tiers import ClusterRule, compile_tiers

PolicyIds = Callable[[PodRef], int]

DEFAULT_ALLOW = Decision(lay.NP_VERDICT_ALLOW, lay.NP_TIER_DEFAULT, lay.NP_REASON_DEFAULT_ALLOW)
DEFAULT_DENY = Decision(lay.NP_VERDICT_DENY, lay.NP_TIER_DEFAULT, lay.NP_REASON_DEFAULT_DENY)


def direction(
    endpoints: Sequence[Endpoints], *, ingress: bool, policy_id: PolicyIds, truncate: bool = False
) -> DirectionPolicy:
    isolating = [e for e in endpoints if (e.isolate_ingress if ingress else e.isolate_egress)]
    if not isolating:
        return ALLOW_ALL
    packed = [(e.ingress if ingress else e.egress, policy_id(e.policy)) for e in isolating]
    if not any(rules.others for rules, _ in packed):  # no excepts (nearly always)
        groups = [g for rules, pid in packed for g in rules.grouped(pid)]
        compiled = compile_grouped(groups, truncate=truncate)
    else:
        compiled = compile_rules(
            [r for rules, pid in packed for r in rules.rules(pid)], truncate=truncate
        )
    return DirectionPolicy(lay.NP_STATE_POLICIES_APPLIED, compiled)


def cluster_rules(
    endpoints: Sequence[Endpoints], *, ingress: bool, policy_id: PolicyIds
) -> list[ClusterRule]:
    out: list[ClusterRule] = []
    for e in endpoints:
        if e.cluster is not None:
            out.extend(e.cluster.rules(ingress=ingress, policy_id=policy_id(e.policy)))
    return out


def pod_directions(
    endpoints: Sequence[Endpoints], *, strict: bool, policy_id: PolicyIds, truncate: bool = False
) -> tuple[DirectionPolicy, DirectionPolicy]:
    """(ingress, egress) for a pod listed by ``endpoints``. ``truncate``: a CIDR whose
    NetworkPolicy port rules exceed the datapath's limit keeps those that fit (fewer
    allowed ports; see bpf.ruleset) instead of raising RuleLimitError. Folded tiers
    are never cut (they deny too): over the limit, RuleLimitError."""
    planned = plan_pod(endpoints, strict=strict, policy_id=policy_id, truncate=truncate)
    return planned.ingress, planned.egress


@dataclass(frozen=True)
class PodPlan:
    ingress: DirectionPolicy
    egress: DirectionPolicy
    egress_inputs: EgressInputs  # what decides the addresses the pod learns (domains)


def plan_pod(
    endpoints: Sequence[Endpoints], *, strict: bool, policy_id: PolicyIds, truncate: bool = False
) -> PodPlan:
    """Both directions (see :func:`pod_directions`) and the egress inputs domain rules
    are decided from. A pod with domain rules has its egress applied (the datapath
    consults what it learned only there)."""
    networkpolicies = [e for e in endpoints if e.cluster is None]
    np_domains = tuple(NpDomain(d, policy_id(e.policy)) for e in networkpolicies for d in e.domains)
    cluster_domains = tuple(
        ClusterDomain(d, e.cluster.tier, e.cluster.priority, policy_id(e.policy))
        for e in endpoints
        if e.cluster is not None
        for d in e.cluster.domains
    )
    out: list[DirectionPolicy] = []
    inputs = EgressInputs((), None, DEFAULT_ALLOW)
    for ingress in (True, False):
        if networkpolicies:
            np_dir = direction(
                networkpolicies, ingress=ingress, policy_id=policy_id, truncate=truncate
            )
        else:
            np_dir = DENY_ALL if strict else ALLOW_ALL
        tiers = cluster_rules(endpoints, ingress=ingress, policy_id=policy_id)
        isolated = np_dir.state == lay.NP_STATE_POLICIES_APPLIED
        default = DEFAULT_DENY if np_dir.state == lay.NP_STATE_DEFAULT_DENY else DEFAULT_ALLOW
        if not ingress:
            inputs = EgressInputs(
                tuple(tiers),
                np_dir.rules if isolated else None,
                default,
                np_domains,
                cluster_domains,
            )
        if not tiers and not (not ingress and cluster_domains and not isolated):
            out.append(np_dir)
            continue
        folded = compile_tiers(
            tiers, networkpolicy=np_dir.rules if isolated else None, default=default
        )
        out.append(DirectionPolicy(lay.NP_STATE_POLICIES_APPLIED, folded))
    return PodPlan(out[0], out[1], inputs)


def weight(endpoints: Sequence[Endpoints]) -> int:
    """About how much compiling a pod's rules costs: its port rules, counted per CIDR."""
    return sum(
        e.ingress.weight() + e.egress.weight() + (e.cluster.weight() if e.cluster else 0)
        for e in endpoints
    )
