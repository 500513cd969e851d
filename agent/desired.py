"""What a pod's enforcement must be, from its PolicyEndpoints and the enforcing mode (pure).

- No policy selects the pod: the mode's default in both directions (standard:
  allow, strict: deny), as the reference agent does.
- Otherwise, per direction: isolated if some PolicyEndpoint lists it in podIsolation or
  has rules for it; an isolated direction enforces the union of every such rule (no
  rules: deny all); a direction no policy isolates allows everything.
The node's own addresses are allowed by the datapath in every state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from agent.endpoints import Endpoints, PodRef
from bpf import layout as lay
from bpf.datapath import ALLOW_ALL, DENY_ALL, DirectionPolicy
from bpf.ruleset import PeerRule, compile_rules

PolicyIds = Callable[[PodRef], int]


def direction(
    endpoints: Sequence[Endpoints], *, ingress: bool, policy_id: PolicyIds, truncate: bool = False
) -> DirectionPolicy:
    isolating = [e for e in endpoints if (e.isolate_ingress if ingress else e.isolate_egress)]
    if not isolating:
        return ALLOW_ALL
    rules: list[PeerRule] = []
    for e in isolating:
        pid = policy_id(e.policy)
        rules.extend((e.ingress if ingress else e.egress).rules(pid))
    return DirectionPolicy(lay.NP_STATE_POLICIES_APPLIED, compile_rules(rules, truncate=truncate))


def pod_directions(
    endpoints: Sequence[Endpoints], *, strict: bool, policy_id: PolicyIds, truncate: bool = False
) -> tuple[DirectionPolicy, DirectionPolicy]:
    """(ingress, egress) for a pod listed by ``endpoints``. ``truncate``: a CIDR whose
    port rules exceed the datapath's limit keeps those that fit (fewer allowed ports;
    see bpf.ruleset) instead of raising RuleLimitError."""
    if not endpoints:
        default = DENY_ALL if strict else ALLOW_ALL
        return default, default
    return (
        direction(endpoints, ingress=True, policy_id=policy_id, truncate=truncate),
        direction(endpoints, ingress=False, policy_id=policy_id, truncate=truncate),
    )


def weight(endpoints: Sequence[Endpoints]) -> int:
    """About how much compiling a pod's rules costs: its port rules, counted per CIDR."""
    return sum(e.ingress.weight() + e.egress.weight() for e in endpoints)
