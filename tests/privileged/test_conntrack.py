"""The conntrack cleaner against real kernel conntrack and real flows."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bpf import layout as lay
from bpf.datapath import Datapath
from common.apimodels import ProcessStats
from common.localapi import CONNTRACK_SOCKET, LocalClient, socket_path
from conntrack.ctnetlink import scan
from conntrack.sweep import KernelRemover, Sweeper, SweepResult, now_ns
from simnode.netns import arun, inside, socket_in
from simnode.node import SimNode, SimPod
from simnode.stack import REPO
from tests.privileged.podnet import PodNet

SERVICE_IP = "10.96.0.10"


@pytest.fixture
async def pods(sim: SimNode, datapath: Datapath) -> AsyncIterator[PodNet]:
    pn = PodNet(sim, datapath)
    datapath.set_host_addresses([sim.node_ipv4, sim.node_ipv6])
    try:
        yield pn
    finally:
        await pn.close()


@pytest.fixture(params=["kernel", "syscalls"])
def remover(request: pytest.FixtureRequest, datapath: Datapath) -> Iterator[KernelRemover | None]:
    """How the sweep removes: in batches in the kernel (bpf/sweep.bpf.c), or one syscall
    per entry (where the kernel cannot run the program)."""
    if request.param == "syscalls":
        yield None
        return
    r = KernelRemover.open(datapath.pins.maps, datapath.ct.raw.max_entries)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
async def tracked(pods: PodNet) -> AsyncIterator[tuple[SimPod, SimPod]]:
    """client and server; the node namespace's kernel tracks forwarded flows (an nft ct
    rule, as kube-proxy's rules do on real nodes) and DNATs a service address. A
    long-lived connection keeps the kernel table from being empty, as on any node."""
    from simnode.traffic import open_tcp

    client, server = await pods.add_pod("client"), await pods.add_pod("server")
    await arun(
        f"""
        nft add table inet nptest
        nft add chain inet nptest forwarding '{{ type filter hook forward priority 0; }}'
        nft add rule inet nptest forwarding ct state new,established accept
        nft add table ip nptestnat
        nft add chain ip nptestnat prerouting '{{ type nat hook prerouting priority -100; }}'
        nft add rule ip nptestnat prerouting ip daddr {SERVICE_IP} tcp dport 80 \
            dnat to {server.ipv4}:80
        """,
        netns=pods.sim.netns,
    )
    background = await open_tcp(netns=server.netns, target=client.ipv4, port=81)
    assert background is not None
    try:
        yield client, server
    finally:
        await background.close()


def ct_entries(dp: Datapath) -> dict[bytes, lay.NpCtValue]:
    return {bytes(k): v for k, v in dp.ct.items()}


def fake_entry(
    dp: Datapath, *, ifindex: int, pod: str, peer: str, port: int, idle_seconds: float
) -> bytes:
    import ipaddress

    key = lay.NpCtKey(pod_port=40000 + port, peer_port=port, protocol=6, family=4, ifindex=ifindex)
    key.pod_addr[:4] = list(ipaddress.IPv4Address(pod).packed)
    key.peer_addr[:4] = list(ipaddress.IPv4Address(peer).packed)
    seen = now_ns() - int(idle_seconds * 1e9)
    dp.ct.update(
        key, lay.NpCtValue(last_seen_ns=seen, created_ns=seen, pod_id=9, origin=lay.NP_DIR_EGRESS)
    )
    return bytes(key)


def sweeper(
    dp: Datapath, netns: str, remover: KernelRemover | None = None, **kw: object
) -> Sweeper:
    """A sweeper reading the kernel table of the node's namespace."""

    def kernel_scan(family: int, wanted: set[bytes]) -> tuple[int, set[bytes]]:
        with inside(netns):
            return scan(family, wanted)

    return Sweeper(dp.ct.raw, kernel_scan=kernel_scan, remover=remover, **kw)  # type: ignore[arg-type]


async def test_stale_entries_go_and_live_flows_stay(
    pods: PodNet, tracked: tuple[SimPod, SimPod], remover: KernelRemover | None
) -> None:
    client, server = tracked
    from simnode.traffic import open_tcp, udp_probe

    conn = await open_tcp(netns=client.netns, target=server.ipv4, port=80)
    assert conn is not None
    try:
        assert await conn.exchange(b"hello", expect="server")
        assert await udp_probe(netns=client.netns, target=server.ipv6, port=81, expect="server")
        live = ct_entries(pods.dp)
        assert len(live) >= 4, "TCP and UDP flows, each tracked at both veths"
        stale = [
            fake_entry(
                pods.dp,
                ifindex=client.ifindex,
                pod=str(client.ipv4),
                peer=f"10.66.9.{i}",
                port=80 + i,
                idle_seconds=5,
            )
            for i in range(3)
        ]
        # past the coarse clock's tick: the flows were last used before the sweep began
        # (a use in the tick the sweep begins in counts as after it, and is kept)
        await asyncio.sleep(0.05)
        res: SweepResult = await asyncio.to_thread(sweeper(pods.dp, pods.sim.netns, remover).run)
        after = ct_entries(pods.dp)
        assert res.removed == 3
        assert not any(k in after for k in stale)
        assert set(live) <= set(after), "every live flow's entries are kept"
        assert res.live >= len(live)
        assert res.kernel_entries >= 2
        assert await conn.exchange(b"still here", expect="server")
    finally:
        await conn.close()


async def test_a_flow_reusing_a_freed_port_is_never_removed(
    pods: PodNet, tracked: tuple[SimPod, SimPod], remover: KernelRemover | None
) -> None:
    client, server = tracked
    port = 41234
    from simnode.traffic import tcp_probe

    assert await tcp_probe(netns=client.netns, target=server.ipv4, port=80, source_port=port)
    await forget_kernel_flow(pods, port)  # the old flow is gone from the kernel
    mine = [
        k
        for k, v in ct_entries(pods.dp).items()
        if lay.NpCtKey.from_buffer_copy(k).pod_port == port
    ]
    assert mine, "the finished flow's entry is still in the map"

    reused: list[bool] = []

    def kernel_scan(family: int, wanted: set[bytes]) -> tuple[int, set[bytes]]:
        with inside(pods.sim.netns):
            result = scan(family, wanted)
        if family == socket.AF_INET6:
            # between the kernel scan and the removals, a new connection reuses the port
            reused.append(_connect_from(client, server, port))
        return result

    res = await asyncio.to_thread(
        Sweeper(pods.dp.ct.raw, kernel_scan=kernel_scan, remover=remover).run
    )
    assert reused == [True]
    assert res.touched >= 1
    assert all(k in ct_entries(pods.dp) for k in mine), "the reused flow kept its entry"
    # once it is really over, it goes
    await forget_kernel_flow(pods, port)
    res = await asyncio.to_thread(sweeper(pods.dp, pods.sim.netns, remover).run)
    assert not any(k in ct_entries(pods.dp) for k in mine)
    assert res.removed >= 1


async def forget_kernel_flow(pods: PodNet, port: int) -> None:
    """Let the connection finish closing (a late FIN would re-create the kernel entry:
    the kernel tracks TCP loosely), then drop the kernel's entry for it."""
    await asyncio.sleep(0.5)
    await arun(
        f"conntrack -D -p tcp --orig-port-src {port} >/dev/null 2>&1 || true", netns=pods.sim.netns
    )
    await asyncio.sleep(0.05)


def _connect_from(client: SimPod, server: SimPod, port: int) -> bool:
    """A blocking TCP exchange from a fixed source port (runs in the sweeper's thread)."""
    sock = socket_in(client.netns, socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(True)
    sock.settimeout(1)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.connect((str(server.ipv4), 80))
        sock.sendall(b"again\n")
        return sock.recv(64).endswith(b":again\n")
    except OSError:
        return False
    finally:
        sock.close()


async def test_clusterip_flows_are_kept_on_both_sides(
    pods: PodNet, tracked: tuple[SimPod, SimPod], remover: KernelRemover | None
) -> None:
    import ipaddress

    from simnode.traffic import open_tcp

    client, server = tracked
    conn = await open_tcp(netns=client.netns, target=ipaddress.IPv4Address(SERVICE_IP), port=80)
    assert conn is not None
    try:
        assert await conn.exchange(b"via service", expect="server")
        entries = ct_entries(pods.dp)
        peers = {
            (
                lay.NpCtKey.from_buffer_copy(k).ifindex,
                str(lay.addr_from(bytes(lay.NpCtKey.from_buffer_copy(k).peer_addr), 4)),
            )
            for k in entries
        }
        assert (client.ifindex, SERVICE_IP) in peers, "the client saw the service address"
        assert (server.ifindex, str(client.ipv4)) in peers, "the backend saw the client"
        res = await asyncio.to_thread(sweeper(pods.dp, pods.sim.netns, remover).run)
        assert res.removed == 0
        assert set(entries) <= set(ct_entries(pods.dp))
        assert await conn.exchange(b"after the sweep", expect="server")
    finally:
        await conn.close()


async def test_with_no_kernel_flows_only_long_idle_entries_go(
    pods: PodNet, remover: KernelRemover | None
) -> None:
    """No flow at all in the kernel's table: perhaps no kernel conntrack here. Then the
    table proves nothing, and only entries idle for longer than the fallback go."""
    client = await pods.add_pod("client")
    recent = fake_entry(
        pods.dp,
        ifindex=client.ifindex,
        pod=str(client.ipv4),
        peer="10.66.9.1",
        port=81,
        idle_seconds=5,
    )
    ancient = fake_entry(
        pods.dp,
        ifindex=client.ifindex,
        pod=str(client.ipv4),
        peer="10.66.9.2",
        port=82,
        idle_seconds=60,
    )
    res = await asyncio.to_thread(sweeper(pods.dp, pods.sim.netns, remover, fallback_idle=30).run)
    assert (res.kernel_entries, res.fallback, res.young, res.removed) == (0, True, 1, 1)
    assert recent in ct_entries(pods.dp)
    assert ancient not in ct_entries(pods.dp)


@pytest.fixture
def runtime_dir(tmp_path: Path) -> str:
    return str(tmp_path / "run")


async def test_the_cleaner_process(
    pods: PodNet, tracked: tuple[SimPod, SimPod], pin_root: str, runtime_dir: str
) -> None:
    client, _ = tracked
    stale = fake_entry(
        pods.dp,
        ifindex=client.ifindex,
        pod=str(client.ipv4),
        peer="10.66.9.9",
        port=99,
        idle_seconds=5,
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    base = [
        sys.executable,
        "-m",
        "conntrack",
        f"--bpf-pin-root={pin_root}",
        f"--runtime-dir={runtime_dir}",
    ]
    # the map was made with 32768 entries: another size is refused, naming the flag
    refused = await asyncio.to_thread(
        subprocess.run,
        [*base, "--conntrack-cache-table-size=65536"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert refused.returncode == 2
    assert "invalid --conntrack-cache-table-size=65536" in refused.stderr
    assert "32768" in refused.stderr
    proc = await asyncio.create_subprocess_exec(
        "nsenter",
        f"--net=/run/netns/{pods.sim.netns}",
        *base,
        "--conntrack-cache-table-size=32768",
        "--conntrack-cache-cleanup-period=1",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    client_api = LocalClient(socket_path(runtime_dir, CONNTRACK_SOCKET), process="cleaner")
    try:
        for _ in range(100):
            if stale not in ct_entries(pods.dp):
                break
            await asyncio.sleep(0.1)
        assert stale not in ct_entries(pods.dp), "a periodic sweep removed the stale entry"
        stats = await client_api.get("/v1/stats", ProcessStats)
        assert stats.running
        assert int(stats.stats["total_sweeps"]) >= 1
        assert int(stats.stats["total_removed"]) >= 1
        metrics = await client_api.text("/metrics")
        assert "awsnodeagent_conntrack_sweeps_total" in metrics
    finally:
        proc.terminate()
        _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert not await asyncio.to_thread(os.path.exists, socket_path(runtime_dir, CONNTRACK_SOCKET))


async def test_entries_of_a_removed_pods_interface_go_at_once(
    pods: PodNet, tracked: tuple[SimPod, SimPod], remover: KernelRemover | None
) -> None:
    """A pod is deleted while its connection is still in the kernel's table (established
    TCP is kept for days): the entries tracked at its interface go at the next sweep, the
    other side's stay while the flow lives."""
    client, server = tracked
    from simnode.traffic import open_tcp

    conn = await open_tcp(netns=client.netns, target=server.ipv4, port=80)
    assert conn is not None
    try:
        assert await conn.exchange(b"hello", expect="server")
        entries = ct_entries(pods.dp)
        at_server = {
            k
            for k, _ in entries.items()
            if lay.NpCtKey.from_buffer_copy(k).ifindex == server.ifindex
        }
        at_client = set(entries) - at_server
        assert at_server
        assert at_client
        # with every interface live, nothing goes: the kernel still tracks the flows
        live_ifs = {client.ifindex, server.ifindex}
        res = await asyncio.to_thread(
            sweeper(pods.dp, pods.sim.netns, remover, interfaces=lambda: live_ifs).run
        )
        assert res.removed == 0
        assert set(ct_entries(pods.dp)) == set(entries)
        # the server pod is gone (its record removed): its interface's entries go
        live_ifs = {client.ifindex}
        res = await asyncio.to_thread(
            sweeper(pods.dp, pods.sim.netns, remover, interfaces=lambda: live_ifs).run
        )
        after = set(ct_entries(pods.dp))
        assert res.orphans == len(at_server), res
        assert not after & at_server
        assert at_client <= after
    finally:
        await conn.close()
