"""A revoked peer stays out: established flows may finish, but a warm conntrack entry
never lets a *new* connection or an endless UDP flow through. Real packets through the
real programs; entries aged in the map where a test cannot wait for the clock."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import time

import pytest

from bpf import layout as lay
from bpf.datapath import DENY_ALL, Datapath, DirectionPolicy
from bpf.ruleset import PeerRule, compile_rules
from conntrack.sweep import now_ns
from simnode.netns import arun, socket_in
from simnode.node import SimPod
from simnode.traffic import open_tcp
from tests.privileged.podnet import PodNet

PORT = 40123  # the client's fixed source port, reused as a revoked client would


@pytest.fixture
def pods(podnet: PodNet) -> PodNet:
    return podnet


def allow(client: SimPod) -> DirectionPolicy:
    return DirectionPolicy(
        lay.NP_STATE_POLICIES_APPLIED,
        compile_rules([PeerRule(ipaddress.ip_network(f"{client.ipv4}/32"))]),
    )


def entries(dp: Datapath, *, ifindex: int, port: int) -> dict[bytes, lay.NpCtValue]:
    return {
        bytes(k): v
        for k, v in dp.ct.items()
        if k.ifindex == ifindex and port in (k.pod_port, k.peer_port)
    }


def age(dp: Datapath, *, ifindex: int, port: int, seconds: float) -> int:
    """Move the entries' clocks back (the test cannot wait a minute)."""
    n = 0
    for raw, v in entries(dp, ifindex=ifindex, port=port).items():
        v.last_seen_ns -= int(seconds * 1e9)
        v.created_ns -= int(seconds * 1e9)
        dp.ct.update(lay.NpCtKey.from_buffer_copy(raw), v)
        n += 1
    return n


async def connect(client: SimPod, server: SimPod) -> socket.socket | None:
    conn = await open_tcp(
        netns=client.netns, target=server.ipv4, port=80, timeout=0.5, source_port=PORT
    )
    if conn is None:
        return None
    ok = await conn.exchange(b"hi", expect="server")
    return conn.sock if ok else None


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST: no TIME_WAIT, the port is free at once


async def test_a_new_syn_after_rst_is_judged_again(pods: PodNet) -> None:
    client, server = await pods.add_pod("client"), await pods.add_pod("server")
    pods.program(server, ingress=allow(client))
    sock = await connect(client, server)
    assert sock is not None
    reset(sock)
    # reconnecting from the same port while allowed works (judged again, allowed)
    sock = await connect(client, server)
    assert sock is not None
    reset(sock)
    before = pods.dp.stats()
    pods.program(server, ingress=DENY_ALL)  # revoked
    for _ in range(5):
        assert await connect(client, server) is None, "a new connection after revocation"
    after = pods.dp.stats()
    assert after["ct_revoked"] > before["ct_revoked"]
    assert entries(pods.dp, ifindex=server.ifindex, port=PORT) == {}


async def test_a_reallowed_syn_renews_its_entry_in_place(pods: PodNet) -> None:
    """Judged again and allowed: the same entry is renewed (clock, origin, no closing
    flag), so the next SYN of a live connection does not take the judged path again."""
    client, server = await pods.add_pod("client"), await pods.add_pod("server")
    pods.program(server, ingress=allow(client))
    sock = await connect(client, server)
    assert sock is not None
    reset(sock)
    (raw, closed), *rest = entries(pods.dp, ifindex=server.ifindex, port=PORT).items()
    assert not rest
    assert closed.flags == lay.NP_CT_F_CLOSING
    assert age(pods.dp, ifindex=server.ifindex, port=PORT, seconds=5) == 1
    judged = pods.dp.stats()["ct_rejudged"]
    sock = await connect(client, server)  # the same source port: the same key
    assert sock is not None
    try:
        renewed = entries(pods.dp, ifindex=server.ifindex, port=PORT)
        assert list(renewed) == [raw]
        v = renewed[raw]
        assert v.flags == 0
        assert v.origin == lay.NP_DIR_INGRESS
        assert v.reason == lay.NP_REASON_RULE
        now = now_ns()
        assert now - v.created_ns < 2e9, "the renewed entry keeps its old clock"
        assert pods.dp.stats()["ct_rejudged"] == judged + 2  # the client's egress and this
    finally:
        reset(sock)


async def test_an_established_connection_survives_a_revocation(pods: PodNet) -> None:
    client, server = await pods.add_pod("client"), await pods.add_pod("server")
    pods.program(server, ingress=allow(client))
    conn = await open_tcp(netns=client.netns, target=server.ipv4, port=80, source_port=PORT)
    assert conn is not None
    try:
        assert await conn.exchange(b"one", expect="server")
        pods.program(server, ingress=DENY_ALL)
        assert await conn.exchange(b"two", expect="server"), "documented: flows finish"
    finally:
        reset(conn.sock)


async def test_a_new_syn_after_fin_is_judged_again(pods: PodNet) -> None:
    client, server = await pods.add_pod("client"), await pods.add_pod("server")
    # the client may reuse its own TIME_WAIT port (as busy clients do)
    await arun("sysctl -qw net.ipv4.tcp_tw_reuse=1", netns=client.netns)
    pods.program(server, ingress=allow(client))
    sock = await connect(client, server)
    assert sock is not None
    sock.shutdown(socket.SHUT_WR)  # FIN
    await asyncio.sleep(0.2)
    sock.close()
    flags = {v.flags for v in entries(pods.dp, ifindex=server.ifindex, port=PORT).values()}
    assert flags == {lay.NP_CT_F_CLOSING}
    pods.program(server, ingress=DENY_ALL)
    await asyncio.sleep(1.1)  # tcp_tw_reuse needs a second since the last timestamp
    assert await connect(client, server) is None


async def test_a_syn_on_an_idle_entry_is_judged_again(pods: PodNet) -> None:
    """No FIN or RST was seen (the pod restarted, a middlebox ate them): the entry's
    idle time decides."""
    client, server = await pods.add_pod("client"), await pods.add_pod("server")
    pods.program(server, ingress=allow(client))
    conn = await open_tcp(netns=client.netns, target=server.ipv4, port=80, source_port=PORT)
    assert conn is not None
    assert await conn.exchange(b"hi", expect="server")
    pods.program(server, ingress=DENY_ALL)
    reset(conn.sock)
    # the RST went through and marked the entry: undo that, as if it had been lost
    for raw, v in entries(pods.dp, ifindex=server.ifindex, port=PORT).items():
        v.flags = 0
        pods.dp.ct.update(lay.NpCtKey.from_buffer_copy(raw), v)
    # a SYN on it within NP_CT_SYN_IDLE_NS would pass (a retransmission of the first);
    # after that it is a new connection
    assert (
        age(pods.dp, ifindex=server.ifindex, port=PORT, seconds=lay.NP_CT_SYN_IDLE_NS / 1e9 + 1) > 0
    )
    assert await connect(client, server) is None


async def test_a_busy_udp_flow_of_a_revoked_peer_ends_at_its_lease(pods: PodNet) -> None:
    client, server = await pods.add_pod("client"), await pods.add_pod("server")
    pods.program(server, ingress=allow(client))
    loop = asyncio.get_running_loop()
    sock = socket_in(client.netns, socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", PORT))
    sock.setblocking(False)

    async def echo() -> bool:
        await loop.sock_sendto(sock, b"probe", (str(server.ipv4), 81))
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 2048), 0.5)
        except TimeoutError:
            return False
        return data == b"server:probe"

    try:
        assert await echo()
        pods.program(server, ingress=DENY_ALL)
        assert await echo(), "within its lease the flow goes on (like an established one)"
        # the lease is over (NP_CT_LEASE_NS after it was judged): judged again, denied
        assert (
            age(pods.dp, ifindex=server.ifindex, port=PORT, seconds=lay.NP_CT_LEASE_NS / 1e9 + 1)
            > 0
        )
        assert not await echo()
        assert entries(pods.dp, ifindex=server.ifindex, port=PORT) == {}
        assert not await echo()
        # an allowed flow past its lease is renewed, not cut
        pods.program(server, ingress=allow(client))
        assert await echo()
        age(pods.dp, ifindex=server.ifindex, port=PORT, seconds=lay.NP_CT_LEASE_NS / 1e9 + 1)
        assert await echo()
        fresh = entries(pods.dp, ifindex=server.ifindex, port=PORT)
        assert fresh
        now = time.monotonic_ns()  # bpf_ktime_get_ns() is CLOCK_MONOTONIC
        assert all(now - v.created_ns < 5e9 for v in fresh.values())
    finally:
        sock.close()
