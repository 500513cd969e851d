"""Flow records: datapath decision events turned into what operators read.

The line format is the reference agent's (users grep for it), with the pod and the
deciding policy appended, which the reference cannot tell:

    Flow Info: Src IP: 10.0.12.34 Src Port: 43512 Dest IP: 10.0.45.6 Dest Port: 8080
    Proto TCP Verdict DENY Direction ingress Pod default/web Policy -
"""

from __future__ import annotations

from dataclasses import dataclass

from bpf import layout as lay


@dataclass(frozen=True)
class FlowRecord:
    timestamp_ns: int
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    protocol: str
    verdict: str        # ACCEPT | DENY
    direction: str      # ingress | egress (the pod's point of view)
    reason: str
    pod: str            # namespace/name, or "?" if unknown
    policy: str         # namespace/name of the allowing policy, or "-"
    packet_len: int

    @classmethod
    def from_event(cls, ev: lay.NpEvent, *, pod: str, policy: str) -> FlowRecord:
        pod_ip = str(lay.addr_from(bytes(ev.pod_addr), ev.family))
        peer_ip = str(lay.addr_from(bytes(ev.peer_addr), ev.family))
        if ev.direction == lay.NP_DIR_INGRESS:
            src, sport, dst, dport = peer_ip, ev.peer_port, pod_ip, ev.pod_port
        else:
            src, sport, dst, dport = pod_ip, ev.pod_port, peer_ip, ev.peer_port
        return cls(
            timestamp_ns=ev.timestamp_ns,
            src_ip=src,
            src_port=sport,
            dst_ip=dst,
            dst_port=dport,
            protocol=lay.PROTOCOL_NAMES.get(ev.protocol, str(ev.protocol)),
            verdict="ACCEPT" if ev.verdict == lay.NP_VERDICT_ALLOW else "DENY",
            direction=lay.DIRECTION_NAMES.get(ev.direction, "?"),
            reason=lay.REASON_NAMES.get(ev.reason, str(ev.reason)),
            pod=pod,
            policy=policy,
            packet_len=ev.packet_len,
        )

    def line(self) -> str:
        return (
            f"Flow Info: Src IP: {self.src_ip} Src Port: {self.src_port} "
            f"Dest IP: {self.dst_ip} Dest Port: {self.dst_port} Proto {self.protocol} "
            f"Verdict {self.verdict} Direction {self.direction} "
            f"Pod {self.pod} Policy {self.policy}"
        )
