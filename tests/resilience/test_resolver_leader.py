"""np-resolver replicas with leader election: one writes, a standby takes over when the
leader is killed, and the handover rewrites and deletes nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from common.localapi import LocalClient, Unavailable, socket_path
from fakekube import store as fs
from fakekube.server import FakeKube
from resolver.main import RESOLVER_SOCKET, ResolverStatus

REPO = Path(__file__).resolve().parents[2]
LEASE, RENEW, RETRY = 3.0, 2.0, 0.25


class Replicas:
    def __init__(self, server: FakeKube, workdir: Path) -> None:
        self.server = server
        self.workdir = workdir
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    async def start(self, name: str) -> None:
        rundir = self.workdir / name
        rundir.mkdir(exist_ok=True)
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: ASYNC230, SIM115 (tiny, local)
        self.procs[name] = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "resolver",
            f"--kubeconfig={self.workdir / 'kubeconfig'}",
            f"--runtime-dir={rundir}",
            "--health-probe-bind-addr=127.0.0.1:0",
            "--metrics-bind-addr=127.0.0.1:0",
            "--log-level=info",
            "--endpoint-layout=controller",
            "--endpoint-chunk-size=2",
            f"--leader-election-lease-duration={LEASE}",
            f"--leader-election-renew-deadline={RENEW}",
            f"--leader-election-retry-period={RETRY}",
            stdout=log,
            stderr=log,
            env=dict(os.environ, POD_NAME=name, PYTHONPATH=str(REPO)),
        )
        log.close()

    async def status(self, name: str) -> ResolverStatus | None:
        client = LocalClient(
            socket_path(str(self.workdir / name), RESOLVER_SOCKET), process="resolver"
        )
        try:
            return await client.get("/v1/status", ResolverStatus, timeout=2)
        except Unavailable:
            return None

    def holder(self) -> str:
        try:
            lease = self.server.store.get(fs.LEASES, "kube-system", "np-resolver")
        except fs.ApiError:
            return ""
        return str(lease["spec"].get("holderIdentity") or "")

    async def close(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[Replicas]:
    server = FakeKube(bookmark_interval=0.2)
    await server.start()
    server.write_kubeconfig(str(tmp_path / "kubeconfig"))
    r = Replicas(server, tmp_path)
    try:
        yield r
    finally:
        await r.close()
        await server.stop()


def _pod(name: str, ip: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "x", "labels": labels},
        "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "hostIP": "172.31.0.1", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


async def until(check: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def _endpoints(server: FakeKube) -> dict[str, str]:
    return {
        o["metadata"]["name"]: o["metadata"]["resourceVersion"]
        for o in server.store.list(fs.POLICY_ENDPOINTS)[0]
    }


async def test_standby_takes_over_a_killed_leader_without_rewriting(replicas: Replicas) -> None:
    st = replicas.server.store
    st.create(fs.NAMESPACES, None, {"metadata": {"name": "x"}})
    for i in range(5):
        st.create(fs.PODS, "x", _pod(f"p{i}", f"10.0.0.{i + 1}", {"app": "a" if i < 3 else "b"}))
    st.create(
        fs.NETWORK_POLICIES,
        "x",
        {
            "metadata": {"name": "allow-b"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "a"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}],
                "egress": [{"to": [{"ipBlock": {"cidr": f"192.168.{i}.0/24"}} for i in range(5)]}],
            },
        },
    )

    await replicas.start("replica-a")

    async def a_leads() -> bool:
        return replicas.holder().startswith("replica-a_")

    await until(a_leads, 20, "replica-a holds the lease")
    await replicas.start("replica-b")

    async def written() -> bool:
        s = await replicas.status("replica-a")
        return bool(s and s.idle and s.policyendpoints > 0)

    await until(written, 20, "replica-a wrote the PolicyEndpoints")

    async def b_up() -> bool:
        s = await replicas.status("replica-b")
        return bool(s and s.synced)

    await until(b_up, 20, "replica-b synced as a standby")
    b = await replicas.status("replica-b")
    assert b is not None
    assert not b.leader
    assert b.writes == 0, "a standby writes nothing"
    before = _endpoints(replicas.server)
    assert len(before) >= 3, "pods and rules split over several objects (chunk size 2)"
    rv_at_kill = st.rv

    replicas.procs["replica-a"].send_signal(signal.SIGKILL)
    await replicas.procs["replica-a"].wait()

    async def b_leads() -> bool:
        return replicas.holder().startswith("replica-b_")

    took = await until(b_leads, LEASE + 5, "replica-b takes the lease")
    assert took <= LEASE + RETRY + 1.0, f"takeover took {took:.2f}s (lease {LEASE}s)"

    async def b_settled() -> bool:
        s = await replicas.status("replica-b")
        return bool(s and s.leader and s.idle and s.batches > 0)

    await until(b_settled, 20, "replica-b resolved everything as the leader")
    await asyncio.sleep(0.5)
    assert _endpoints(replicas.server) == before, "the handover rewrote an object"
    touched = [ev for ev in st.history if ev.rv > rv_at_kill and ev.resource == fs.POLICY_ENDPOINTS]
    assert touched == [], "no PolicyEndpoint written or deleted by the handover"

    # the new leader writes what changes
    st.create(fs.PODS, "x", _pod("p9", "10.0.0.9", {"app": "b"}))

    async def updated() -> bool:
        return any(ev.resource == fs.POLICY_ENDPOINTS for ev in st.history if ev.rv > rv_at_kill)

    await until(updated, 10, "replica-b writes the change")

    # SIGTERM releases the lease: a new replica takes over at once, not a lease later
    await replicas.start("replica-c")

    async def c_up() -> bool:
        s = await replicas.status("replica-c")
        return bool(s and s.synced)

    await until(c_up, 20, "replica-c synced")
    replicas.procs["replica-b"].send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(replicas.procs["replica-b"].wait(), 15) == 0

    async def c_leads() -> bool:
        return replicas.holder().startswith("replica-c_")

    took = await until(c_leads, LEASE + 5, "replica-c takes the released lease")
    assert took < LEASE, f"a released lease was taken after {took:.2f}s"
