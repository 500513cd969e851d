"""Naming the PolicyEndpoint objects that decided a verdict (np-cli explain)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from agent.deciders import deciding_objects
from agent.endpoints import from_api
from bpf import layout as lay


def pe(name: str, *, isolation: list[str], ingress: list[dict[str, Any]] | None = None) -> Any:
    return from_api(
        {
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "policyRef": {"name": "p"},
                "podIsolation": isolation,
                "podSelectorEndpoints": [],
                "ingress": ingress or [],
            },
        }
    )


OBJECTS = [
    pe("p-pods", isolation=["Ingress"]),
    pe(
        "p-web",
        isolation=["Ingress"],
        ingress=[{"cidr": "10.0.0.0/16", "except": ["10.0.9.0/24"], "ports": [{"port": 80}]}],
    ),
    pe("p-all", isolation=["Ingress"], ingress=[{"cidr": "10.0.5.5"}]),
]


@pytest.mark.parametrize(
    ("peer", "port", "allowed", "expect"),
    [
        pytest.param("10.0.1.1", 80, True, ["default/p-web"], id="allowed by the port entry"),
        pytest.param(
            "10.0.5.5", 80, True, ["default/p-all", "default/p-web"], id="allowed by two objects"
        ),
        pytest.param("10.0.5.5", 22, True, ["default/p-all"], id="any port entry only"),
        pytest.param("10.0.1.1", 22, False, ["default/p-web"], id="cidr held, port refused"),
        pytest.param("10.0.9.9", 80, False, ["default/p-web"], id="in an except"),
        pytest.param(
            "192.0.2.1",
            80,
            False,
            ["default/p-all", "default/p-pods", "default/p-web"],
            id="in no cidr: the isolating objects",
        ),
        pytest.param(
            "fd00::1",
            80,
            False,
            ["default/p-all", "default/p-pods", "default/p-web"],
            id="other family",
        ),
    ],
)
def test_deciding_objects(peer: str, port: int, allowed: bool, expect: list[str]) -> None:
    got = deciding_objects(
        OBJECTS,
        ingress=True,
        peer=ipaddress.ip_address(peer),
        protocol=lay.NP_PROTO_TCP,
        port=port,
        allowed=allowed,
    )
    assert got == expect


def test_the_other_direction_is_decided_by_nothing_here() -> None:
    assert (
        deciding_objects(
            OBJECTS,
            ingress=False,
            peer=ipaddress.ip_address("10.0.1.1"),
            protocol=lay.NP_PROTO_TCP,
            port=80,
            allowed=False,
        )
        == []
    )
