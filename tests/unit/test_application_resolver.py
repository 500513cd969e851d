"""np-resolver for ApplicationNetworkPolicies: a NetworkPolicy whose egress peers may be
domain names, resolved into PolicyEndpoints with ``domainName`` entries."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.endpoints import from_api
from common.kube import APPLICATION_NETWORK_POLICIES, NAMESPACES, PODS, POLICY_ENDPOINTS, SERVICES
from fakekube import store as fs
from fakekube.server import FakeKube
from resolver.resolve import resolution
from resolver.sync import Resolver
from resolver.validate import InvalidPolicy
from tests.unit.test_resolver import W, pod, resolver_on_fake_api, settled


def anp(spec: dict[str, Any], name: str = "p", ns: str = "x") -> dict[str, Any]:
    return {
        "kind": "ApplicationNetworkPolicy",
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}"},
        "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"], **spec},
    }


def test_domain_names_become_entries_with_the_rules_ports() -> None:
    res = resolution(
        anp(
            {
                "egress": [
                    {
                        "to": [{"domainNames": ["api.example.com", "*.s3.amazonaws.com"]}],
                        "ports": [
                            {"protocol": "TCP", "port": 443},
                            {"protocol": "UDP", "port": "dns"},
                        ],
                    },
                    {"to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}]},
                ]
            }
        ),
        W,
    )
    ports = [{"protocol": "TCP", "port": 443}, {"protocol": "UDP"}]
    assert {"domainName": "api.example.com", "ports": ports} in res.egress
    assert {"domainName": "*.s3.amazonaws.com", "ports": ports} in res.egress
    assert {"cidr": "192.0.2.0/24"} in res.egress
    assert res.types == ["Egress"]
    (group,) = res.groups
    assert sorted(p["name"] for p in group.pods) == ["a"]
    # the agent accepts the object (its domain entries are not address rules)
    spec = {
        "policyRef": {"name": "p", "namespace": "x"},
        "podIsolation": ["Egress"],
        "podSelectorEndpoints": group.pods,
        "egress": res.egress,
    }
    kept = from_api({"metadata": {"name": "p-abcde", "namespace": "x"}, "spec": spec})
    assert kept.isolate_egress


def test_a_rule_without_to_allows_every_destination() -> None:
    """The controller drops such a rule (nothing allowed); a NetworkPolicy's meaning is
    every destination, and so is ours."""
    res = resolution(anp({"egress": [{"ports": [{"protocol": "TCP", "port": 80}]}]}), W)
    assert sorted(e["cidr"] for e in res.egress) == ["0.0.0.0/0", "::/0"]


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (anp({"ingress": [{"from": [{"domainNames": ["a.example.com"]}]}]}), "ingress"),
        (
            anp(
                {
                    "egress": [
                        {
                            "to": [
                                {
                                    "domainNames": ["a.example.com"],
                                    "ipBlock": {"cidr": "10.0.0.0/8"},
                                }
                            ]
                        }
                    ]
                }
            ),
            "excludes",
        ),
        (anp({"egress": [{"to": [{"domainNames": ["a.*.example.com"]}]}]}), "domainNames"),
        (anp({"egress": [{"to": [{"domainNames": ["example"]}]}]}), "domainNames"),
        (anp({"egress": [{"to": [{"domainNames": []}]}]}), "domainNames"),
        # a NetworkPolicy has no domain names
        (
            {
                "metadata": {"name": "np", "namespace": "x"},
                "spec": {
                    "podSelector": {},
                    "egress": [{"to": [{"domainNames": ["a.example.com"]}]}],
                },
            },
            "only in ApplicationNetworkPolicy",
        ),
    ],
)
def test_invalid_policies_are_refused(policy: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidPolicy, match=field):
        resolution(policy, W)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[FakeKube, Resolver]]:
    async with resolver_on_fake_api(
        tmp_path,
        {
            "applicationnetworkpolicies": APPLICATION_NETWORK_POLICIES,
            "pods": PODS,
            "namespaces": NAMESPACES,
            "services": SERVICES,
            "policyendpoints": POLICY_ENDPOINTS,
        },
    ) as running:
        yield running


async def test_policyendpoints_owned_by_the_application_policy(
    cluster: tuple[FakeKube, Resolver],
) -> None:
    server, resolver = cluster
    st = server.store
    st.create(fs.NAMESPACES, None, {"metadata": {"name": "x"}})
    st.create(fs.PODS, "x", pod("x", "a", ["10.0.0.1"], {"app": "a"}))
    body = anp(
        {"egress": [{"to": [{"domainNames": ["api.example.com"]}], "ports": [{"port": 443}]}]}
    )
    created = st.create(fs.APPLICATION_NETWORK_POLICIES, "x", body)
    assert created["spec"]["egress"][0]["ports"][0]["protocol"] == "TCP"  # CRD default
    await settled(server, resolver)
    (pe,) = st.list(fs.POLICY_ENDPOINTS)[0]
    (owner,) = pe["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["apiVersion"], owner["uid"]) == (
        "ApplicationNetworkPolicy",
        "networking.k8s.aws/v1alpha1",
        created["metadata"]["uid"],
    )
    assert pe["spec"]["egress"] == [
        {"domainName": "api.example.com", "ports": [{"protocol": "TCP", "port": 443}]}
    ]
    st.delete(fs.APPLICATION_NETWORK_POLICIES, "x", "p")
    await settled(server, resolver)
    assert st.list(fs.POLICY_ENDPOINTS)[0] == []
