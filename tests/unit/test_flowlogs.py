"""Flow logs: formats, rotation, CloudWatch batching (pure parts)."""

from __future__ import annotations

import ctypes
import json
import socket
from pathlib import Path

from bpf import layout as lay
from flowlogs.cloudwatch import (
    BODY_OVERHEAD,
    EVENT_OVERHEAD,
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    MAX_BODY_BYTES,
    group_name,
    make_batches,
    stream_name,
)
from flowlogs.records import EVENT, Formatter
from flowlogs.sink import RotatingFile


def raw_event(
    *,
    direction: int,
    verdict: int,
    family: int = 4,
    policy_id: int = 0,
    tier: int = lay.NP_TIER_NETWORK_POLICY,
) -> bytes:
    if family == 4:
        pod, peer = socket.inet_aton("10.0.45.6"), socket.inet_aton("10.0.12.34")
    else:
        pod, peer = (
            socket.inet_pton(socket.AF_INET6, "fd00::6"),
            socket.inet_pton(socket.AF_INET6, "fd00::34"),
        )
    return EVENT.pack(
        123,
        pod.ljust(16, b"\0"),
        peer.ljust(16, b"\0"),
        8080,
        43512,
        6,
        family,
        verdict,
        direction,
        lay.NP_REASON_NO_PEER_MATCH,
        tier,
        7,
        3,
        policy_id,
        60,
    )


def formatter() -> Formatter:
    return Formatter(
        node="ip-10-0-0-1",
        pod_name={7: "default/web"}.get,  # type: ignore[arg-type]
        policy_name={5: "default/allow-web", 6: "block-metadata"}.get,  # type: ignore[arg-type]
    )


def test_reference_line_format_and_direction() -> None:
    f = formatter()
    deny_in = f.record(raw_event(direction=lay.NP_DIR_INGRESS, verdict=lay.NP_VERDICT_DENY))
    assert deny_in.line() == (
        "Flow Info: Src IP: 10.0.12.34 Src Port: 43512 Dest IP: 10.0.45.6 Dest Port: 8080 "
        "Proto TCP Verdict DENY Direction ingress, Tier NETWORK_POLICY Pod default/web Policy -"
    )
    out = f.record(
        raw_event(
            direction=lay.NP_DIR_EGRESS,
            verdict=lay.NP_VERDICT_ALLOW,
            family=6,
            policy_id=6,
            tier=lay.NP_TIER_ADMIN,
        )
    )
    assert out.line() == (
        "Flow Info: Src IP: fd00::6 Src Port: 8080 Dest IP: fd00::34 "
        "Dest Port: 43512 Proto TCP Verdict ACCEPT Direction egress Tier: ADMIN "
        "Pod default/web Policy block-metadata"
    )
    assert f.cloudwatch(out).endswith(
        ";PolicyVerdict: ACCEPT;Tier: ADMIN;Direction: egress;Pod: default/web;"
        "Policy: block-metadata"
    )
    assert json.loads(f.json(out))["tier"] == "ADMIN"
    out = f.record(
        raw_event(direction=lay.NP_DIR_EGRESS, verdict=lay.NP_VERDICT_ALLOW, family=6, policy_id=5)
    )
    assert out.policy == "default/allow-web"
    assert f.text(deny_in).endswith(" " + deny_in.line() + "\n")
    assert f.text(deny_in)[:4].isdigit()
    assert f.cloudwatch(deny_in).startswith(
        "Node: ip-10-0-0-1;SIP: 10.0.12.34;SPORT: 43512;DIP: 10.0.45.6;DPORT: 8080;"
        "PROTOCOL: TCP;PolicyVerdict: DENY"
    )
    js = json.loads(f.json(deny_in))
    assert (js["verdict"], js["pod"], js["dst_port"], js["node"]) == (
        "DENY",
        "default/web",
        8080,
        "ip-10-0-0-1",
    )
    assert Formatter.is_deny(raw_event(direction=0, verdict=lay.NP_VERDICT_DENY))
    assert not Formatter.is_deny(raw_event(direction=0, verdict=lay.NP_VERDICT_ALLOW))


def test_event_struct_matches_the_mirror() -> None:
    event = lay.NpEvent(
        timestamp_ns=7,
        pod_port=80,
        peer_port=4242,
        protocol=6,
        family=4,
        verdict=lay.NP_VERDICT_DENY,
        direction=1,
        reason=3,
        tier=lay.NP_TIER_BASELINE,
        pod_id=9,
        ifindex=11,
        policy_id=13,
        packet_len=60,
    )
    raw = bytes(event)
    assert EVENT.size == ctypes.sizeof(lay.NpEvent) == len(raw)
    (
        ts,
        _pod,
        _peer,
        pod_port,
        peer_port,
        proto,
        family,
        verdict,
        direction,
        reason,
        tier,
        pod_id,
        ifindex,
        policy_id,
        packet_len,
    ) = EVENT.unpack(raw)
    assert tier == lay.NP_TIER_BASELINE
    assert (ts, pod_port, peer_port, proto, family, verdict, direction, reason) == (
        7,
        80,
        4242,
        6,
        4,
        lay.NP_VERDICT_DENY,
        1,
        3,
    )
    assert (pod_id, ifindex, policy_id, packet_len) == (9, 11, 13, 60)
    assert Formatter.is_deny(raw)


def test_rotation_keeps_a_bounded_number_of_backups(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    sink = RotatingFile(str(path), max_bytes=1000, backups=2)
    for i in range(60):
        sink.write_lines([f"line {i:03d} " + "x" * 80 + "\n"])
    sink.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["flows.log", "flows.log.1", "flows.log.2"]
    assert sink.rotations >= 5
    assert all(p.stat().st_size <= 1000 for p in tmp_path.iterdir())
    assert path.read_text().splitlines()[-1].startswith("line 059")


def test_batches_obey_count_size_span_and_order() -> None:
    many = [(1_000 + i, "m") for i in range(25_000)]
    assert [len(b) for b in make_batches(many)] == [MAX_BATCH_EVENTS, MAX_BATCH_EVENTS, 5000]
    big = [(1_000 + i, "x" * 5000) for i in range(500)]
    batches = make_batches(big)
    assert all(sum(len(m) + EVENT_OVERHEAD for _, m in b) <= MAX_BATCH_BYTES for b in batches)
    assert all(sum(len(m) + BODY_OVERHEAD for _, m in b) <= MAX_BODY_BYTES for b in batches)
    assert sum(len(b) for b in batches) == 500
    assert len(batches) == 3
    day = 24 * 3600 * 1000
    spread = [(0, "a"), (day // 2, "b"), (day + 5, "c")]
    assert [[m for _, m in b] for b in make_batches(spread)] == [["a", "b"], ["c"]]
    for b in make_batches(many):
        assert [ts for ts, _ in b] == sorted(ts for ts, _ in b)


def test_reference_group_and_stream_names() -> None:
    assert group_name("prod") == "/aws/eks/prod/cluster"
    assert group_name("") == "/aws/k8s-cluster/cluster"
    assert stream_name("ip-10-0-0-1") == "aws-network-policy-agent-audit-ip-10-0-0-1"


def test_drop_metrics_are_prometheus_counters() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from flowlogs.main import DropCounters

    registry = CollectorRegistry()
    drops = DropCounters()
    registry.register(drops)
    drops.values = {"ingress": (3, 300), "egress": (1, 60)}
    text = generate_latest(registry).decode()
    assert "# TYPE network_policy_drop_count_total counter" in text
    assert "# TYPE network_policy_drop_bytes_total counter" in text
    assert 'network_policy_drop_count_total{direction="ingress"} 3.0' in text
    assert 'network_policy_drop_bytes_total{direction="egress"} 60.0' in text


def test_allowed_egress_to_a_learned_address_carries_the_name() -> None:
    learned = {("default/web", "10.0.12.34"): "api.example.com"}
    f = Formatter(
        node="n",
        pod_name={7: "default/web"}.get,  # type: ignore[arg-type]
        policy_name={5: "default/allow-web"}.get,  # type: ignore[arg-type]
        learned_name=lambda pod, address: learned.get((pod, address), ""),
    )
    out = f.record(
        raw_event(direction=lay.NP_DIR_EGRESS, verdict=lay.NP_VERDICT_ALLOW, policy_id=5)
    )
    assert out.line().endswith("Pod default/web Policy default/allow-web Name api.example.com")
    assert f.cloudwatch(out).endswith(";Name: api.example.com")
    assert json.loads(f.json(out))["name"] == "api.example.com"
    denied = f.record(raw_event(direction=lay.NP_DIR_EGRESS, verdict=lay.NP_VERDICT_DENY))
    assert "Name" not in denied.line(), "only allowed flows are by the name"
    inbound = f.record(raw_event(direction=lay.NP_DIR_INGRESS, verdict=lay.NP_VERDICT_ALLOW))
    assert inbound.name == ""
