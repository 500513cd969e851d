"""explain's decision walk, table-driven over snapshots of the maps: no root, no maps."""

from __future__ import annotations

import ipaddress

import pytest

from agent.verdict import Snapshot, decide, trie_policy_ids
from bpf import layout as lay
from bpf.ruleset import PeerRule, PortRange, compile_rules
from common.apimodels import ExplainRequest

APPLIED, ALLOW, DENY = (
    lay.NP_STATE_POLICIES_APPLIED,
    lay.NP_STATE_DEFAULT_ALLOW,
    lay.NP_STATE_DEFAULT_DENY,
)
TCP, UDP = lay.NP_PROTO_TCP, lay.NP_PROTO_UDP
TRIE = compile_rules(
    [
        PeerRule(ipaddress.ip_network("10.1.0.0/16"), ports=(PortRange(TCP, 80, 81),), policy_id=7),
        PeerRule(
            ipaddress.ip_network("10.1.0.0/16"),
            excepts=(ipaddress.ip_network("10.1.9.0/24"),),
            ports=(PortRange(UDP, 53, 53),),
            policy_id=8,
        ),
        PeerRule(ipaddress.ip_network("10.2.0.0/16"), policy_id=9),  # every port
        PeerRule(ipaddress.ip_network("fd00::/64"), ports=(PortRange(TCP, 443, 443),), policy_id=7),
    ]
)
NAMES = {7: "default/web", 8: "default/dns", 9: "default/all"}


def record(*, ingress: int = APPLIED, egress: int = ALLOW) -> lay.NpPod:
    return lay.NpPod(
        pod_id=3, ingress_trie=5, egress_trie=0, ingress_state=ingress, egress_state=egress
    )


def snap(rec: lay.NpPod | None = None, *, host: bool = False, trie: object = TRIE) -> Snapshot:
    return Snapshot(
        ifindex=42,
        record=rec,
        peer_is_host=host,
        trie=trie if trie is None else TRIE,
        policy_names=NAMES,
    )


CASES = [
    # (snapshot, peer, protocol, port, direction, verdict, reason, policy)
    (snap(None), "10.1.2.3", "TCP", 80, "ingress", "ALLOW", "unknown-pod", None),
    (snap(record(), host=True), "10.9.9.9", "TCP", 22, "ingress", "ALLOW", "host", None),
    (snap(record()), "10.1.2.3", "TCP", 22, "egress", "ALLOW", "default-allow", None),
    (snap(record(ingress=DENY)), "10.1.2.3", "TCP", 80, "ingress", "DENY", "default-deny", None),
    (snap(record(), trie=None), "10.1.2.3", "TCP", 80, "ingress", "DENY", "missing-trie", None),
    (snap(record()), "10.1.2.3", "TCP", 80, "ingress", "ALLOW", "rule", "default/web"),
    (snap(record()), "10.1.2.3", "TCP", 81, "ingress", "ALLOW", "rule", "default/web"),
    (snap(record()), "10.1.2.3", "TCP", 82, "ingress", "DENY", "no-port-match", None),
    (snap(record()), "10.1.2.3", "UDP", 53, "ingress", "ALLOW", "rule", "default/dns"),
    (snap(record()), "10.1.9.3", "UDP", 53, "ingress", "DENY", "no-port-match", None),
    (snap(record()), "10.1.9.3", "TCP", 80, "ingress", "ALLOW", "rule", "default/web"),
    (snap(record()), "10.2.0.1", "SCTP", 9999, "ingress", "ALLOW", "rule", "default/all"),
    (snap(record()), "10.2.0.1", "ICMP", 0, "ingress", "ALLOW", "rule", "default/all"),
    (snap(record()), "10.3.0.1", "TCP", 80, "ingress", "DENY", "no-peer-match", None),
    (snap(record()), "fd00::5", "TCP", 443, "ingress", "ALLOW", "rule", "default/web"),
    (snap(record()), "fd00:1::5", "TCP", 443, "ingress", "DENY", "no-peer-match", None),
]


@pytest.mark.parametrize(
    ("s", "peer", "protocol", "port", "direction", "verdict", "reason", "policy"),
    CASES,
    ids=[f"{c[6]}-{c[1]}-{c[2]}{c[3]}" for c in CASES],
)
def test_decisions(
    s: Snapshot,
    peer: str,
    protocol: str,
    port: int,
    direction: str,
    verdict: str,
    reason: str,
    policy: str | None,
) -> None:
    req = ExplainRequest(
        pod="default/web",
        peer=peer,
        port=port,
        protocol=protocol,  # type: ignore[arg-type]
        direction=direction,  # type: ignore[arg-type]
    )
    res = decide(req, s)
    assert (res.verdict, res.reason, res.policy) == (verdict, reason, policy), res.summary
    assert res.ifindex == 42


def test_the_snapshot_names_every_policy_of_the_trie() -> None:
    assert trie_policy_ids(TRIE) == {7, 8, 9}
