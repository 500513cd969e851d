"""The node's network as the enforcer sees it, from netlink state (synthetic here; the
privileged tests read the kernel's)."""

from __future__ import annotations

import socket

from agent.hostnet import HostNet, cni_veth_name
from common.netlink import Addr, Link, Route, Rule


def node() -> HostNet:
    h = HostNet(prefixes=("eni", "vlan"), extra_addresses=frozenset({"10.0.0.99"}))
    h._apply_link(Link(1, "eth0", "", True), True)
    h._apply_addr(Addr(1, "10.0.0.5", 24, 0), True)
    return h


def test_node_addresses_follow_links_and_addresses() -> None:
    h = node()
    assert h.node_addresses() == {"10.0.0.5", "10.0.0.99"}
    h._apply_addr(Addr(1, "10.0.0.6", 24, 0), True)
    assert h.node_addresses() == {"10.0.0.5", "10.0.0.6", "10.0.0.99"}
    h._apply_addr(Addr(1, "10.0.0.5", 24, 0), False)
    assert h.node_addresses() == {"10.0.0.6", "10.0.0.99"}
    # an address on a pod veth is not the node's
    h._apply_link(Link(7, "eni0123456789a", "veth", True), True)
    h._apply_addr(Addr(7, "169.254.1.1", 32, 0), True)
    assert "169.254.1.1" not in h.node_addresses()


def test_only_veths_are_pod_interfaces_and_names_are_the_cnis() -> None:
    h = node()
    veth = cni_veth_name("vlan", "default", "sg")
    h._apply_link(Link(8, veth, "veth", True), True)
    h._apply_link(Link(9, "vlan.eth.3", "vlan", True), True)
    assert set(h.pod_interfaces()) == {8}
    assert h.named_interfaces("default", "sg") == [8]
    assert h.named_interfaces("default", "other") == []
    second = cni_veth_name("eni", "default", "sg", 1)
    h._apply_link(Link(10, second, "veth", True), True)
    assert h.named_interfaces("default", "sg") == [8, 10]
    assert h.named_interfaces("default", "sg", 1) == [8]


def test_routes_count_in_main_and_in_tables_a_rule_looks_up() -> None:
    h = node()
    h._apply_link(Link(8, "vlanabcdef01234", "veth", True), True)
    h._apply_route(Route("10.1.0.8", 32, 8, socket.AF_INET, 105), True)
    assert h.routed_interfaces("10.1.0.8") == set(), "no rule selects table 105"
    h._apply_rule(Rule(socket.AF_INET6, 105, 10), True)
    assert h.routed_interfaces("10.1.0.8") == set(), "a rule of the other family"
    h._apply_rule(Rule(socket.AF_INET, 105, 10), True)
    h._apply_rule(Rule(socket.AF_INET, 105, 11), True)
    assert h.routed_interfaces("10.1.0.8") == {8}
    h._apply_rule(Rule(socket.AF_INET, 105, 10), False)
    assert h.routed_interfaces("10.1.0.8") == {8}, "one rule still looks it up"
    h._apply_rule(Rule(socket.AF_INET, 105, 11), False)
    assert h.routed_interfaces("10.1.0.8") == set()
    h._apply_route(Route("10.1.0.9", 32, 8, socket.AF_INET, 254), True)
    assert h.routed_interfaces("10.1.0.9") == {8}
    h._apply_link(Link(8, "vlanabcdef01234", "veth", True), False)
    assert h.routed_interfaces("10.1.0.9") == set()
    assert h.routes == {}
