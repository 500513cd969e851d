"""The loaded programs' verdicts on crafted packets (BPF_PROG_TEST_RUN).

The pod is "attached" at loopback (ifindex 1, what test runs use as the device); the
packets are built byte by byte, so header layouts the veth tests cannot easily produce
(IPv4 options, IPv6 extension headers, fragments, ICMP errors) are covered here.
"""

from __future__ import annotations

import ctypes
import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpf import layout as lay
from bpf.datapath import ALLOW_ALL, DENY_ALL, Datapath, DirectionPolicy, PodPolicy
from bpf.ruleset import PeerRule, PortRange, compile_rules
from simnode import packets as pk
from tests.rulesref import reference_allows

OK, SHOT = 0, 2
LO = 1
ip = ipaddress.ip_address
net = ipaddress.ip_network
POD = {4: ip("10.66.0.10"), 6: ip("fd00:66::10")}
PEER = {4: ip("10.66.0.20"), 6: ip("fd00:66::20")}
OTHER = {4: ip("10.66.0.30"), 6: ip("fd00:66::30")}
TCP, UDP = pk.TCP, pk.UDP


def applied(*rules: PeerRule) -> DirectionPolicy:
    return DirectionPolicy(lay.NP_STATE_POLICIES_APPLIED, compile_rules(list(rules)))


class Pod:
    """A pod record at ifindex 1 and helpers to judge packets for it."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp

    def program(
        self, *, ingress: DirectionPolicy = ALLOW_ALL, egress: DirectionPolicy = ALLOW_ALL
    ) -> None:
        self.dp.program_pods({LO: PodPolicy(pod_id=7, ingress=ingress, egress=egress)})
        self.dp.collect_garbage()
        self.flush_ct()

    def flush_ct(self) -> None:
        for key in list(self.dp.ct.raw):
            self.dp.ct.raw.delete(key)

    def to_pod(self, frame: bytes) -> int:
        return self.dp.ingress_prog.test_run(frame, ifindex=LO).retval

    def from_pod(self, frame: bytes) -> int:
        return self.dp.egress_prog.test_run(frame, ifindex=LO).retval

    def tcp_in(
        self,
        family: int,
        port: int,
        *,
        peer: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
        sport: int = 40000,
    ) -> int:
        return self.to_pod(
            pk.packet(
                src=peer or PEER[family], dst=POD[family], protocol=TCP, sport=sport, dport=port
            )
        )


@pytest.fixture
def pod(datapath: Datapath) -> Pod:
    p = Pod(datapath)
    p.program()
    return p


@pytest.mark.parametrize("family", [4, 6])
def test_unknown_pod_passes_and_is_counted(datapath: Datapath, family: int) -> None:
    frame = pk.packet(src=PEER[family], dst=POD[family], protocol=TCP)
    assert datapath.ingress_prog.test_run(frame, ifindex=LO).retval == OK
    assert datapath.stats()["unknown_pod"] == 1


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("protocol", [TCP, UDP, pk.SCTP])
def test_default_allow_and_default_deny(pod: Pod, family: int, protocol: int) -> None:
    to_pod = pk.packet(src=PEER[family], dst=POD[family], protocol=protocol, dport=80)
    from_pod = pk.packet(src=POD[family], dst=PEER[family], protocol=protocol, dport=80)
    assert pod.to_pod(to_pod) == OK
    assert pod.from_pod(from_pod) == OK
    pod.program(ingress=DENY_ALL, egress=DENY_ALL)
    assert pod.to_pod(to_pod) == SHOT
    assert pod.from_pod(from_pod) == SHOT
    pod.program(ingress=DENY_ALL, egress=ALLOW_ALL)
    assert pod.to_pod(to_pod) == SHOT
    assert pod.from_pod(from_pod) == OK


def test_arp_and_neighbour_discovery_pass_when_isolated(pod: Pod) -> None:
    pod.program(ingress=DENY_ALL, egress=DENY_ALL)
    arp = pk.arp_request(
        sender=ipaddress.IPv4Address(PEER[4]), target=ipaddress.IPv4Address(POD[4])
    )
    assert pod.to_pod(arp) == OK
    assert pod.from_pod(arp) == OK
    for icmp_type in (133, 134, 135, 136, 137):
        nd = pk.packet(src=PEER[6], dst=POD[6], protocol=pk.ICMPV6, icmp_type=icmp_type)
        assert pod.to_pod(nd) == OK, icmp_type
        assert pod.from_pod(nd) == OK, icmp_type
    echo = pk.packet(src=PEER[6], dst=POD[6], protocol=pk.ICMPV6, icmp_type=128)
    assert pod.to_pod(echo) == SHOT


@pytest.mark.parametrize("family", [4, 6])
def test_node_addresses_always_pass(pod: Pod, family: int) -> None:
    pod.program(ingress=DENY_ALL, egress=DENY_ALL)
    assert pod.tcp_in(family, 10250) == SHOT
    pod.dp.set_host_addresses([PEER[4], PEER[6]])
    assert pod.tcp_in(family, 10250) == OK
    assert pod.from_pod(pk.packet(src=POD[family], dst=PEER[family], protocol=UDP)) == OK
    assert pod.tcp_in(family, 10250, peer=OTHER[family]) == SHOT
    pod.dp.set_host_addresses([])
    pod.flush_ct()
    assert pod.tcp_in(family, 10250) == SHOT


def test_denials_are_counted_for_the_pod(pod: Pod) -> None:
    """np_pod_drops: the pod's entry (created with its id) counts what policy denied it,
    by direction, packets and bytes; allowed packets and pods without an entry are not
    counted there."""
    pod.program(ingress=DENY_ALL, egress=applied(PeerRule(net("10.66.0.20/32"))))
    key = ctypes.c_uint32(7)
    pod.dp.pod_drops.update(key, lay.NpPodDrops())
    denied_in = pk.packet(src=PEER[4], dst=POD[4], protocol=TCP, sport=40000, dport=80)
    denied_out = pk.packet(src=POD[6], dst=OTHER[6], protocol=UDP, sport=5000, dport=53)
    allowed_out = pk.packet(src=POD[4], dst=PEER[4], protocol=UDP, sport=5000, dport=53)
    for _ in range(3):
        assert pod.to_pod(denied_in) == SHOT
    assert pod.from_pod(denied_out) == SHOT
    assert pod.from_pod(allowed_out) == OK
    counted = pod.dp.pod_drops.lookup(key)
    assert counted is not None
    assert (counted.ingress_packets, counted.egress_packets) == (3, 1)
    assert counted.ingress_bytes == 3 * len(denied_in)
    assert counted.egress_bytes == len(denied_out)
    pod.dp.pod_drops.delete(key)
    assert pod.to_pod(denied_in) == SHOT  # no entry: the node's counters only
    assert pod.dp.pod_drops.lookup(key) is None


def test_every_node_address_passes_through_the_filter(pod: Pod) -> None:
    """np_host_filter lets a new flow skip the node-address lookup when its bit is clear:
    the bit the agent computes must be the bit the program computes, for every address
    (64 of each family: most of the filter's 256 bits), and an address removed from the
    map no longer passes even where its bit stays set for another address."""
    pod.program(ingress=DENY_ALL, egress=DENY_ALL)
    node = [ip(f"10.{i}.{i * 7 % 256}.{i * 13 % 256}") for i in range(1, 33)]
    node += [ip(f"fd00:{i:x}::{i * 31:x}") for i in range(1, 33)]
    pod.dp.set_host_addresses(node)
    for address in node:
        family = address.version
        assert pod.from_pod(pk.packet(src=POD[family], dst=address, protocol=UDP)) == OK, address
    filt = pod.dp.host_filter.lookup(ctypes.c_uint32(0))
    assert filt is not None
    assert filt.ready == 1
    assert 0 < sum(bin(b).count("1") for b in filt.bits) <= len(node)
    pod.dp.set_host_addresses(node[1:])
    pod.flush_ct()
    assert pod.from_pod(pk.packet(src=POD[4], dst=node[0], protocol=UDP)) == SHOT
    # a record never written (ready 0) summarises nothing: every flow looks up
    pod.dp.host_filter.update(ctypes.c_uint32(0), lay.NpHostFilter())
    pod.flush_ct()
    assert pod.from_pod(pk.packet(src=POD[6], dst=node[-1], protocol=UDP)) == OK
    assert pod.from_pod(pk.packet(src=POD[4], dst=node[0], protocol=UDP)) == SHOT
    # a filter with the address's bit clear hides it: the filter is consulted
    pod.dp.host_filter.update(ctypes.c_uint32(0), lay.NpHostFilter(ready=1))
    pod.flush_ct()
    assert pod.from_pod(pk.packet(src=POD[6], dst=node[-1], protocol=UDP)) == SHOT


@pytest.mark.parametrize("family", [4, 6])
def test_reply_of_tracked_flow_passes_in_isolated_direction(pod: Pod, family: int) -> None:
    pod.program(ingress=DENY_ALL, egress=ALLOW_ALL)
    out = pk.packet(src=POD[family], dst=PEER[family], protocol=TCP, sport=33333, dport=443)
    reply = pk.packet(src=PEER[family], dst=POD[family], protocol=TCP, sport=443, dport=33333)
    assert pod.to_pod(reply) == SHOT, "not a reply before the flow exists"
    assert pod.from_pod(out) == OK
    assert pod.to_pod(reply) == OK
    stranger = pk.packet(src=PEER[family], dst=POD[family], protocol=TCP, sport=443, dport=33334)
    assert pod.to_pod(stranger) == SHOT


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_error_about_tracked_flow_passes(pod: Pod, family: int) -> None:
    pod.program(ingress=DENY_ALL, egress=ALLOW_ALL)
    out = pk.packet(src=POD[family], dst=PEER[family], protocol=UDP, sport=5555, dport=53)
    inner = out[14:]
    error_type, icmp = (3, pk.ICMP) if family == 4 else (2, pk.ICMPV6)  # unreachable / too big
    router = OTHER[family]

    def icmp_error(offending: bytes) -> bytes:
        body = struct.pack("!BBHI", error_type, 0, 0, 1280) + offending
        if family == 4:
            return pk.ipv4(src=router, dst=POD[4], protocol=icmp, body=body)
        return pk.ipv6(src=router, dst=POD[6], protocol=icmp, body=body)

    assert pod.to_pod(icmp_error(inner)) == SHOT, "no flow tracked yet"
    assert pod.from_pod(out) == OK
    assert pod.to_pod(icmp_error(inner)) == OK
    other = pk.packet(src=POD[family], dst=PEER[family], protocol=UDP, sport=5556, dport=53)[14:]
    assert pod.to_pod(icmp_error(other)) == SHOT


def test_ipv4_options_do_not_shift_the_ports(pod: Pod) -> None:
    pod.program(ingress=applied(PeerRule(net("10.66.0.0/24"), ports=(PortRange(TCP, 80, 80),))))
    for opt_len in (4, 8, 20, 40):
        options = b"\x01" * (opt_len - 1) + b"\x00"  # NOPs, end of list
        for dport, verdict in ((80, OK), (81, SHOT)):
            body = pk.l4(TCP, sport=40000 + opt_len, dport=dport)
            frame = pk.ipv4(src=PEER[4], dst=POD[4], protocol=TCP, body=body, options=options)
            assert pod.to_pod(frame) == verdict, (opt_len, dport)


def test_ipv6_extension_headers_are_walked(pod: Pod) -> None:
    pod.program(ingress=applied(PeerRule(net("fd00:66::/64"), ports=(PortRange(UDP, 53, 53),))))
    chains = [
        [],
        [(0, b"\x01\x00\x00\x00")],
        [(0, b""), (60, b"\x01" * 10)],
        [(0, b""), (43, b"\x00" * 6), (60, b"")],
    ]
    for i, chain in enumerate(chains):
        for dport, verdict in ((53, OK), (54, SHOT)):
            body = pk.l4(UDP, sport=30000 + i, dport=dport)
            frame = pk.ipv6(src=PEER[6], dst=POD[6], protocol=UDP, body=body, ext=chain)
            assert pod.to_pod(frame) == verdict, (chain, dport)


@pytest.mark.parametrize("family", [4, 6])
def test_fragments_are_judged_on_the_first_fragments_ports(pod: Pod, family: int) -> None:
    pod.program(
        ingress=applied(
            PeerRule(net("10.66.0.0/24"), ports=(PortRange(UDP, 53, 53),)),
            PeerRule(net("fd00:66::/64"), ports=(PortRange(UDP, 53, 53),)),
        )
    )

    def frag(*, dport: int | None, offset: int, more: bool, ident: int) -> bytes:
        body = pk.l4(UDP, sport=7777, dport=dport, payload=b"y" * 32) if dport else b"z" * 64
        if family == 4:
            return pk.ipv4(
                src=PEER[4],
                dst=POD[4],
                protocol=UDP,
                body=body,
                ident=ident,
                frag_offset=offset,
                more_fragments=more,
            )
        return pk.ipv6(
            src=PEER[6], dst=POD[6], protocol=UDP, body=body, fragment=(offset, more, ident)
        )

    # allowed datagram: first fragment allowed, later ones follow its verdict
    assert pod.to_pod(frag(dport=53, offset=0, more=True, ident=100)) == OK
    assert pod.to_pod(frag(dport=None, offset=40, more=True, ident=100)) == OK
    assert pod.to_pod(frag(dport=None, offset=104, more=False, ident=100)) == OK
    # denied datagram: later fragments are not let through on garbage "ports"
    assert pod.to_pod(frag(dport=54, offset=0, more=True, ident=101)) == SHOT
    assert pod.to_pod(frag(dport=None, offset=40, more=False, ident=101)) == SHOT
    # a later fragment whose first fragment never came: only all-ports rules could allow
    assert pod.to_pod(frag(dport=None, offset=40, more=False, ident=102)) == SHOT
    assert pod.dp.stats()["fragments_untracked"] >= 1
    pod.program(
        ingress=applied(
            PeerRule(net("10.66.0.0/24"), ports=(PortRange(UDP),)),
            PeerRule(net("fd00:66::/64"), ports=(PortRange(UDP),)),
        )
    )
    assert pod.to_pod(frag(dport=None, offset=40, more=False, ident=103)) == OK


def test_more_port_rules_than_the_reference_agent_on_one_cidr(pod: Pod) -> None:
    """256 ranges on one CIDR: every one is enforced, including the last."""
    ports = tuple(PortRange(TCP, p, p) for p in range(1000, 1000 + 2 * 256, 2))
    pod.program(ingress=applied(PeerRule(net("10.66.0.0/24"), ports=ports)))
    for p in (1000, 1002, 1254, 1508, 1510):
        assert pod.tcp_in(4, p, sport=p) == OK, p
    for p in (1001, 1511, 1512, 80):
        assert pod.tcp_in(4, p, sport=p) == SHOT, p


def test_missing_trie_fails_closed(pod: Pod) -> None:
    rec = lay.NpPod(
        pod_id=7,
        ingress_trie=999,
        egress_trie=0,
        ingress_state=lay.NP_STATE_POLICIES_APPLIED,
        egress_state=lay.NP_STATE_DEFAULT_ALLOW,
    )
    pod.dp.pods.update(lay.u32(LO), rec)
    assert pod.tcp_in(4, 80) == SHOT
    assert pod.dp.stats()["packets_denied"] == 1


def test_denied_packets_and_bytes_are_counted_per_direction(pod: Pod) -> None:
    pod.program(ingress=DENY_ALL, egress=DENY_ALL)
    frame_in = pk.packet(src=PEER[4], dst=POD[4], protocol=UDP, payload=b"a" * 100)
    frame_out = pk.packet(src=POD[6], dst=PEER[6], protocol=UDP, payload=b"b" * 10)
    for _ in range(3):
        assert pod.to_pod(frame_in) == SHOT
    assert pod.from_pod(frame_out) == SHOT
    stats = pod.dp.stats()
    assert stats["ingress_denied_packets"] == 3
    assert stats["ingress_denied_bytes"] == 3 * len(frame_in)
    assert (stats["egress_denied_packets"], stats["egress_denied_bytes"]) == (1, len(frame_out))


def test_decision_events(pod: Pod) -> None:
    from bpf.ringbuf import RingBuffer

    events: list[lay.NpEvent] = []
    ring = RingBuffer(
        pod.dp.events, lambda batch: events.extend(lay.NpEvent.from_buffer_copy(b) for b in batch)
    )
    try:
        policy = pod.dp.policy_id(namespace="default", name="allow-web")
        pod.program(
            ingress=applied(
                PeerRule(net("10.66.0.20/32"), policy_id=policy, ports=(PortRange(TCP, 80, 80),))
            )
        )
        pod.dp.set_event_flags(emit_deny=False, emit_allow=False)
        assert pod.tcp_in(4, 81) == SHOT
        assert ring.consume() == 0, "no events unless asked for"

        pod.dp.set_event_flags(emit_deny=True, emit_allow=True)
        denied = pk.packet(src=PEER[4], dst=POD[4], protocol=TCP, sport=41000, dport=81)
        assert pod.to_pod(denied) == SHOT
        assert pod.tcp_in(4, 80, sport=41001) == OK
        assert pod.tcp_in(4, 80, sport=41001) == OK, "tracked now: no second event"
        assert ring.consume() == 2
    finally:
        ring.close()
    deny, allow = events
    assert lay.addr_from(bytes(deny.pod_addr), deny.family) == POD[4]
    assert lay.addr_from(bytes(deny.peer_addr), deny.family) == PEER[4]
    assert (deny.pod_port, deny.peer_port, deny.protocol) == (81, 41000, TCP)
    assert (deny.verdict, deny.direction) == (lay.NP_VERDICT_DENY, lay.NP_DIR_INGRESS)
    assert deny.reason == lay.NP_REASON_NO_PORT_MATCH
    assert (deny.pod_id, deny.ifindex, deny.packet_len) == (7, LO, len(denied))
    assert deny.policy_id == 0
    assert (allow.verdict, allow.reason, allow.policy_id) == (
        lay.NP_VERDICT_ALLOW,
        lay.NP_REASON_RULE,
        policy,
    )
    assert allow.timestamp_ns >= deny.timestamp_ns > 0


# ---- property: the programs agree with the reference semantics ------------------------
HOSTS = [ip(f"10.66.{a}.{b}") for a in (0, 1) for b in (1, 20, 130, 200)]


@st.composite
def rules_strategy(draw: st.DrawFn) -> list[PeerRule]:
    nets = [
        ipaddress.IPv4Network(n)
        for n in (
            "10.66.0.0/16",
            "10.66.0.0/24",
            "10.66.0.0/25",
            "10.66.0.128/25",
            "10.66.1.0/24",
            "10.66.0.20/32",
            "10.66.1.200/32",
        )
    ]
    port_choices = [
        PortRange(TCP, 80, 80),
        PortRange(TCP, 8000, 8010),
        PortRange(UDP, 53, 53),
        PortRange(UDP),
        PortRange(TCP, 0, 1023),
    ]
    out = []
    for _ in range(draw(st.integers(0, 5))):
        cidr = draw(st.sampled_from(nets))
        excepts = tuple(
            n
            for n in draw(st.lists(st.sampled_from(nets), max_size=2))
            if n.subnet_of(cidr) and n != cidr
        )
        ports = tuple(draw(st.lists(st.sampled_from(port_choices), max_size=3, unique=True)))
        out.append(PeerRule(cidr, excepts, ports, policy_id=draw(st.integers(1, 3))))
    return out


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rules=rules_strategy(), egress=st.booleans())
def test_programs_agree_with_reference(pod: Pod, rules: list[PeerRule], egress: bool) -> None:
    policy = applied(*rules)
    if egress:
        pod.program(egress=policy)
    else:
        pod.program(ingress=policy)
    for i, peer in enumerate(HOSTS):
        for protocol, port in (
            (TCP, 80),
            (TCP, 81),
            (TCP, 8005),
            (UDP, 53),
            (UDP, 9999),
            (TCP, 1023),
        ):
            expect = reference_allows(rules, peer, protocol, port)
            sport = 20000 + i * 16 + port % 16
            if egress:
                frame = pk.packet(src=POD[4], dst=peer, protocol=protocol, sport=sport, dport=port)
                got = pod.from_pod(frame)
            else:
                frame = pk.packet(src=peer, dst=POD[4], protocol=protocol, sport=sport, dport=port)
                got = pod.to_pod(frame)
            assert got == (OK if expect else SHOT), (str(peer), protocol, port)
            pod.flush_ct()
