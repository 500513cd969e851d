"""Generate conformance scenarios in the spirit of cyclonus: a base policy varied one aspect
at a time (targets, peers, ports and protocols, endPort, directions, stacking, pod and
namespace label changes, create/delete, IPv6), and ClusterNetworkPolicy families (tiers x
actions x directions, priorities, peers, ports, label changes, NetworkPolicy interplay).
Expectations come from the reference evaluator; the scenarios are written in the public
format (FORMAT.md, FORMAT-cluster.md), so the same harness runs them.

    python -m tests.conformance.generator OUTDIR
"""

from __future__ import annotations

import copy
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from tests.conformance.evaluator import Evaluator
from tests.conformance.scenario import PodKey, standard_world

Obj = dict[str, Any]
PROBES_ALL = [(80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP")]
PROBES_TWO = [(80, "TCP"), (81, "UDP")]


def _address(family: int):  # type: ignore[no-untyped-def]
    import ipaddress

    index: dict[PodKey, int] = {}

    def address(key: PodKey) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        n = index.setdefault(key, len(index) + 1)
        return (
            ipaddress.IPv4Address(f"10.66.0.{n}")
            if family == 4
            else ipaddress.IPv6Address(f"fd00:66::{n:x}")
        )

    return address


def policy(
    name: str,
    ns: str,
    *,
    target: Obj | None = None,
    ingress: list[Obj] | None = None,
    egress: list[Obj] | None = None,
    types: list[str] | None = None,
) -> Obj:
    spec: Obj = {"podSelector": target if target is not None else {"matchLabels": {"pod": "a"}}}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    if types:
        spec["policyTypes"] = types
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


def _expect(matrix: dict[tuple[PodKey, PodKey], bool]) -> Obj:
    default = Counter(matrix.values()).most_common(1)[0][0]
    rules = [
        {"from": {"ns": s[0], "pod": s[1]}, "to": {"ns": d[0], "pod": d[1]}, "allow": v}
        for (s, d), v in sorted(matrix.items())
        if v != default
    ]
    return {"default": "allow" if default else "deny", "rules": rules}


def scenario(
    name: str,
    description: str,
    steps: list[list[Obj]],
    *,
    probes: list[tuple[int, str]] = PROBES_TWO,
    family: int = 4,
) -> Obj:
    ev = Evaluator.of(standard_world(family), _address(family))
    out_steps = []
    for actions in steps:
        for a in actions:
            ev.apply(copy.deepcopy(a))
        out_steps.append(
            {
                "actions": actions,
                "probes": [
                    {"port": port, "protocol": proto, "expect": _expect(ev.matrix(port, proto))}
                    for port, proto in probes
                ],
            }
        )
    doc: Obj = {"name": name, "source": f"generated: {description}"}
    if family == 6:
        doc["world"] = {"family": "ipv6"}
    doc["steps"] = out_steps
    return doc


def _peers(family: int) -> list[tuple[str, list[Obj]]]:
    everything = "0.0.0.0/0" if family == 4 else "::/0"
    return [
        ("pod-b", [{"podSelector": {"matchLabels": {"pod": "b"}}}]),
        ("all-pods-same-ns", [{"podSelector": {}}]),
        ("all-namespaces", [{"namespaceSelector": {}}]),
        ("ns-y", [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]),
        (
            "ns-y-or-z",
            [
                {
                    "namespaceSelector": {
                        "matchExpressions": [
                            {
                                "key": "kubernetes.io/metadata.name",
                                "operator": "In",
                                "values": ["y", "z"],
                            }
                        ]
                    }
                }
            ],
        ),
        (
            "ns-y-pod-c",
            [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}},
                    "podSelector": {"matchLabels": {"pod": "c"}},
                }
            ],
        ),
        (
            "pod-in-b-c",
            [
                {
                    "podSelector": {
                        "matchExpressions": [{"key": "pod", "operator": "In", "values": ["b", "c"]}]
                    }
                }
            ],
        ),
        (
            "pod-not-b",
            [
                {
                    "podSelector": {
                        "matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["b"]}]
                    }
                }
            ],
        ),
        (
            "two-peers",
            [
                {"podSelector": {"matchLabels": {"pod": "c"}}},
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "z"}}},
            ],
        ),
        ("ipblock-host", [{"ipBlock": {"cidr": "{{host x/b}}"}}]),
        ("ipblock-host-other-ns", [{"ipBlock": {"cidr": "{{host y/c}}"}}]),
        (
            "ipblock-all-except",
            [{"ipBlock": {"cidr": everything, "except": ["{{host x/b}}", "{{host z/a}}"]}}],
        ),
        (
            "ipblock-net-except",
            [{"ipBlock": {"cidr": "{{net x/b 4}}", "except": ["{{host y/a}}"]}}],
        ),
    ]


PORTS: list[tuple[str, list[Obj]]] = [
    ("tcp-80", [{"protocol": "TCP", "port": 80}]),
    ("tcp-81", [{"protocol": "TCP", "port": 81}]),
    ("udp-80", [{"protocol": "UDP", "port": 80}]),
    ("udp-any", [{"protocol": "UDP"}]),
    ("tcp-any", [{"protocol": "TCP"}]),
    ("named-80-tcp", [{"port": "serve-80-tcp"}]),
    ("named-81-udp", [{"protocol": "UDP", "port": "serve-81-udp"}]),
    ("range-80-81", [{"protocol": "TCP", "port": 80, "endPort": 81}]),
    ("range-81-81-udp", [{"protocol": "UDP", "port": 81, "endPort": 81}]),
    ("tcp-80-udp-81", [{"protocol": "TCP", "port": 80}, {"protocol": "UDP", "port": 81}]),
    ("sctp-80", [{"protocol": "SCTP", "port": 80}]),
]

TARGETS: list[tuple[str, Obj]] = [
    ("all", {}),
    ("pod-a", {"matchLabels": {"pod": "a"}}),
    ("pod-in-a-b", {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]}),
    ("pod-notin-c", {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["c"]}]}),
    ("pod-exists", {"matchExpressions": [{"key": "pod", "operator": "Exists"}]}),
    ("no-pod", {"matchExpressions": [{"key": "pod", "operator": "DoesNotExist"}]}),
]


def all_scenarios() -> list[Obj]:
    out: list[Obj] = []
    allow_b = [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]
    # targets x namespaces
    for tname, target in TARGETS:
        for ns in ("x", "y"):
            out.append(
                scenario(
                    f"gen-target-{tname}-in-{ns}",
                    f"ingress from pod b, targets {tname} in {ns}",
                    [[{"create_policy": policy("p", ns, target=target, ingress=allow_b)}]],
                )
            )
    # peers x direction x family
    for family in (4, 6):
        for pname, peers in _peers(family):
            out.append(
                scenario(
                    f"gen-peer-ingress-{pname}-v{family}",
                    f"ingress to x/a from {pname}",
                    [[{"create_policy": policy("p", "x", ingress=[{"from": peers}])}]],
                    family=family,
                )
            )
            out.append(
                scenario(
                    f"gen-peer-egress-{pname}-v{family}",
                    f"egress from x/a to {pname}",
                    [
                        [
                            {
                                "create_policy": policy(
                                    "p", "x", egress=[{"to": peers}], types=["Egress"]
                                )
                            }
                        ]
                    ],
                    family=family,
                )
            )
    # ports x direction
    for family in (4, 6):
        for portname, ports in PORTS:
            out.append(
                scenario(
                    f"gen-ports-ingress-{portname}-v{family}",
                    f"ingress to x/a on {portname}",
                    [[{"create_policy": policy("p", "x", ingress=[{"ports": ports}])}]],
                    probes=PROBES_ALL,
                    family=family,
                )
            )
            out.append(
                scenario(
                    f"gen-ports-egress-{portname}-v{family}",
                    f"egress from x/a on {portname}",
                    [
                        [
                            {
                                "create_policy": policy(
                                    "p", "x", egress=[{"ports": ports}], types=["Egress"]
                                )
                            }
                        ]
                    ],
                    probes=PROBES_ALL,
                    family=family,
                )
            )
    # the policy in another namespace (nil namespaceSelector means *that* namespace)
    for pname, peers in _peers(4):
        out.append(
            scenario(
                f"gen-peer-ingress-{pname}-policy-in-z",
                f"ingress to z/a from {pname}",
                [[{"create_policy": policy("p", "z", ingress=[{"from": peers}])}]],
            )
        )
    # ports with peers (the rule needs both)
    for portname, ports in PORTS:
        out.append(
            scenario(
                f"gen-ports-and-peer-{portname}",
                f"ingress to x/a from ns y on {portname}",
                [
                    [
                        {
                            "create_policy": policy(
                                "p", "x", ingress=[{"from": _peers(4)[3][1], "ports": ports}]
                            )
                        }
                    ]
                ],
                probes=PROBES_ALL,
            )
        )
        out.append(
            scenario(
                f"gen-egress-named-no-to-{portname}",
                f"egress from x/a, no 'to', on {portname}",
                [
                    [
                        {
                            "create_policy": policy(
                                "p", "x", egress=[{"ports": ports}], types=["Egress"], target={}
                            )
                        }
                    ]
                ],
                probes=PROBES_ALL,
            )
        )
    # stacking
    for i, (p1, p2) in enumerate(
        [
            ("tcp-80", "udp-any"),
            ("named-80-tcp", "tcp-81"),
            ("range-80-81", "sctp-80"),
            ("udp-80", "tcp-80-udp-81"),
        ]
    ):
        by_name = dict(PORTS)
        out.append(
            scenario(
                f"gen-stack-{p1}-{p2}",
                f"two policies on x/a: {p1} from y, {p2} from z",
                [
                    [
                        {
                            "create_policy": policy(
                                "p1", "x", ingress=[{"from": _peers(4)[3][1], "ports": by_name[p1]}]
                            )
                        }
                    ],
                    [
                        {
                            "create_policy": policy(
                                "p2",
                                "x",
                                ingress=[
                                    {
                                        "from": [
                                            {
                                                "namespaceSelector": {
                                                    "matchLabels": {
                                                        "kubernetes.io/metadata.name": "z"
                                                    }
                                                }
                                            }
                                        ],
                                        "ports": by_name[p2],
                                    }
                                ],
                            )
                        }
                    ],
                ],
                probes=PROBES_ALL,
            )
        )
        out.append(
            scenario(
                f"gen-stack-both-directions-{i}",
                f"ingress and egress policies on x/a ({p1})",
                [
                    [
                        {"create_policy": policy("in", "x", ingress=[{"ports": by_name[p1]}])},
                        {
                            "create_policy": policy(
                                "out", "x", egress=[{"to": _peers(4)[3][1]}], types=["Egress"]
                            )
                        },
                    ]
                ],
                probes=PROBES_ALL,
            )
        )
    # label changes
    role = [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}]
    out.append(
        scenario(
            "gen-labels-peer-gains-role",
            "peer x/c gains role=client",
            [
                [{"create_policy": policy("p", "x", ingress=role)}],
                [{"set_pod_labels": {"pod": "x/c", "labels": {"pod": "c", "role": "client"}}}],
                [{"set_pod_labels": {"pod": "x/c", "labels": {"pod": "c"}}}],
            ],
        )
    )
    out.append(
        scenario(
            "gen-labels-target-gains-label",
            "x/b becomes a target",
            [
                [
                    {
                        "create_policy": policy(
                            "p", "x", target={"matchLabels": {"locked": "yes"}}, ingress=allow_b
                        )
                    }
                ],
                [{"set_pod_labels": {"pod": "x/c", "labels": {"pod": "c", "locked": "yes"}}}],
            ],
        )
    )
    out.append(
        scenario(
            "gen-labels-target-loses-label",
            "x/a stops being a target",
            [
                [{"create_policy": policy("p", "x", ingress=[])}],
                [{"set_pod_labels": {"pod": "x/a", "labels": {"app": "a"}}}],
            ],
        )
    )
    ns_team = [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]
    for ns in ("y", "z"):
        out.append(
            scenario(
                f"gen-labels-namespace-{ns}-joins",
                f"namespace {ns} joins team",
                [
                    [{"create_policy": policy("p", "x", ingress=ns_team)}],
                    [{"set_namespace_labels": {"namespace": ns, "labels": {"team": "blue"}}}],
                    [{"set_namespace_labels": {"namespace": ns, "labels": {}}}],
                ],
            )
        )
    out.append(
        scenario(
            "gen-labels-egress-peer",
            "egress peer y/b gains role=client",
            [
                [
                    {
                        "create_policy": policy(
                            "p",
                            "x",
                            egress=[
                                {
                                    "to": [
                                        {
                                            "namespaceSelector": {},
                                            "podSelector": {"matchLabels": {"role": "client"}},
                                        }
                                    ]
                                }
                            ],
                            types=["Egress"],
                        )
                    }
                ],
                [{"set_pod_labels": {"pod": "y/b", "labels": {"pod": "b", "role": "client"}}}],
            ],
        )
    )
    # create / update / delete
    out.append(
        scenario(
            "gen-lifecycle-create-update-delete",
            "ports changed, then deleted",
            [
                [{"create_policy": policy("p", "x", ingress=[{"ports": dict(PORTS)["tcp-80"]}])}],
                [{"update_policy": policy("p", "x", ingress=[{"ports": dict(PORTS)["tcp-81"]}])}],
                [{"delete_policy": {"name": "p", "namespace": "x"}}],
            ],
            probes=PROBES_ALL,
        )
    )
    out.append(
        scenario(
            "gen-lifecycle-new-peer-pod",
            "a new pod matches the peer selector",
            [
                [{"create_policy": policy("p", "x", ingress=role)}],
                [
                    {
                        "create_pod": {
                            "ns": "y",
                            "name": "d",
                            "labels": {"pod": "d", "role": "client"},
                        }
                    }
                ],
                [{"delete_pod": {"pod": "y/d"}}],
            ],
        )
    )
    out.append(
        scenario(
            "gen-lifecycle-new-target-pod",
            "a new pod is a target",
            [
                [
                    {
                        "create_policy": policy(
                            "p", "x", target={"matchLabels": {"pod": "d"}}, ingress=allow_b
                        )
                    }
                ],
                [{"create_pod": {"ns": "x", "name": "d", "labels": {"pod": "d"}}}],
                [{"delete_pod": {"pod": "x/d"}}],
            ],
        )
    )
    out.append(
        scenario(
            "gen-lifecycle-deny-all-both",
            "deny all both ways, then allow all",
            [
                [
                    {
                        "create_policy": policy(
                            "deny",
                            "y",
                            target={},
                            ingress=[],
                            egress=[],
                            types=["Ingress", "Egress"],
                        )
                    }
                ],
                [
                    {
                        "create_policy": policy(
                            "allow",
                            "y",
                            target={},
                            ingress=[{}],
                            egress=[{}],
                            types=["Ingress", "Egress"],
                        )
                    }
                ],
            ],
        )
    )
    return out


# ---- ClusterNetworkPolicy families -------------------------------------------------------
def cnp(
    name: str,
    *,
    tier: str = "Admin",
    priority: int = 10,
    subject: Obj | None = None,
    ingress: list[Obj] | None = None,
    egress: list[Obj] | None = None,
) -> Obj:
    """A ClusterNetworkPolicy; the subject defaults to pod x/a."""
    spec: Obj = {
        "tier": tier,
        "priority": priority,
        "subject": subject or _pods_peer("x", "a"),
    }
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    return {"metadata": {"name": name}, "spec": spec}


def _ns_sel(ns: str) -> Obj:
    return {"matchLabels": {"kubernetes.io/metadata.name": ns}}


def _pods_peer(ns: str | None, pod: str) -> Obj:
    return {
        "pods": {
            "namespaceSelector": _ns_sel(ns) if ns else {},
            "podSelector": {"matchLabels": {"pod": pod}},
        }
    }


def _rule(direction: str, action: str, peers: list[Obj], ports: list[Obj] | None = None) -> Obj:
    rule: Obj = {"action": action, "from" if direction == "ingress" else "to": peers}
    if ports:
        rule["ports"] = ports
    return rule


def _cluster_policy(
    name: str, direction: str, rule: Obj, *, tier: str = "Admin", priority: int = 10
) -> Obj:
    if direction == "ingress":
        return cnp(name, tier=tier, priority=priority, ingress=[rule])
    return cnp(name, tier=tier, priority=priority, egress=[rule])


CLUSTER_PEERS: list[tuple[str, Obj]] = [
    ("ns-y", {"namespaces": _ns_sel("y")}),
    ("pods-b-anywhere", _pods_peer(None, "b")),
    ("pods-c-in-z", _pods_peer("z", "c")),
]
CLUSTER_PORTS: list[tuple[str, list[Obj]]] = [
    ("tcp-80", [{"portNumber": {"protocol": "TCP", "port": 80}}]),
    ("udp-81", [{"portNumber": {"protocol": "UDP", "port": 81}}]),
    ("range-80-81", [{"portRange": {"start": 80, "end": 81}}]),
    ("named-serve-81-tcp", [{"namedPort": "serve-81-tcp"}]),
    ("mixed", [{"portNumber": {"protocol": "UDP", "port": 80}}, {"namedPort": "serve-81-tcp"}]),
]


def _isolating() -> tuple[Obj, Obj]:
    """NetworkPolicies isolating x/a ingress and egress, allowing only pod b."""
    isolate_in = policy(
        "np-in", "x", ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]
    )
    isolate_out = policy(
        "np-out",
        "x",
        egress=[{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
        types=["Egress"],
    )
    return isolate_in, isolate_out


def _cnp_tiers() -> list[Obj]:
    out: list[Obj] = []
    isolate_in, isolate_out = _isolating()
    # tiers x actions x directions, beside a NetworkPolicy isolating that direction
    for tier in ("Admin", "Baseline"):
        for action in ("Accept", "Deny", "Pass"):
            for direction in ("ingress", "egress"):
                rule = _rule(direction, action, [{"namespaces": _ns_sel("y")}])
                steps = [
                    [{"create_cluster_policy": _cluster_policy("c", direction, rule, tier=tier)}],
                    [{"create_policy": isolate_in if direction == "ingress" else isolate_out}],
                    [{"delete_cluster_policy": {"name": "c"}}],
                ]
                out.append(
                    scenario(
                        f"gen-cnp-{tier.lower()}-{action.lower()}-{direction}",
                        f"{tier} {action} {direction} x/a <-> namespace y, then a "
                        f"NetworkPolicy isolating x/a, then the cluster policy deleted",
                        steps,
                    )
                )
    return out


def _cnp_priorities() -> list[Obj]:
    out: list[Obj] = []
    isolate_in, _ = _isolating()
    # priorities: two Admin policies on one peer, actions and priorities varied
    for first, second in (("Deny", "Accept"), ("Accept", "Pass"), ("Pass", "Deny")):
        for p1, p2 in ((5, 10), (10, 10), (10, 5)):
            steps = [
                [
                    {"create_policy": isolate_in},
                    {
                        "create_cluster_policy": _cluster_policy(
                            "one",
                            "ingress",
                            _rule("ingress", first, [_pods_peer(None, "c")]),
                            priority=p1,
                        )
                    },
                    {
                        "create_cluster_policy": _cluster_policy(
                            "two",
                            "ingress",
                            _rule("ingress", second, [_pods_peer("y", "c")]),
                            priority=p2,
                        )
                    },
                ],
                [
                    {
                        "update_cluster_policy": _cluster_policy(
                            "two",
                            "ingress",
                            _rule("ingress", second, [_pods_peer("y", "c")]),
                            priority=p1 + p2,
                        )
                    }
                ],
            ]
            out.append(
                scenario(
                    f"gen-cnp-priority-{first.lower()}{p1}-{second.lower()}{p2}",
                    f"Admin {first} at {p1} and {second} at {p2} on y/c into x/a, then the "
                    f"second moved to {p1 + p2}",
                    steps,
                )
            )
    # one policy, Accept then Deny for the same peer: Deny wins (AWS semantics)
    out.append(
        scenario(
            "gen-cnp-one-policy-accept-then-deny",
            "one Admin policy: Accept y, then Deny all namespaces "
            "(Deny > Accept at equal priority)",
            [
                [
                    {
                        "create_cluster_policy": cnp(
                            "both",
                            ingress=[
                                _rule("ingress", "Accept", [{"namespaces": _ns_sel("y")}]),
                                _rule("ingress", "Deny", [{"namespaces": {}}]),
                            ],
                        )
                    }
                ]
            ],
        )
    )
    return out


def _cnp_peers() -> list[Obj]:
    out: list[Obj] = []
    # peers x direction x tier
    for pname, peer in CLUSTER_PEERS:
        for direction in ("ingress", "egress"):
            for tier, action in (("Admin", "Deny"), ("Baseline", "Deny")):
                out.append(
                    scenario(
                        f"gen-cnp-peer-{pname}-{direction}-{tier.lower()}",
                        f"{tier} {action} {direction} for x/a with peer {pname}",
                        [
                            [
                                {
                                    "create_cluster_policy": _cluster_policy(
                                        "c", direction, _rule(direction, action, [peer]), tier=tier
                                    )
                                }
                            ]
                        ],
                    )
                )
    for family in (4, 6):
        for direction in ("ingress", "egress"):
            nets = ["{{host y/b}}", "{{host z/c}}"] if direction == "egress" else None
            if nets is None:
                continue  # networks are egress peers only
            out.append(
                scenario(
                    f"gen-cnp-networks-egress-v{family}",
                    "Admin Deny egress from every pod of x to two host networks, then "
                    "Accept at a lower number for one of them",
                    [
                        [
                            {
                                "create_cluster_policy": cnp(
                                    "nets",
                                    subject={"namespaces": _ns_sel("x")},
                                    egress=[_rule("egress", "Deny", [{"networks": nets}])],
                                )
                            }
                        ],
                        [
                            {
                                "create_cluster_policy": cnp(
                                    "let-b",
                                    priority=1,
                                    subject={"namespaces": _ns_sel("x")},
                                    egress=[
                                        _rule("egress", "Accept", [{"networks": ["{{host y/b}}"]}])
                                    ],
                                )
                            }
                        ],
                    ],
                    family=family,
                )
            )
    return out


def _cnp_ports() -> list[Obj]:
    out: list[Obj] = []
    # ports x direction
    for portname, ports in CLUSTER_PORTS:
        for direction in ("ingress", "egress"):
            out.append(
                scenario(
                    f"gen-cnp-ports-{portname}-{direction}",
                    f"Admin Deny {direction} x/a <-> namespace y on {portname}",
                    [
                        [
                            {
                                "create_cluster_policy": _cluster_policy(
                                    "c",
                                    direction,
                                    _rule(direction, "Deny", [{"namespaces": _ns_sel("y")}], ports),
                                )
                            }
                        ]
                    ],
                    probes=PROBES_ALL,
                )
            )
    return out


def _cnp_changes() -> list[Obj]:
    out: list[Obj] = []
    isolate_in, isolate_out = _isolating()
    # label changes move pods and namespaces in and out of subjects and peers
    out.append(
        scenario(
            "gen-cnp-labels-pod-and-namespace",
            "Admin Deny into pods labelled pod=a from namespaces labelled env=dev; labels move",
            [
                [
                    {
                        "create_cluster_policy": cnp(
                            "dev",
                            subject={
                                "pods": {
                                    "namespaceSelector": {},
                                    "podSelector": {"matchLabels": {"pod": "a"}},
                                }
                            },
                            ingress=[
                                _rule(
                                    "ingress",
                                    "Deny",
                                    [{"namespaces": {"matchLabels": {"env": "dev"}}}],
                                )
                            ],
                        )
                    },
                    {"set_namespace_labels": {"namespace": "y", "labels": {"env": "dev"}}},
                ],
                [{"set_pod_labels": {"pod": "z/b", "labels": {"pod": "a"}}}],
                [{"set_namespace_labels": {"namespace": "y", "labels": {}}}],
                [{"set_namespace_labels": {"namespace": "x", "labels": {"env": "dev"}}}],
            ],
        )
    )
    # NetworkPolicy interplay: an ingress-only NetworkPolicy leaves egress to Baseline
    out.append(
        scenario(
            "gen-cnp-baseline-egress-beside-ingress-only-networkpolicy",
            "Baseline Deny egress from x/a to y; an ingress-only NetworkPolicy on x/a does not "
            "lift it (upstream semantics, not AWS's)",
            [
                [
                    {
                        "create_cluster_policy": cnp(
                            "base",
                            tier="Baseline",
                            egress=[_rule("egress", "Deny", [{"namespaces": _ns_sel("y")}])],
                        )
                    }
                ],
                [{"create_policy": isolate_in}],
                [{"create_policy": isolate_out}],
            ],
        )
    )
    out.append(
        scenario(
            "gen-cnp-tier-moves",
            "an Accept from y into x/a moves Admin -> Baseline -> Admin beside a NetworkPolicy "
            "allowing only pod b",
            [
                [{"create_policy": isolate_in}],
                [
                    {
                        "create_cluster_policy": cnp(
                            "m",
                            ingress=[_rule("ingress", "Accept", [{"namespaces": _ns_sel("y")}])],
                        )
                    }
                ],
                [
                    {
                        "update_cluster_policy": cnp(
                            "m",
                            tier="Baseline",
                            ingress=[_rule("ingress", "Accept", [{"namespaces": _ns_sel("y")}])],
                        )
                    }
                ],
                [
                    {
                        "update_cluster_policy": cnp(
                            "m", ingress=[_rule("ingress", "Pass", [{"namespaces": _ns_sel("y")}])]
                        )
                    }
                ],
                [{"delete_policy": {"name": "np-in", "namespace": "x"}}],
            ],
        )
    )
    return out


def cluster_scenarios() -> list[Obj]:
    return [
        s
        for family in (_cnp_tiers(), _cnp_priorities(), _cnp_peers(), _cnp_ports(), _cnp_changes())
        for s in family
    ]


def generate(outdir: Path) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for doc in all_scenarios() + cluster_scenarios():
        path = outdir / f"{doc['name']}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        paths.append(path)
    return paths


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "generated-cases")
    print(f"{len(generate(out))} scenarios written to {out}")
