"""np-resolver for ClusterNetworkPolicies: contents (pure) and the objects it writes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.endpoints import from_cluster_api
from common.kube import (
    CLUSTER_NETWORK_POLICIES,
    CLUSTER_POLICY_ENDPOINTS,
    NAMESPACES,
    PODS,
    SERVICES,
)
from fakekube import store as fs
from fakekube.server import FakeKube
from resolver.cluster import cluster_resolution
from resolver.layout import paired
from resolver.sync import Resolver
from resolver.validate import InvalidPolicy
from tests.unit.test_resolver import pod, resolver_on_fake_api, settled, world

W = world(
    pod("x", "a", ["10.0.0.1", "fd00::1"], {"app": "a"}, ports=[("web", 8080)]),
    pod("x", "b", ["10.0.0.2"], {"app": "b"}, ports=[("web", 9090)]),
    pod("y", "c", ["10.0.1.3"], {"app": "a"}, ports=[("web", 8080)]),
    pod("y", "done", ["10.0.1.4"], {"app": "a"}, phase="Succeeded"),
    pod("y", "nohost", ["172.31.0.1"], {"app": "a"}, host_network=True),
    namespaces={"x": {"team": "blue"}, "y": {"team": "red"}},
    services=[
        {
            "metadata": {"namespace": "y", "name": "svc"},
            "spec": {
                "clusterIP": "10.96.0.9",
                "selector": {"app": "a"},
                "ports": [{"port": 443, "targetPort": 8080, "protocol": "TCP"}],
            },
        }
    ],
)


def cnp(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": f"uid-{name}"}, "spec": spec}


def base(**spec: Any) -> dict[str, Any]:
    return {"tier": "Admin", "priority": 10, "subject": {"namespaces": {}}, **spec}


def test_subjects_peers_and_actions() -> None:
    res = cluster_resolution(
        cnp(
            "p",
            base(
                subject={
                    "pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "a"}}}
                },
                ingress=[
                    {
                        "action": "Deny",
                        # the first peer selects nothing: the second still counts (AWS drops it)
                        "from": [
                            {"namespaces": {"matchLabels": {"team": "green"}}},
                            {"namespaces": {"matchLabels": {"team": "red"}}},
                        ],
                    }
                ],
                egress=[
                    {
                        "action": "Accept",
                        "to": [{"networks": ["192.0.2.0/24"]}, {"domainNames": ["example.com"]}],
                        "ports": [{"portRange": {"protocol": "UDP", "start": 53, "end": 54}}],
                    }
                ],
            ),
        ),
        W,
    )
    (group,) = res.groups
    assert [(p["namespace"], p["name"]) for p in group.pods] == [("x", "a"), ("y", "c")]
    assert group.ingress == [{"cidr": "10.0.1.3", "action": "Deny"}]
    ports = [{"protocol": "UDP", "port": 53, "endPort": 54}]
    assert res.egress == [
        {"cidr": "192.0.2.0/24", "action": "Accept", "ports": ports},
        {"domainName": "example.com", "action": "Accept", "ports": ports},
    ]
    (spec,) = [d.spec for d in paired(res, 200)]
    assert (spec["tier"], spec["priority"], spec["policyRef"]) == ("Admin", 10, {"name": "p"})
    assert "podIsolation" not in spec
    # what the agent accepts, and how it keeps it
    kept = from_cluster_api({"metadata": {"name": "p-abcde"}, "spec": spec})
    assert kept.policy == ("", "p")
    assert kept.pods == frozenset({("x", "a"), ("y", "c")})


def test_named_ports_resolve_per_destination_pod() -> None:
    res = cluster_resolution(
        cnp(
            "named",
            base(
                subject={"namespaces": {"matchLabels": {"team": "blue"}}},
                ingress=[
                    {
                        "action": "Accept",
                        "from": [
                            {
                                "pods": {
                                    "namespaceSelector": {},
                                    "podSelector": {"matchLabels": {"app": "b"}},
                                }
                            }
                        ],
                        "ports": [{"namedPort": "web"}],
                    }
                ],
                egress=[
                    {
                        "action": "Deny",
                        "to": [{"namespaces": {}}, {"networks": ["0.0.0.0/0"]}],
                        "ports": [{"namedPort": "web"}],
                    }
                ],
            ),
        ),
        W,
    )
    # ingress: on each subject (a: 8080, b: 9090): two target groups
    groups = {tuple(p["name"] for p in g.pods): g.ingress for g in res.groups}
    assert groups == {
        ("a",): [
            {"cidr": "10.0.0.2", "action": "Accept", "ports": [{"protocol": "TCP", "port": 8080}]}
        ],
        ("b",): [
            {"cidr": "10.0.0.2", "action": "Accept", "ports": [{"protocol": "TCP", "port": 9090}]}
        ],
    }
    # egress: on each destination pod; never on a network or a Service
    assert sorted((e["cidr"], e["ports"][0]["port"]) for e in res.egress) == [
        ("10.0.0.1", 8080),
        ("10.0.0.2", 9090),
        ("10.0.1.3", 8080),
        ("fd00::1", 8080),
    ]


def test_egress_pod_peers_add_service_cluster_ips() -> None:
    res = cluster_resolution(
        cnp(
            "svc",
            base(
                egress=[
                    {
                        "action": "Accept",
                        "to": [
                            {
                                "pods": {
                                    "namespaceSelector": {},
                                    "podSelector": {"matchLabels": {"app": "a"}},
                                }
                            }
                        ],
                        "ports": [{"portNumber": {"protocol": "TCP", "port": 443}}],
                    }
                ]
            ),
        ),
        W,
    )
    assert {
        "cidr": "10.96.0.9",
        "action": "Accept",
        "ports": [{"protocol": "TCP", "port": 443}],
    } in res.egress


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (base(tier="Middle"), "spec.tier"),
        (base(priority=1001), "spec.priority"),
        (
            base(subject={"namespaces": {}, "pods": {"namespaceSelector": {}, "podSelector": {}}}),
            "spec.subject",
        ),
        (base(subject={"pods": {"podSelector": {}}}), "spec.subject.pods.namespaceSelector"),
        (
            base(ingress=[{"action": "Allow", "from": [{"namespaces": {}}]}]),
            "spec.ingress[0].action",
        ),
        (base(ingress=[{"action": "Deny", "from": []}]), "spec.ingress[0].from"),
        (base(egress=[{"action": "Deny", "to": [{"domainNames": ["a.example"]}]}]), "domainNames"),
        (
            base(
                egress=[
                    {
                        "action": "Deny",
                        "to": [{"networks": ["10.0.0.0/8"]}],
                        "ports": [{"portRange": {"start": 9, "end": 9}}],
                    }
                ]
            ),
            "portRange",
        ),
        (base(egress=[{"action": "Deny", "to": [{"networks": ["10.0.0.300/8"]}]}]), "networks[0]"),
        (
            base(egress=[{"action": "Accept", "to": [{"domainNames": ["api.*.com"]}]}]),
            "domainNames[0]",
        ),
        (base(egress=[{"action": "Accept", "to": [{"domainNames": ["*"]}]}]), "domainNames[0]"),
        (
            base(egress=[{"action": "Accept", "to": [{"domainNames": ["localhost"]}]}]),
            "domainNames[0]",
        ),
    ],
)
def test_invalid_policies_are_refused_naming_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(
        InvalidPolicy,
        match=r"clusternetworkpolicy bad: .*" + field.replace("[", r"\[").replace("]", r"\]"),
    ):
        cluster_resolution(cnp("bad", spec), W)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[FakeKube, Resolver]]:
    async with resolver_on_fake_api(
        tmp_path,
        {
            "clusternetworkpolicies": CLUSTER_NETWORK_POLICIES,
            "pods": PODS,
            "namespaces": NAMESPACES,
            "services": SERVICES,
            "clusterpolicyendpoints": CLUSTER_POLICY_ENDPOINTS,
        },
        layout="controller",
        chunk_size=1,
    ) as running:
        yield running


async def test_controller_layout_objects_owned_chunked_and_collected(
    cluster: tuple[FakeKube, Resolver],
) -> None:
    server, resolver = cluster
    st = server.store
    for ns in ("x", "y"):
        st.create(fs.NAMESPACES, None, {"metadata": {"name": ns}})
    for name, ip in (("a", "10.0.0.1"), ("b", "10.0.0.2")):
        st.create(fs.PODS, "x", pod("x", name, [ip], {"app": name}))
    policy = st.create(
        fs.CLUSTER_NETWORK_POLICIES,
        None,
        cnp(
            "guard",
            base(
                tier="Baseline",
                priority=7,
                ingress=[
                    {
                        "action": "Deny",
                        "from": [{"namespaces": {}}],
                        "ports": [{"portNumber": {"port": 22}}],
                    }
                ],
            ),
        ),
    )
    assert (
        policy["spec"]["ingress"][0]["ports"][0]["portNumber"]["protocol"] == "TCP"
    )  # CRD default
    await settled(server, resolver)
    objs, _ = st.list(fs.CLUSTER_POLICY_ENDPOINTS)
    # chunk size 1: two pods, two ingress entries -> pod-only and rule-only objects
    assert len(objs) == 2
    for o in objs:
        meta = o["metadata"]
        assert "namespace" not in meta
        assert meta["name"].startswith("guard-")
        (owner,) = meta["ownerReferences"]
        assert (owner["kind"], owner["uid"], owner["controller"]) == (
            "ClusterNetworkPolicy",
            policy["metadata"]["uid"],
            True,
        )
        assert "networking.k8s.aws/last-change-trigger-time" in meta["annotations"]
        assert (o["spec"]["tier"], o["spec"]["priority"]) == ("Baseline", 7)
        assert len(o["spec"]["podSelectorEndpoints"]) == 1
        assert len(o["spec"]["ingress"]) == 1
        from_cluster_api(o)  # the agent accepts each
    st.delete(fs.CLUSTER_NETWORK_POLICIES, "", "guard")
    await settled(server, resolver)
    assert st.list(fs.CLUSTER_POLICY_ENDPOINTS)[0] == []
