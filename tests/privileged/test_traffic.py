"""Enforcement proven with real packets between namespace pods through tc programs."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import os
import socket
import sys
from collections.abc import AsyncIterator

import pytest

from bpf import layout as lay
from bpf.attach import attach, attachment
from bpf.datapath import ALLOW_ALL, DENY_ALL, Datapath, DirectionPolicy, PodPolicy
from bpf.maps import BPF_F_NO_PREALLOC, MAP_TYPE_LPM_TRIE, Map
from bpf.ringbuf import RingBuffer
from bpf.ruleset import PeerRule, PortRange, compile_rules
from common.netlink import Netlink
from simnode.netns import arun, socket_in
from simnode.node import SimNode, SimPod
from simnode.traffic import PodServer, open_tcp
from tests.privileged.podnet import PodNet

TCP, UDP = lay.NP_PROTO_TCP, lay.NP_PROTO_UDP
FAMILIES = [pytest.param(4, id="ipv4"), pytest.param(6, id="ipv6")]
net = ipaddress.ip_network


def host(pod: SimPod, family: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return net(f"{pod.address(family)}/{32 if family == 4 else 128}")


def applied(*rules: PeerRule) -> DirectionPolicy:
    return DirectionPolicy(lay.NP_STATE_POLICIES_APPLIED, compile_rules(list(rules)))


@pytest.fixture
async def pods(sim: SimNode, datapath: Datapath) -> AsyncIterator[PodNet]:
    pn = PodNet(sim, datapath)
    datapath.set_host_addresses([sim.node_ipv4, sim.node_ipv6])
    try:
        yield pn
    finally:
        await pn.close()


@pytest.fixture
async def trio(pods: PodNet) -> tuple[SimPod, SimPod, SimPod]:
    """client1, client2 and a server listening on 80, 81 and 8000-8011."""
    server = await pods.add_pod("server", ports=(80, 81, 8000, 8005, 8010, 8011))
    return await pods.add_pod("client1"), await pods.add_pod("client2"), server


@pytest.mark.parametrize("family", FAMILIES)
async def test_default_allow(
    pods: PodNet, trio: tuple[SimPod, SimPod, SimPod], family: int
) -> None:
    c1, c2, server = trio
    assert await pods.matrix(
        [
            (c1, server, 80, "TCP", family),
            (c2, server, 81, "UDP", family),
            (server, c1, 80, "TCP", family),
            (None, server, 80, "TCP", family),
        ]
    ) == [True, True, True, True]


@pytest.mark.parametrize("family", FAMILIES)
async def test_default_deny_ingress(
    pods: PodNet, trio: tuple[SimPod, SimPod, SimPod], family: int
) -> None:
    c1, c2, server = trio
    pods.program(server, ingress=DENY_ALL)
    assert await pods.matrix(
        [
            (c1, server, 80, "TCP", family),
            (c2, server, 80, "UDP", family),
            (server, c1, 80, "TCP", family),  # the server's egress is not isolated
            (None, server, 80, "TCP", family),  # the node is always allowed
            (c1, c2, 80, "TCP", family),
        ]
    ) == [False, False, True, True, True]


@pytest.mark.parametrize("family", FAMILIES)
async def test_allow_by_cidr(
    pods: PodNet, trio: tuple[SimPod, SimPod, SimPod], family: int
) -> None:
    c1, c2, server = trio
    pods.program(server, ingress=applied(PeerRule(host(c1, family))))
    assert await pods.matrix(
        [
            (c1, server, 80, "TCP", family),
            (c1, server, 81, "UDP", family),
            (c2, server, 80, "TCP", family),
            (c2, server, 81, "UDP", family),
        ]
    ) == [True, True, False, False]


@pytest.mark.parametrize("family", FAMILIES)
async def test_except(pods: PodNet, trio: tuple[SimPod, SimPod, SimPod], family: int) -> None:
    c1, c2, server = trio
    pod_net = net("10.66.0.0/16") if family == 4 else net("fd00:66::/64")
    pods.program(server, ingress=applied(PeerRule(pod_net, excepts=(host(c2, family),))))
    assert await pods.matrix(
        [
            (c1, server, 80, "TCP", family),
            (c2, server, 80, "TCP", family),
            (c2, server, 80, "UDP", family),
        ]
    ) == [True, False, False]


@pytest.mark.parametrize("family", FAMILIES)
async def test_ports_and_protocols(
    pods: PodNet, trio: tuple[SimPod, SimPod, SimPod], family: int
) -> None:
    c1, _, server = trio
    pods.program(
        server,
        ingress=applied(
            PeerRule(host(c1, family), ports=(PortRange(TCP, 80, 80), PortRange(UDP, 81, 81)))
        ),
    )
    assert await pods.matrix(
        [
            (c1, server, 80, "TCP", family),
            (c1, server, 81, "TCP", family),
            (c1, server, 80, "UDP", family),
            (c1, server, 81, "UDP", family),
        ]
    ) == [True, False, False, True]


@pytest.mark.parametrize("family", FAMILIES)
async def test_port_range(pods: PodNet, trio: tuple[SimPod, SimPod, SimPod], family: int) -> None:
    c1, _, server = trio
    pods.program(
        server, ingress=applied(PeerRule(host(c1, family), ports=(PortRange(TCP, 8000, 8010),)))
    )
    assert await pods.matrix(
        [(c1, server, p, "TCP", family) for p in (8000, 8005, 8010, 8011, 80)]
    ) == [True, True, True, False, False]


async def test_more_than_24_ports_on_one_cidr(pods: PodNet) -> None:
    """The reference agent silently keeps 24 ports per CIDR; every one of 40 is enforced."""
    ports = list(range(9000, 9080))
    server = await pods.add_pod("many", ports=ports)
    client = await pods.add_pod("client")
    allowed = ports[::2]
    pods.program(
        server,
        ingress=applied(
            PeerRule(net("10.66.0.0/16"), ports=tuple(PortRange(TCP, p, p) for p in allowed))
        ),
    )
    got = await pods.matrix([(client, server, p, "TCP", 4) for p in ports])
    assert len(allowed) == 40
    assert [p for p, ok in zip(ports, got, strict=True) if ok] == allowed


@pytest.mark.parametrize("family", FAMILIES)
async def test_overlapping_cidrs_keep_broader_ports(
    pods: PodNet, trio: tuple[SimPod, SimPod, SimPod], family: int
) -> None:
    c1, c2, server = trio
    pod_net = net("10.66.0.0/16") if family == 4 else net("fd00:66::/64")
    pods.program(
        server,
        ingress=applied(
            PeerRule(pod_net, ports=(PortRange(TCP, 80, 80),)),
            PeerRule(host(c1, family), ports=(PortRange(TCP, 81, 81),)),
        ),
    )
    assert await pods.matrix(
        [
            (c1, server, 80, "TCP", family),
            (c1, server, 81, "TCP", family),
            (c2, server, 80, "TCP", family),
            (c2, server, 81, "TCP", family),
        ]
    ) == [True, True, True, False]


@pytest.mark.parametrize("family", FAMILIES)
async def test_egress_rules(pods: PodNet, trio: tuple[SimPod, SimPod, SimPod], family: int) -> None:
    c1, c2, server = trio
    pods.program(
        c1, egress=applied(PeerRule(host(server, family), ports=(PortRange(TCP, 80, 80),)))
    )
    assert await pods.matrix(
        [
            (c1, server, 80, "TCP", family),
            (c1, server, 81, "TCP", family),
            (c1, c2, 80, "TCP", family),
            (c2, server, 81, "TCP", family),
            (server, c1, 80, "TCP", family),  # ingress to c1 is not isolated
        ]
    ) == [True, False, False, True, True]


@pytest.mark.parametrize("family", FAMILIES)
async def test_replies_of_flows_opened_before_isolation(
    pods: PodNet, trio: tuple[SimPod, SimPod, SimPod], family: int
) -> None:
    c1, _, server = trio
    conn = await open_tcp(netns=c1.netns, target=server.address(family), port=80)
    assert conn is not None
    try:
        assert await conn.exchange(b"before", expect="server")
        # both ends isolated in every direction: the tracked flow keeps working...
        pods.program(c1, ingress=DENY_ALL, egress=DENY_ALL)
        pods.program(server, ingress=DENY_ALL, egress=DENY_ALL)
        for i in range(5):
            assert await conn.exchange(b"after %d" % i, expect="server")
        # ...while new flows are denied
        assert not await pods.probe(c1, server, family=family)
    finally:
        await conn.close()


async def test_arp_and_neighbour_discovery_pass_for_isolated_pods(
    pods: PodNet, trio: tuple[SimPod, SimPod, SimPod]
) -> None:
    _, _, server = trio
    pods.program(server, ingress=DENY_ALL, egress=DENY_ALL)
    await arun("ip neigh flush all", netns=pods.sim.netns)
    await arun("ip neigh flush all; ip -6 neigh flush all", netns=server.netns)
    # the node reaches the pod only if ARP / NS / NA cross the programs both ways
    assert await pods.matrix([(None, server, 80, "TCP", 4), (None, server, 80, "TCP", 6)]) == [
        True,
        True,
    ]
    neigh = await arun(
        f"ip neigh show dev {server.host_veth}; ip -6 neigh show dev {server.host_veth}",
        netns=pods.sim.netns,
    )
    assert str(server.ipv4) in neigh
    assert str(server.ipv6) in neigh


@pytest.mark.parametrize("family", FAMILIES)
async def test_fragmented_datagrams(
    pods: PodNet, trio: tuple[SimPod, SimPod, SimPod], family: int
) -> None:
    """A 4000-byte datagram crosses the 1500-byte veths in fragments, both ways."""
    c1, _, server = trio
    pods.program(
        server, ingress=applied(PeerRule(host(c1, family), ports=(PortRange(UDP, 80, 80),)))
    )

    async def send_big(port: int) -> bool:
        loop = asyncio.get_running_loop()
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        sock = socket_in(c1.netns, af, socket.SOCK_DGRAM)
        try:
            await loop.sock_connect(sock, (str(server.address(family)), port))
            payload = b"f" * 4000
            await loop.sock_sendall(sock, payload)
            data = await asyncio.wait_for(loop.sock_recv(sock, 8192), 0.5)
            return data == b"server:" + payload
        except (TimeoutError, OSError):
            return False
        finally:
            sock.close()

    assert await send_big(80)
    assert not await send_big(81)


async def test_decision_events_from_real_traffic(
    pods: PodNet, trio: tuple[SimPod, SimPod, SimPod]
) -> None:
    c1, c2, server = trio
    policy = pods.dp.policy_id(namespace="shop", name="web")
    pods.program(
        server,
        ingress=applied(PeerRule(host(c1, 4), policy_id=policy, ports=(PortRange(TCP, 80, 80),))),
    )
    pods.dp.set_event_flags(emit_deny=True, emit_allow=True)
    events: list[lay.NpEvent] = []
    ring = RingBuffer(
        pods.dp.events, lambda b: events.extend(lay.NpEvent.from_buffer_copy(r) for r in b)
    )
    ring.attach()
    try:
        assert await pods.matrix([(c1, server, 80, "TCP", 4), (c2, server, 80, "TCP", 4)]) == [
            True,
            False,
        ]
        await asyncio.sleep(0.05)
    finally:
        ring.close()
    mine = [e for e in events if e.ifindex == server.ifindex]
    allowed = [e for e in mine if e.verdict == lay.NP_VERDICT_ALLOW]
    denied = [e for e in mine if e.verdict == lay.NP_VERDICT_DENY]
    assert len(allowed) == 1, "one event per allowed flow, not per packet"
    assert len(denied) >= 1, "every dropped SYN (and retransmission) is reported"
    a, d = allowed[0], denied[0]
    assert lay.addr_from(bytes(a.peer_addr), 4) == c1.ipv4
    assert lay.addr_from(bytes(a.pod_addr), 4) == server.ipv4
    assert (a.pod_port, a.protocol, a.direction, a.reason, a.policy_id) == (
        80,
        TCP,
        lay.NP_DIR_INGRESS,
        lay.NP_REASON_RULE,
        policy,
    )
    assert a.pod_id == pods.dp.register_pod(namespace="default", name="server", uid="uid-server")
    assert lay.addr_from(bytes(d.peer_addr), 4) == c2.ipv4
    assert (d.reason, d.policy_id, d.pod_port) == (lay.NP_REASON_NO_PEER_MATCH, 0, 80)
    assert d.packet_len >= 54
    egress = [e for e in events if e.ifindex == c1.ifindex]
    assert egress
    assert egress[0].direction == lay.NP_DIR_EGRESS
    assert egress[0].reason == lay.NP_REASON_DEFAULT_ALLOW


async def test_pins_survive_the_loader_and_are_readopted(
    pods: PodNet, trio: tuple[SimPod, SimPod, SimPod], pin_root: str
) -> None:
    """Another process loads, programs and attaches, then exits; enforcement stays, and a
    new loader adopts the pinned state, programs included: the same code on the same maps
    is kept (bpf.loading), so the veth already runs the new loader's programs."""
    c1, c2, _ = trio
    late = await pods.sim.add_pod("late")
    server = PodServer(name="late", netns=late.netns)
    await server.start()
    pods.servers["late"] = server
    script = f"""
import asyncio, ipaddress
from bpf.attach import attach
from bpf.datapath import Datapath, DirectionPolicy, PodPolicy, ALLOW_ALL
from bpf.ruleset import PeerRule, compile_rules
from common.netlink import Netlink
dp = Datapath.open({pin_root!r})
pid = dp.register_pod(namespace="default", name="late", uid="uid-late")
rules = compile_rules([PeerRule(ipaddress.ip_network("{c1.ipv4}/32"))])
dp.program_pods({{{late.ifindex}: PodPolicy(pid, DirectionPolicy(0, rules), ALLOW_ALL)}})
async def main():
    async with Netlink(netns={pods.sim.netns!r}) as nl:
        await attach(nl, {late.ifindex}, ingress=dp.ingress_prog, egress=dp.egress_prog)
    print(dp.ingress_prog.id)
asyncio.run(main())
"""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    old_prog = int(out.decode().split()[-1])

    assert await pods.matrix([(c1, late, 80, "TCP", 4), (c2, late, 80, "TCP", 4)]) == [
        True,
        False,
    ], "enforced after the loader exited"

    # a trie pin left behind by a process stopped between retiring and unpinning it
    tries_dir = os.path.join(pin_root, "tries")
    with Map.create(
        map_type=MAP_TYPE_LPM_TRIE,
        name="stale",
        key_size=24,
        value_size=4,
        max_entries=1,
        flags=BPF_F_NO_PREALLOC,
    ) as stale:
        stale.pin(os.path.join(tries_dir, "99999"))

    adopted = Datapath.open(pin_root)
    try:
        assert "99999" not in os.listdir(tries_dir)
        rec = adopted.pod_record(late.ifindex)
        assert rec is not None
        assert rec.ingress_state == lay.NP_STATE_POLICIES_APPLIED
        trie = adopted.read_trie(rec.ingress_trie)
        assert trie is not None
        assert [str(p) for p in trie.entries] == [f"{c1.ipv4}/32"]
        assert adopted.counts()["retired_tries"] == 0
        again = adopted.register_pod(namespace="default", name="late", uid="uid-late")
        assert again == rec.pod_id

        async with Netlink(netns=pods.sim.netns) as nl:
            before = await attachment(nl, late.ifindex)
            assert before.ingress_prog_id == old_prog == adopted.ingress_prog.id
            await attach(nl, late.ifindex, ingress=adopted.ingress_prog, egress=adopted.egress_prog)
            after = await attachment(nl, late.ifindex)
            assert (after.ingress_prog_id, after.egress_prog_id) == (
                adopted.ingress_prog.id,
                adopted.egress_prog.id,
            )
        # the adopter's changes take effect
        adopted.program_pods(
            {late.ifindex: PodPolicy(rec.pod_id, applied(PeerRule(host(c2, 4))), ALLOW_ALL)}
        )
        assert await pods.matrix([(c1, late, 80, "TCP", 4), (c2, late, 80, "TCP", 4)]) == [
            False,
            True,
        ]
        # every live trie is pinned (explain reads them without CAP_SYS_ADMIN); a retired
        # one is unpinned when collected
        assert str(rec.ingress_trie) in os.listdir(tries_dir)
        adopted.collect_garbage()
        records = [r for _, r in adopted.pods.items()]
        live = {r.ingress_trie for r in records} | {r.egress_trie for r in records}
        assert sorted(os.listdir(tries_dir)) == sorted(str(t) for t in live if t)
        assert str(rec.ingress_trie) not in os.listdir(tries_dir)
    finally:
        adopted.close()


async def test_continuous_traffic_across_200_atomic_swaps(
    pods: PodNet, trio: tuple[SimPod, SimPod, SimPod]
) -> None:
    """New flows of an allowed client never drop and of a denied one never pass while the
    server's rule set is replaced 200 times (alternating sets, garbage collected)."""
    c1, c2, server = trio
    set_a = applied(PeerRule(host(c1, 4)), PeerRule(host(c1, 6)))
    set_b = applied(
        PeerRule(
            net("10.66.0.0/16"),
            excepts=(host(c2, 4),),
            ports=(PortRange(TCP, 80, 81), PortRange(UDP, 80, 80)),
        ),
        PeerRule(net("fd00:66::/64"), excepts=(host(c2, 6),), ports=(PortRange(TCP, 80, 80),)),
        *(PeerRule(net(f"192.168.{i}.0/24")) for i in range(50)),
    )
    pods.program(server, ingress=set_a)
    stop = asyncio.Event()
    results: dict[str, list[bool]] = {"allowed": [], "denied": []}

    async def traffic(client: SimPod, bucket: str) -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            family = 4 if i % 2 else 6
            proto = "UDP" if i % 3 == 0 and family == 4 else "TCP"
            results[bucket].append(
                await pods.probe(
                    client, server, port=80, protocol=proto, family=family, timeout=0.3
                )
            )

    def swap(i: int) -> None:
        pods.program(server, ingress=set_b if i % 2 == 0 else set_a)
        if i % 10 == 9:
            pods.dp.collect_garbage()

    async def swaps() -> None:
        # in a worker thread, as the agent does: traffic keeps flowing during each write
        for i in range(200):
            await asyncio.to_thread(swap, i)
            await asyncio.sleep(0.002)
        stop.set()

    loops = [asyncio.create_task(traffic(c1, "allowed"), name=f"allowed-{i}") for i in range(8)]
    loops += [asyncio.create_task(traffic(c2, "denied"), name=f"denied-{i}") for i in range(2)]
    await swaps()
    await asyncio.gather(*loops)
    assert len(results["allowed"]) >= 400, "enough new flows during the swaps"
    assert all(results["allowed"]), f"{results['allowed'].count(False)} allowed flows dropped"
    assert not any(results["denied"]), f"{sum(results['denied'])} denied flows passed"
    pods.dp.collect_garbage()
    assert pods.dp.counts()["tries"] == 1
