"""Bad input, generated (hypothesis): PolicyEndpoints and NetworkPolicies of every shape
-- invalid CIDRs, mixed families, duplicates, overlapping or outside excepts, wrong types,
huge lists. Whatever arrives, the parsers either accept it (and then the datapath can be
programmed from it) or reject it with one clear line naming the field; nothing else
escapes, so the processes never crash on it."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.desired import pod_directions
from agent.endpoints import from_api
from bpf.errors import RuleLimitError
from common.policyendpoint import PolicyEndpointError
from resolver.resolve import Pod, World, resolve
from resolver.validate import InvalidPolicy

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---- building blocks ---------------------------------------------------------------------
junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

v4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
v6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
cidr_text = st.one_of(
    st.builds(lambda a, n: f"{a}/{n}", v4, st.integers(0, 32)),
    st.builds(lambda a, n: f"{a}/{n}", v6, st.integers(0, 128)),
    v4,
    v6,  # bare pod IPs
    st.sampled_from(
        [
            "10.0.0.0/33",
            "::/129",
            "1.2.3",
            "10.0.0.0/",
            "fe80::1%eth0",
            "01.2.3.4/8",
            "10.0.0.0/-1",
            "",
            " ",
            "0.0.0.0/0",
            "::/0",
            "10.0.0.0/٣",
        ]
    ),
    st.text(max_size=12),
    junk,
)
port = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "protocol": st.sampled_from(["TCP", "UDP", "SCTP", "ICMP", "tcp", None, 6]) | junk,
            "port": st.integers(-5, 70000) | st.sampled_from(["http", "80", "", None]) | junk,
            "endPort": st.integers(-5, 70000) | st.none() | junk,
        },
    ),
    junk,
)
entry = st.one_of(
    st.fixed_dictionaries(
        {"cidr": cidr_text},
        optional={
            "except": st.lists(cidr_text, max_size=4) | junk,
            "ports": st.lists(port, max_size=5) | st.none() | junk,
            "domainName": st.text(max_size=10),
        },
    ),
    st.fixed_dictionaries({"domainName": st.text(max_size=10)}),
    junk,
)
pod_endpoint = st.one_of(
    st.fixed_dictionaries(
        {
            "podIP": v4 | v6,
            "hostIP": v4,
            "name": st.text(max_size=5),
            "namespace": st.just("default"),
        }
    ),
    junk,
)


def policyendpoint(ingress: Any, egress: Any, pods: Any, isolation: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.aws/v1alpha1",
        "kind": "PolicyEndpoint",
        "metadata": {"name": "pe-1", "namespace": "default", "generation": 3},
        "spec": {
            "policyRef": {"name": "p", "namespace": "default"},
            "podIsolation": isolation,
            "podSelectorEndpoints": pods,
            "ingress": ingress,
            "egress": egress,
        },
    }


policyendpoints = st.builds(
    policyendpoint,
    ingress=st.lists(entry, max_size=30) | junk,
    egress=st.lists(entry, max_size=30) | junk,
    pods=st.lists(pod_endpoint, max_size=4) | junk,
    isolation=st.lists(st.sampled_from(["Ingress", "Egress", "Both", ""]), max_size=3) | junk,
)


# ---- the agent's side --------------------------------------------------------------------
@SETTINGS
@given(policyendpoints)
def test_policyendpoints_are_accepted_or_rejected_with_the_field(pe: dict[str, Any]) -> None:
    rejected: PolicyEndpointError | None = None
    try:
        ep = from_api(pe)
    except PolicyEndpointError as exc:
        rejected = exc
    if rejected is not None:
        assert rejected.reason
        assert "\n" not in rejected.reason
        assert rejected.reason.split(":")[0].startswith(
            ("spec", "metadata", "apiVersion", "kind")
        ), rejected.reason
        return
    # accepted: the datapath can be programmed from it, or says precisely why not
    too_many: RuleLimitError | None = None
    try:
        ingress, egress = pod_directions([ep], strict=False, policy_id=lambda _: 1)
    except RuleLimitError as exc:
        too_many = exc
    if too_many is not None:
        assert str(too_many)
        return
    for d in (ingress, egress):
        if d.rules is not None:
            d.rules.digest()


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.integers(1, 20_000), st.booleans())
def test_huge_lists_are_handled(n: int, ipv6: bool) -> None:
    """Tens of thousands of entries (with duplicates) parse, compact and compile."""
    base = "fd00:{:x}::/64" if ipv6 else "10.{}.{}.0/24"
    cidrs = [
        base.format(i % 65536) if ipv6 else base.format(i // 256 % 256, i % 256) for i in range(n)
    ]
    ep = from_api(policyendpoint([{"cidr": c} for c in cidrs + cidrs[:10]], [], [], ["Ingress"]))
    assert len(ep.ingress) == n + min(n, 10)
    ingress, _ = pod_directions([ep], strict=False, policy_id=lambda _: 1)
    assert ingress.rules is not None
    assert len(ingress.rules.entries) == len(set(cidrs))


def test_mixed_families_and_overlapping_excepts() -> None:
    ep = from_api(
        policyendpoint(
            [
                {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16", "10.1.2.0/24", "10.1.0.0/16"]},
                {"cidr": "10.1.2.0/24", "ports": [{"protocol": "UDP", "port": 53}]},
                {"cidr": "fd00::/8", "except": ["fd00:1::/32"]},
                {"cidr": "10.0.0.1"},
                {"cidr": "10.0.0.1"},
            ],
            [],
            [],
            ["Ingress"],
        )
    )
    ingress, _ = pod_directions([ep], strict=False, policy_id=lambda _: 1)
    assert ingress.rules is not None
    for bad, field in (
        ({"cidr": "fd00::/8", "except": ["10.0.0.0/8"]}, "except"),
        ({"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}, "except"),
        ({"cidr": "10.0.0.0/8", "ports": [{"port": 10, "endPort": 5}]}, "ports"),
    ):
        with pytest.raises(PolicyEndpointError) as exc:
            from_api(policyendpoint([bad], [], [], ["Ingress"]))
        assert exc.value.reason.startswith("spec.ingress.0"), exc.value.reason
        assert field in exc.value.reason, exc.value.reason


# ---- the resolver's side -----------------------------------------------------------------
label_map = (
    st.dictionaries(
        st.sampled_from(["app", "role", "tier"]), st.sampled_from(["a", "b", "web"]), max_size=2
    )
    | junk
)
selector = (
    st.fixed_dictionaries(
        {},
        optional={
            "matchLabels": label_map,
            "matchExpressions": st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "key": st.sampled_from(["app", "role"]) | junk,
                        "operator": st.sampled_from(
                            ["In", "NotIn", "Exists", "DoesNotExist", "Bogus"]
                        )
                        | junk,
                        "values": st.lists(st.sampled_from(["a", "b"]), max_size=2) | junk,
                    },
                ),
                max_size=2,
            )
            | junk,
        },
    )
    | junk
)
peer = (
    st.fixed_dictionaries(
        {},
        optional={
            "podSelector": selector,
            "namespaceSelector": selector,
            "ipBlock": st.fixed_dictionaries(
                {"cidr": cidr_text}, optional={"except": st.lists(cidr_text, max_size=3)}
            )
            | junk,
        },
    )
    | junk
)
np_port = (
    st.fixed_dictionaries(
        {},
        optional={
            "protocol": st.sampled_from(["TCP", "UDP", "SCTP"]) | junk,
            "port": st.integers(1, 65535) | st.sampled_from(["http", "dns"]) | junk,
            "endPort": st.integers(1, 65535) | junk,
        },
    )
    | junk
)
rule = (
    st.fixed_dictionaries(
        {},
        optional={
            "from": st.lists(peer, max_size=3) | junk,
            "to": st.lists(peer, max_size=3) | junk,
            "ports": st.lists(np_port, max_size=3) | junk,
        },
    )
    | junk
)
networkpolicies = st.builds(
    lambda spec: {"metadata": {"name": "np", "namespace": "default", "uid": "u"}, "spec": spec},
    st.fixed_dictionaries(
        {},
        optional={
            "podSelector": selector,
            "policyTypes": st.lists(st.sampled_from(["Ingress", "Egress", "Sideways"]), max_size=2)
            | junk,
            "ingress": st.lists(rule, max_size=3) | junk,
            "egress": st.lists(rule, max_size=3) | junk,
        },
    )
    | junk,
)


def world() -> World:
    w = World()
    w.namespaces = {"default": {"kubernetes.io/metadata.name": "default"}}
    for i, labels in enumerate(({"app": "a"}, {"app": "b", "role": "web"}, {})):
        pod = Pod(
            namespace="default",
            name=f"p{i}",
            labels=labels,
            ips=(f"10.0.0.{i + 1}",),
            host_ip="172.31.0.1",
            ready=True,
            host_network=False,
            ports=(("http", "TCP", 80), ("dns", "UDP", 53)),
        )
        w.pods[(pod.namespace, pod.name)] = pod
    return w


@SETTINGS
@given(networkpolicies)
def test_networkpolicies_resolve_or_are_refused_by_name(policy: dict[str, Any]) -> None:
    refused: InvalidPolicy | None = None
    try:
        specs = resolve(policy, world())
    except InvalidPolicy as exc:
        refused = exc
    if refused is not None:
        assert str(refused).startswith("networkpolicy default/np: "), refused
        return
    # what the resolver writes, the agent accepts
    for i, spec in enumerate(specs):
        from_api(
            {"metadata": {"name": f"np-{i}", "namespace": "default", "generation": 1}, "spec": spec}
        )
