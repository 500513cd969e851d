"""Flow records: datapath decision events turned into what operators read.

The text line is the reference agent's (users grep for it), prefixed with the time and
with the pod and the allowing policy appended, which the reference cannot tell:

    2026-11-21T08:00:00.123456Z Flow Info: Src IP: 10.0.12.34 Src Port: 43512
    Dest IP: 10.0.45.6 Dest Port: 8080 Proto TCP Verdict DENY Direction ingress,
    Tier NETWORK_POLICY Pod default/web Policy -

``Tier`` is the reference's: which tier decided (ADMIN, NETWORK_POLICY, BASELINE,
DEFAULT; ERROR when nothing could), written ``, Tier X`` for IPv4 flows and ``Tier: X``
for IPv6 ones, as the reference writes them. The Policy of a ClusterNetworkPolicy is its
bare name. The CloudWatch message is the reference's
``Node: ..;SIP: ..;...;PolicyVerdict: DENY;Tier: X`` with the same additions.
Formatting is the hot path (every event), so records are decoded with one
``struct.unpack_from`` and address and name strings are cached.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NamedTuple

from bpf import layout as lay

EVENT = lay.packer(lay.NpEvent)  # struct np_event, unpacked whole per record
_VERDICT_AT = lay.offset(lay.NpEvent, "verdict")

_PROTO = dict(lay.PROTOCOL_NAMES)
_DIRECTION = lay.DIRECTION_NAMES
_REASON = lay.REASON_NAMES
_TIER = lay.TIER_NAMES


class FlowRecord(NamedTuple):
    timestamp_ns: int  # wall clock
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    protocol: str
    verdict: str  # ACCEPT | DENY
    direction: str  # ingress | egress (the pod's point of view)
    reason: str
    pod: str  # namespace/name, or "?" if unknown
    policy: str  # namespace/name of the deciding policy (a cluster policy: name), or "-"
    packet_len: int
    tier: str = "DEFAULT"  # ADMIN | NETWORK_POLICY | BASELINE | DEFAULT | ERROR
    ipv6: bool = False
    name: str = ""  # allowed egress to an address the pod learned: the name it asked for

    def line(self) -> str:
        tier = f" Tier: {self.tier}" if self.ipv6 else f", Tier {self.tier}"
        learned = f" Name {self.name}" if self.name else ""
        return (
            f"Flow Info: Src IP: {self.src_ip} Src Port: {self.src_port} "
            f"Dest IP: {self.dst_ip} Dest Port: {self.dst_port} Proto {self.protocol} "
            f"Verdict {self.verdict} Direction {self.direction}{tier} "
            f"Pod {self.pod} Policy {self.policy}{learned}"
        )


class Formatter:
    """Decodes raw ring-buffer records and renders them.

    ``pod_name`` and ``policy_name`` map ids to ``namespace/name`` (see flowlogs.names)."""

    def __init__(
        self,
        *,
        node: str,
        pod_name: Callable[[int], str],
        policy_name: Callable[[int], str],
        learned_name: Callable[[str, str], str] | None = None,
    ) -> None:
        self.node = node
        self.pod_name = pod_name
        self.policy_name = policy_name
        # (pod namespace/name, peer address) -> the name it learned the address under
        self.learned_name = learned_name
        self._addrs: dict[tuple[bytes, int], str] = {}
        self.resync_clock()

    def resync_clock(self) -> None:
        """Offset from the datapath's clock (CLOCK_MONOTONIC) to the wall clock."""
        self.offset_ns = time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)

    def _addr(self, raw: bytes, family: int) -> str:
        key = (raw, family)
        text = self._addrs.get(key)
        if text is None:
            if len(self._addrs) > 100_000:
                self._addrs.clear()
            text = (
                socket.inet_ntop(socket.AF_INET, raw[:4])
                if family == lay.NP_FAMILY_IPV4
                else socket.inet_ntop(socket.AF_INET6, raw)
            )
            self._addrs[key] = text
        return text

    def record(self, raw: bytes) -> FlowRecord:
        (
            ts,
            pod_addr,
            peer_addr,
            pod_port,
            peer_port,
            proto,
            family,
            verdict,
            direction,
            reason,
            tier,
            pod_id,
            _ifindex,
            policy_id,
            packet_len,
        ) = EVENT.unpack_from(raw)
        pod_ip, peer_ip = self._addr(pod_addr, family), self._addr(peer_addr, family)
        pod = self.pod_name(pod_id) or "?"
        name = ""
        if (
            self.learned_name is not None
            and verdict == lay.NP_VERDICT_ALLOW
            and direction == lay.NP_DIR_EGRESS
        ):
            name = self.learned_name(pod, peer_ip)
        if direction == lay.NP_DIR_INGRESS:
            src, sport, dst, dport = peer_ip, peer_port, pod_ip, pod_port
        else:
            src, sport, dst, dport = pod_ip, pod_port, peer_ip, peer_port
        return FlowRecord(
            timestamp_ns=ts + self.offset_ns,
            src_ip=src,
            src_port=sport,
            dst_ip=dst,
            dst_port=dport,
            protocol=_PROTO.get(proto, str(proto)),
            verdict="ACCEPT" if verdict == lay.NP_VERDICT_ALLOW else "DENY",
            direction=_DIRECTION.get(direction, "?"),
            reason=_REASON.get(reason, str(reason)),
            pod=pod,
            policy=(self.policy_name(policy_id) or f"#{policy_id}") if policy_id else "-",
            packet_len=packet_len,
            tier=_TIER.get(tier, str(tier)),
            ipv6=family == lay.NP_FAMILY_IPV6,
            name=name,
        )

    @staticmethod
    def is_deny(raw: bytes) -> bool:
        return raw[_VERDICT_AT] == lay.NP_VERDICT_DENY

    def text(self, r: FlowRecord) -> str:
        return f"{_stamp(r.timestamp_ns)} {r.line()}\n"

    def json(self, r: FlowRecord) -> str:
        return (
            json.dumps(
                {
                    "time": _stamp(r.timestamp_ns),
                    "node": self.node,
                    "src_ip": r.src_ip,
                    "src_port": r.src_port,
                    "dst_ip": r.dst_ip,
                    "dst_port": r.dst_port,
                    "protocol": r.protocol,
                    "verdict": r.verdict,
                    "direction": r.direction,
                    "reason": r.reason,
                    "tier": r.tier,
                    "name": r.name or None,
                    "pod": r.pod,
                    "policy": r.policy,
                    "bytes": r.packet_len,
                },
                separators=(",", ":"),
            )
            + "\n"
        )

    def cloudwatch(self, r: FlowRecord) -> str:
        return (
            f"Node: {self.node};SIP: {r.src_ip};SPORT: {r.src_port};DIP: {r.dst_ip};"
            f"DPORT: {r.dst_port};PROTOCOL: {r.protocol};PolicyVerdict: {r.verdict};"
            f"Tier: {r.tier};Direction: {r.direction};Pod: {r.pod};Policy: {r.policy}"
            + (f";Name: {r.name}" if r.name else "")
        )


_last_second: list[object] = [None, ""]  # events come in bursts: format each second once


def _stamp(ns: int) -> str:
    secs, rem = divmod(ns, 1_000_000_000)
    if _last_second[0] != secs:
        _last_second[0] = secs
        _last_second[1] = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_last_second[1]}.{rem // 1000:06d}Z"
