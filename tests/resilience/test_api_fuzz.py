"""Malformed requests to the local APIs (generated): every socket of every process answers
with a status below 500, in time, and keeps serving. Also: the processes listen on the
network only for metrics and health."""

from __future__ import annotations

import asyncio
import functools
import http.client
import json
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.localapi import AGENT_SOCKET, CONNTRACK_SOCKET, FLOWLOGS_SOCKET, socket_path
from resolver.main import RESOLVER_SOCKET
from simnode.node import SimNode
from tests.privileged.agentrig import AgentRig, allow_from, eventually

SOCKETS = (AGENT_SOCKET, CONNTRACK_SOCKET, FLOWLOGS_SOCKET, RESOLVER_SOCKET)
ROUTES = (
    "/v1/status",
    "/v1/pods",
    "/v1/pods/default/server",
    "/v1/pods/x",
    "/v1/policies",
    "/v1/explain",
    "/v1/wait",
    "/v1/stats",
    "/v1/sweep",
    "/v1/flows",
    "/metrics",
    "/",
    "/v1",
    "/v2/status",
    "/v1/pods/default/server/extra",
    "/../etc/passwd",
    "/v1/pods/%00/%ff",
    "/v1/" + "a" * 5000,
)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


@pytest.fixture
async def running(sim: SimNode, pin_root: str, tmp_path: Path) -> AsyncIterator[AgentRig]:
    """The four processes up, a policy programmed."""
    r = AgentRig(sim, pin_root=pin_root, workdir=tmp_path)
    await r.start_api()
    try:
        server, client = await r.add_pod("server"), await r.add_pod("client")
        r.apply(
            r.policy_endpoint(
                "web-12345", policy="web", targets=[server], ingress=allow_from(client)
            )
        )
        await r.start_agent("--log-level=info")
        await r.start("conntrack", "--conntrack-cache-cleanup-period=1")
        await r.start(
            "flowlogs", "--enable-policy-event-logs=true", f"--log-file={tmp_path / 'flows.log'}"
        )
        await r.start("resolver")
        await r.ready()
        await r.settle_agent()
        for name in SOCKETS:
            path = Path(socket_path(r.runtime_dir, name))
            await eventually(functools.partial(_exists, path), timeout=20, what=f"{path} listening")
        yield r
    finally:
        await r.close()


junk_text = st.text(max_size=40) | st.sampled_from(["", "%", "\u0000", "🙂", "a/b/c", "../.."])
query_value = junk_text | st.sampled_from(
    [
        "0",
        "0.2",
        "-1",
        "nan",
        "inf",
        "-inf",
        "1e999",
        "abc",
        "default/server",
        "default/ghost",
        "default",
        "/",
        "TCP",
        "ingress",
        "10.0.0.1",
        "99999999999999",
    ]
)
json_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | junk_text,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["pod", "peer", "port", "protocol", "direction", "x"]) | junk_text,
            inner,
            max_size=5,
        )
    ),
    max_leaves=10,
)
body = st.one_of(
    st.none(),
    st.binary(max_size=200),
    json_junk.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "pod": st.sampled_from(["default/server", "default/ghost", "x", "a/b/c", ""]),
            "peer": st.sampled_from(["10.66.0.1", "fd00::1", "nonsense", "", "1.2.3.4/8"]),
            "port": st.integers(-10, 70000) | junk_text,
            "protocol": st.sampled_from(["TCP", "UDP", "SCTP", "ICMP", "GRE", ""]),
            "direction": st.sampled_from(["ingress", "egress", "sideways"]),
        },
    ).map(lambda v: json.dumps(v).encode()),
    st.just(b"{" * 10_000),
    st.just(b"x" * 2_000_000),
)
request = st.fixed_dictionaries(
    {
        "socket": st.sampled_from(SOCKETS),
        "method": st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
        "path": st.sampled_from(ROUTES) | junk_text.map(lambda t: "/" + t.replace(" ", "")),
        "query": st.dictionaries(
            st.sampled_from(["timeout", "pod", "limit", "x"]) | junk_text, query_value, max_size=3
        ),
        "content_type": st.sampled_from(["application/json", "text/plain", "", "multipart/x"]),
        "body": body,
    }
)


async def _exists(path: Path) -> bool:
    return await asyncio.to_thread(path.exists)


def _send(rig: AgentRig, req: dict[str, Any]) -> int:
    from urllib.parse import quote, urlencode

    query = urlencode(req["query"])
    if "timeout" not in req["query"]:
        query = "timeout=0.2&" + query  # a valid wait blocks as long as asked: keep it short
    path = quote(req["path"], safe="/%") + "?" + query
    conn = UnixHTTPConnection(socket_path(rig.runtime_dir, req["socket"]), timeout=15)
    try:
        headers = {"Content-Type": req["content_type"]} if req["content_type"] else {}
        conn.request(req["method"], path, body=req["body"], headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(req=request)
async def test_malformed_requests_get_4xx_never_500_or_a_hang(
    running: AgentRig, req: dict[str, Any]
) -> None:
    rig = running
    cut: BaseException | None = None
    status = 0
    try:
        # sent from a thread: the loop keeps serving the fake API server meanwhile
        status = await asyncio.to_thread(_send, rig, req)
    except (ConnectionError, http.client.RemoteDisconnected) as exc:
        cut = exc
    except TimeoutError:
        raise AssertionError(f"no answer within 15 s: {req}") from None
    if cut is not None:
        # a body over the size limit may be cut short after the 413: accept only that
        assert req["body"] is not None, (req, cut)
        assert len(req["body"]) > 1_000_000, (req, cut)
    else:
        assert status < 500, (status, req)
    for name, proc in rig.procs.items():
        assert proc.returncode is None, f"{name} exited"


def test_only_metrics_and_health_listen_on_the_network(running: AgentRig) -> None:
    """Inside the node's network namespace: TCP/UDP sockets owned by the node processes.
    The agent: metrics and health; the resolver: health and the controller's metrics
    (its pod's own network in a cluster); the cleaner and the shipper: nothing."""
    pids = {name: proc.pid for name, proc in running.procs.items()}
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{running.sim.netns}", "ss", "-Hlntup"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    listening: dict[str, list[str]] = {name: [] for name in pids}
    for line in out.splitlines():
        for name, pid in pids.items():
            if f"pid={pid}," in line:
                listening[name].append(line.split()[4].rsplit(":", 1)[1])
    assert sorted(listening["agent"]) == ["8162", "8163"], out
    assert len(listening["resolver"]) == 2, out  # --health-probe- and --metrics-bind-addr
    assert listening["conntrack"] == []
    assert listening["flowlogs"] == []
