"""NetworkPolicy validation: what the API server refuses, refused naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from resolver.resolve import World, resolve
from resolver.validate import InvalidPolicy, validate_spec


def _ingress_port(port: dict[str, Any]) -> dict[str, Any]:
    return {"podSelector": {}, "ingress": [{"ports": [port]}]}


def _ingress_peer(peer: Any) -> dict[str, Any]:
    return {"podSelector": {}, "ingress": [{"from": [peer]}]}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (["junk"], "spec"),
        ({"policyTypes": ["Ingress", "Sideways"]}, "spec.policyTypes[1]"),
        ({"policyTypes": "Ingress"}, "spec.policyTypes"),
        ({"podSelector": {"matchLabels": {"app": 5}}}, "spec.podSelector.matchLabels[app]"),
        (
            {"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
            "spec.podSelector.matchExpressions[0].values",
        ),
        (
            {
                "podSelector": {
                    "matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]
                }
            },
            "spec.podSelector.matchExpressions[0].values",
        ),
        ({"ingress": {"from": []}}, "spec.ingress"),
        (_ingress_port({"protocol": True}), "spec.ingress[0].ports[0].protocol"),
        (_ingress_port({"protocol": "ICMP"}), "spec.ingress[0].ports[0].protocol"),
        (_ingress_port({"port": 0}), "spec.ingress[0].ports[0].port"),
        (_ingress_port({"port": 70000}), "spec.ingress[0].ports[0].port"),
        (_ingress_port({"port": True}), "spec.ingress[0].ports[0].port"),
        (_ingress_port({"port": "Not_A_Name"}), "spec.ingress[0].ports[0].port"),
        (_ingress_port({"port": 80, "endPort": 79}), "spec.ingress[0].ports[0].endPort"),
        (_ingress_port({"port": "http", "endPort": 90}), "spec.ingress[0].ports[0].endPort"),
        (_ingress_port({"endPort": 90}), "spec.ingress[0].ports[0].endPort"),
        (_ingress_peer({}), "spec.ingress[0].from[0]"),
        (
            _ingress_peer({"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}),
            "spec.ingress[0].from[0]",
        ),
        (_ingress_peer({"ipBlock": {"cidr": "10.0.0.1"}}), "spec.ingress[0].from[0].ipBlock.cidr"),
        (
            _ingress_peer({"ipBlock": {"cidr": "10.0.0.0/33"}}),
            "spec.ingress[0].from[0].ipBlock.cidr",
        ),
        (
            _ingress_peer({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}),
            "spec.ingress[0].from[0].ipBlock.except[0]",
        ),
        (
            _ingress_peer({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}}),
            "spec.ingress[0].from[0].ipBlock.except[0]",
        ),
        (
            _ingress_peer({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["fd00::/64"]}}),
            "spec.ingress[0].from[0].ipBlock.except[0]",
        ),
    ],
)
def test_refused_naming_the_field(spec: Any, field: str) -> None:
    with pytest.raises(InvalidPolicy) as exc:
        validate_spec(spec)
    assert str(exc.value).startswith(f"{field}: "), str(exc.value)
    # the resolver refuses it with the policy's name and the same field
    policy = {"metadata": {"namespace": "default", "name": "np"}, "spec": spec}
    with pytest.raises(InvalidPolicy) as refused:
        resolve(policy, World())
    assert str(refused.value) == f"networkpolicy default/np: {exc.value}"


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {
            "podSelector": {
                "matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["b"]}]
            },
            "policyTypes": ["Ingress", "Egress"],
            "egress": [{}],
        },
        _ingress_port({"protocol": "SCTP", "port": 80, "endPort": 80}),
        _ingress_port({"port": "http-alt"}),
        _ingress_port({"port": "8080"}),  # a quoted number, read as the number
        _ingress_peer({"ipBlock": {"cidr": "10.0.0.1/8", "except": ["10.1.0.0/16"]}}),
        _ingress_peer({"namespaceSelector": {}, "podSelector": {"matchLabels": {"a": "b"}}}),
    ],
)
def test_valid_policies_pass(spec: dict[str, Any]) -> None:
    validate_spec(spec)


def test_a_resolver_bug_is_not_reported_as_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only validation failures are InvalidPolicy: an error past validation is a bug
    in the resolver and surfaces as itself."""
    from resolver import resolve as resolve_module

    def broken(policy: Any, world: Any) -> Any:
        raise KeyError("a bug")

    monkeypatch.setattr(resolve_module, "_resolve", broken)
    policy = {"metadata": {"namespace": "default", "name": "np"}, "spec": {"podSelector": {}}}
    with pytest.raises(KeyError):
        resolve(policy, World())
