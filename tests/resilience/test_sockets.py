"""The health and metrics ports listen on every address: no peer may exhaust the
agent's descriptors or connections with idle or partial requests. The real agent under
a file limit of 512 (as a container runtime may set it), real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from simnode.netns import socket_in
from tests.privileged.agentrig import AgentRig, allow_from, eventually

NOFILE = 512
HOLD = 300  # per port: far over the connection cap, together over the file limit


async def _open(rig: AgentRig, port: int, count: int, data: bytes) -> list[socket.socket]:
    loop = asyncio.get_running_loop()
    socks = []
    for _ in range(count):
        s = socket_in(rig.sim.netns, socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", port)), 2)
            if data:
                await loop.sock_sendall(s, data)
        except (OSError, TimeoutError):
            s.close()
            continue
        socks.append(s)
    return socks


def _closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset


async def test_idle_and_partial_connections_cannot_stop_the_agent(rig: AgentRig) -> None:
    web, ok, other = (await rig.add_pod("web"), await rig.add_pod("ok"), await rig.add_pod("other"))
    await rig.start(
        "agent",
        "--enable-network-policy=true",
        "--metrics-bind-addr=127.0.0.1:8162",
        "--health-probe-bind-addr=127.0.0.1:8163",
        wrap=["prlimit", f"--nofile={NOFILE}:{NOFILE}"],
    )
    await rig.ready()
    held: list[socket.socket] = []
    try:
        # idle connections on the metrics port, partial requests on the health port
        held += await _open(rig, 8162, HOLD, b"")
        held += await _open(rig, 8163, HOLD, b"GET /readyz HTTP/1.1\r\nHost: x\r\n")
        await asyncio.sleep(0.5)
        # the agent holds at most 64 per port; the rest were closed (at once, or when
        # their head did not come in time: on a slow machine both happen meanwhile)
        # (a connection still in the listen backlog is closed once accepted)
        still_open = 2 * HOLD

        async def bounded() -> bool:
            nonlocal still_open
            still_open = sum(1 for s in held if not _closed_by_peer(s))
            return still_open <= 2 * 64

        await eventually(bounded, timeout=3, what=lambda: f"{still_open} connections held")
        # policy programming goes on: BPF maps still get descriptors
        cases = [(ok, web, 80, "TCP", 4), (other, web, 80, "TCP", 4)]
        for i in range(3):  # a few changes, each needing new tries (maps)
            rig.apply(
                rig.policy_endpoint("allow-ok", targets=[web], ingress=allow_from(ok)[: 1 + i % 2])
            )
            await rig.converge(cases, [True, False])
        # the held partial requests are cut after the header timeout; probes answer
        await asyncio.sleep(6)
        assert all(_closed_by_peer(s) for s in held[HOLD:]), "partial requests cut"
        status, body = await rig.http(8163, "/readyz")
        assert status == 200, body
        status, metrics = await rig.http(8162, "/metrics")
        assert status == 200
        assert "awsnodeagent_" in metrics
    finally:
        for s in held:
            with contextlib.suppress(OSError):
                s.close()
    events = [ln.get("event") for ln in rig.log_lines()]
    assert "enforcer.program_failed" not in events
    assert "http.connection_limit" in events
    limit = [ln for ln in rig.log_lines() if ln.get("event") == "process.file_limit"]
    assert limit
    assert limit[0]["soft"] == NOFILE
