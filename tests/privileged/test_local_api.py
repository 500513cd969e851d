"""The local API and the CLI against a real agent, real pinned maps and real traffic."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from common.apimodels import ExplainRequest, ExplainResult, NodeStatus, PodView, WaitResult
from common.localapi import AGENT_SOCKET, ApiError, LocalClient, socket_path
from simnode.node import SimPod
from tests import chartqueries
from tests.privileged.agentrig import AgentRig, allow_from
from tests.unit.test_chart import MONITORING
from tests.unit.test_chart import render as render_chart


@pytest.fixture
async def running(rig: AgentRig) -> tuple[AgentRig, SimPod, SimPod, SimPod, LocalClient]:
    server = await rig.add_pod("server", ports=(80, 81, 443))
    c1, c2 = await rig.add_pod("client1"), await rig.add_pod("client2")
    await rig.start_agent()
    await rig.ready()
    rig.apply(
        rig.policy_endpoint(
            "web-a1b2c",
            policy="web",
            targets=[server],
            ingress=[
                *allow_from(c1, ports=[{"protocol": "TCP", "port": 80}, {"protocol": "UDP"}]),
                {
                    "cidr": "10.66.0.0/16",
                    "except": [f"{c2.ipv4}/32"],
                    "ports": [{"protocol": "TCP", "port": 443}],
                },
            ],
        )
    )
    client = LocalClient(socket_path(rig.runtime_dir, AGENT_SOCKET))
    res = await client.get(
        "/v1/wait", WaitResult, params=[("pod", "default/server"), ("timeout", "10")], timeout=15
    )
    assert res.programmed, res.pending
    return rig, server, c1, c2, client


async def test_status_and_pod_views(
    running: tuple[AgentRig, SimPod, SimPod, SimPod, LocalClient],
) -> None:
    _rig, server, c1, _c2, client = running
    st = await client.get("/v1/status", NodeStatus)
    assert (st.node, st.mode, st.ready) == ("node-1", "standard", True)
    assert (st.pods, st.programmed, st.policyendpoints) == (3, 3, 1)
    assert not st.conntrack.running
    assert "not running" in st.conntrack.error
    view = await client.get("/v1/pods/default/server", PodView)
    assert view.attached
    assert view.interface == server.host_veth
    assert view.programmed
    assert view.ingress is not None
    assert view.ingress.state == "POLICIES_APPLIED"
    assert view.egress is not None
    assert view.egress.state == "DEFAULT_ALLOW"
    rules = {r.cidr: r.ports for r in view.ingress.rules}
    c1_rules = rules[f"{c1.ipv4}/32"]
    assert {(p.protocol, p.start_port, p.end_port) for p in c1_rules} == {
        ("TCP", 80, 80),
        ("TCP", 443, 443),
        ("UDP", 0, 65535),
    }, "broader CIDR's 443 merged in"
    assert all(p.policy == "default/web" for p in c1_rules)
    assert view.policies[0].programmed_generation == view.policies[0].generation == 1
    with pytest.raises(ApiError) as missing:
        await client.get("/v1/pods/default/nope", PodView)
    assert missing.value.status == 404


CASES = [
    ("client1", 80, "TCP"),
    ("client1", 81, "TCP"),
    ("client1", 53, "UDP"),
    ("client1", 443, "TCP"),
    ("client2", 80, "TCP"),
    ("client2", 443, "TCP"),
    ("client2", 81, "UDP"),
]


async def test_explain_agrees_with_real_traffic(
    running: tuple[AgentRig, SimPod, SimPod, SimPod, LocalClient],
) -> None:
    rig, server, _c1, _c2, client = running
    for family in (4, 6):
        for name, port, proto in CASES:
            peer = rig.pods[name]
            req = ExplainRequest(
                pod="default/server",
                peer=str(peer.address(family)),
                port=port,
                protocol=proto,  # type: ignore[arg-type]
            )
            res = await client.request("POST", "/v1/explain", ExplainResult, body=req)
            listening = port in (80, 81, 443)
            observed = (
                await rig.probe(peer, server, port=port, protocol=proto, family=family)
                if listening
                else None
            )
            if observed is not None:
                assert (res.verdict == "ALLOW") is observed, (family, name, port, proto, res)
    # reasons are specific
    res = await client.request(
        "POST",
        "/v1/explain",
        ExplainResult,
        body=ExplainRequest(pod="default/server", peer=str(rig.pods["client2"].ipv4), port=443),
    )
    assert (res.verdict, res.reason, res.matched_cidr) == (
        "DENY",
        "no-port-match",
        f"{rig.pods['client2'].ipv4}/32",
    )
    assert "except" in res.summary
    res = await client.request(
        "POST",
        "/v1/explain",
        ExplainResult,
        body=ExplainRequest(pod="default/server", peer=str(rig.pods["client1"].ipv4), port=80),
    )
    assert (res.verdict, res.policy) == ("ALLOW", "default/web")
    assert res.rule is not None
    assert (res.rule.start_port, res.rule.end_port) == (80, 80)
    res = await client.request(
        "POST",
        "/v1/explain",
        ExplainResult,
        body=ExplainRequest(pod="default/server", peer=str(rig.sim.node_ipv4), port=10250),
    )
    assert (res.verdict, res.reason) == ("ALLOW", "host")
    res = await client.request(
        "POST",
        "/v1/explain",
        ExplainResult,
        body=ExplainRequest(pod="default/server", peer="192.0.2.1", port=80, direction="egress"),
    )
    assert (res.verdict, res.reason) == ("ALLOW", "default-allow")


async def test_bad_requests_are_4xx(
    running: tuple[AgentRig, SimPod, SimPod, SimPod, LocalClient],
) -> None:
    rig, *_ = running
    bad = [
        '{"pod": "server", "peer": "10.0.0.1", "port": 80}',
        '{"pod": "default/server", "peer": "not-an-ip", "port": 80}',
        '{"pod": "default/server", "peer": "10.0.0.1", "port": 70000}',
        "not json",
    ]
    for body in bad:
        status = await asyncio.to_thread(_raw, rig, "POST", "/v1/explain", body)
        assert status == 400, body
    assert await asyncio.to_thread(_raw, rig, "GET", "/v1/wait?timeout=soon") == 400
    assert await asyncio.to_thread(_raw, rig, "GET", "/v2/status") == 404


def _raw(rig: AgentRig, method: str, path: str, body: str | None = None) -> int:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(socket_path(rig.runtime_dir, AGENT_SOCKET))
    conn = http.client.HTTPConnection("localhost")
    conn.sock = sock
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"})
        return conn.getresponse().status
    finally:
        conn.close()


async def test_wait_trusts_a_current_view_and_reads_a_stale_one(
    running: tuple[AgentRig, SimPod, SimPod, SimPod, LocalClient],
) -> None:
    """/v1/wait asks the API server for its current resourceVersion: a view the watch
    has brought up to it is the API's, so the namespace's PolicyEndpoints need not be
    read; a view behind it (an event still in flight) is checked against the objects,
    and the change is waited for."""
    rig, server, c1, c2, client = running
    params = [("pod", "default/server"), ("timeout", "10")]
    rig.apply(
        rig.policy_endpoint("web-a1b2c", policy="web", targets=[server], ingress=allow_from(c1))
    )
    res = await client.get("/v1/wait", WaitResult, params=params, timeout=15)
    assert res.programmed
    assert res.checked_with_api
    assert res.api_check == "resource-version"

    rig.api.watch_delay["policyendpoints"] = 1.5  # the change's event is in flight
    try:
        rig.apply(
            rig.policy_endpoint("web-a1b2c", policy="web", targets=[server], ingress=allow_from(c2))
        )
        res = await client.get("/v1/wait", WaitResult, params=params, timeout=15)
    finally:
        rig.api.watch_delay.clear()
    assert res.programmed
    # the first check read the objects (the watch was behind), saw a generation the
    # agent had not, and so waited for it; trusting the stale view would answer at once
    assert res.waited >= 1.0, "answered before the change arrived"
    assert await rig.matrix([(c1, server, 80, "TCP", 4), (c2, server, 80, "TCP", 4)]) == [
        False,
        True,
    ]


async def test_wait_blocks_until_a_change_is_programmed(
    running: tuple[AgentRig, SimPod, SimPod, SimPod, LocalClient],
) -> None:
    rig, server, c1, c2, client = running
    rig.apply(
        rig.policy_endpoint("web-a1b2c", policy="web", targets=[server], ingress=allow_from(c2))
    )
    res = await client.get(
        "/v1/wait", WaitResult, params=[("pod", "default/server"), ("timeout", "10")], timeout=15
    )
    assert res.programmed
    assert res.checked_with_api  # the update was waited for, even if not yet watched
    # programmed means enforced: the change is visible to traffic right away
    assert await rig.matrix([(c1, server, 80, "TCP", 4), (c2, server, 80, "TCP", 4)]) == [
        False,
        True,
    ]
    # without the API server the agent answers from its own view, and says so
    await rig.api.pause()
    try:
        local = await client.get(
            "/v1/wait",
            WaitResult,
            params=[("pod", "default/server"), ("timeout", "10")],
            timeout=30,
        )
    finally:
        await rig.api.resume()
    assert local.programmed
    assert not local.checked_with_api
    never = await client.get(
        "/v1/wait", WaitResult, params=[("pod", "default/ghost"), ("timeout", "0.5")], timeout=5
    )
    assert not never.programmed
    assert never.pending == ["default/ghost"]
    done = await rig.acli("wait", "default/server", "--timeout", "5")
    assert done.returncode == 0, done.stderr
    ghost = await rig.acli("wait", "default/ghost", "--timeout", "0.3")
    assert ghost.returncode == 1
    assert "default/ghost" in ghost.stdout
    # a rejected generation is never "programmed" (the last valid one stays in force)
    rig.apply(
        rig.policy_endpoint(
            "web-a1b2c", policy="web", targets=[server], ingress=[{"cidr": "10.0.0.0/33"}]
        )
    )
    rejected = await client.get(
        "/v1/wait", WaitResult, params=[("pod", "default/server"), ("timeout", "1")], timeout=10
    )
    assert not rejected.programmed
    assert rejected.pending == ["default/server"]
    assert await rig.matrix([(c1, server, 80, "TCP", 4), (c2, server, 80, "TCP", 4)]) == [
        False,
        True,
    ]


async def test_sockets_are_root_only(rig: AgentRig) -> None:
    # a runtime directory whose parents anyone may traverse, so that only the socket's
    # own mode and the server's credential check stand in the way
    rig.runtime_dir = f"/tmp/npt-run-{uuid.uuid4().hex[:8]}"
    try:
        await rig.add_pod("server")
        await rig.start_agent()
        await rig.ready()
        path = socket_path(rig.runtime_dir, AGENT_SOCKET)
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert os.stat(rig.runtime_dir).st_mode & 0o777 == 0o700
        os.chmod(rig.runtime_dir, 0o755)
        script = (
            "import http.client, socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n"
            "    print('EACCES'); sys.exit(0)\n"
            "c = http.client.HTTPConnection('x'); c.sock = s\n"
            "c.request('GET', '/v1/status'); print(c.getresponse().status)\n"
        )
        as_nobody = [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            sys.executable,
            "-c",
            script,
            path,
        ]
        refused = await asyncio.to_thread(
            subprocess.run, as_nobody, capture_output=True, text=True, check=False
        )
        assert refused.stdout.strip() == "EACCES", refused.stderr
        os.chmod(path, 0o666)  # past the file mode, the peer's credentials are checked
        forbidden = await asyncio.to_thread(
            subprocess.run, as_nobody, capture_output=True, text=True, check=False
        )
        assert forbidden.stdout.strip() == "403", forbidden.stderr
        as_root = await asyncio.to_thread(
            subprocess.run, as_nobody[4:], capture_output=True, text=True, check=False
        )
        assert as_root.stdout.strip() == "200", as_root.stderr
    finally:
        await rig.stop_agent()
        shutil.rmtree(rig.runtime_dir, ignore_errors=True)


def _write_stale(directory: str, path: str) -> None:
    os.makedirs(directory, exist_ok=True)
    Path(path).write_text("stale")


async def test_stale_socket_is_replaced_and_removed_at_exit(rig: AgentRig) -> None:
    await rig.add_pod("server")
    path = socket_path(rig.runtime_dir, AGENT_SOCKET)
    await asyncio.to_thread(_write_stale, rig.runtime_dir, path)
    await rig.start_agent()
    await rig.ready()
    client = LocalClient(path)
    assert (await client.get("/v1/status", NodeStatus)).ready
    await rig.stop_agent()
    assert not await asyncio.to_thread(os.path.exists, path)
    down = await rig.acli("status")
    assert down.returncode == 1
    assert "agent is not running (no socket at" in down.stderr


async def test_cli_commands(running: tuple[AgentRig, SimPod, SimPod, SimPod, LocalClient]) -> None:
    rig, _server, c1, c2, _ = running
    status = await rig.acli("status")
    assert status.returncode == 0, status.stderr
    assert re.search(r"^pods \(programmed/local\)\s+3/3$", status.stdout, re.M), status.stdout
    pods = await rig.acli("pods")
    assert "server" in pods.stdout
    assert "POLICIES_APPLIED" in pods.stdout
    one = json.loads((await rig.acli("pods", "default/server", "--json")).stdout)
    assert one["ingress"]["state"] == "POLICIES_APPLIED"
    ex = await rig.acli("explain", "default/server", "--peer", str(c2.ipv4), "--port", "80")
    assert ex.stdout.startswith("DENY:"), ex.stdout
    ok = json.loads(
        (
            await rig.acli(
                "explain", "default/server", "--peer", str(c1.ipv6), "--port", "80", "--json"
            )
        ).stdout
    )
    assert (ok["verdict"], ok["policy"]) == ("ALLOW", "default/web")
    pols = await rig.acli("policies")
    assert "web-a1b2c@1" in pols.stdout
    assert "default/server" in pols.stdout


async def test_ebpf_commands_in_the_reference_layout(
    running: tuple[AgentRig, SimPod, SimPod, SimPod, LocalClient],
) -> None:
    rig, _server, c1, c2, _ = running
    progs = await rig.acli("ebpf", "progs")
    assert progs.stdout.startswith("Programs currently loaded : \n")
    for prog_id in rig.pinned_program_ids():
        assert f"Type : 3 ID : {prog_id} Associated maps count : " in progs.stdout
    assert "=" * 88 in progs.stdout
    maps = await rig.acli("ebpf", "maps")
    assert maps.stdout.startswith("Maps currently loaded : \n")
    assert "Keysize 24 Valuesize 4 MaxEntries" in maps.stdout  # an LPM rule trie
    loaded = json.loads((await rig.acli("ebpf", "loaded-ebpfdata", "--json")).stdout)
    mine = [e for e in loaded if e["pod"] == "default/server" and e["direction"] == "ingress"]
    assert len(mine) == 1
    text = (await rig.acli("ebpf", "loaded-ebpfdata")).stdout
    assert "Pod Identifier : server-default  Direction : ingress" in text
    trie_map = next(m["id"] for m in mine[0]["maps"] if m["name"] == "ingress_map")
    assert trie_map > 0
    dump = (await rig.acli("ebpf", "dump-maps", str(trie_map))).stdout
    assert f"Key : IP/Prefixlen - {c1.ipv4}/32 \n-------------------\nValue Entry :  0\n" in dump
    assert "Protocol -  UDP\nStartPort -  0\nEndport -  65535\nPolicy -  default/web" in dump
    assert f"Key : IP/Prefixlen - {c2.ipv4}/32 " in dump
    assert "Protocol -  DENY (except)" in dump
    assert dump.rstrip().endswith("*     Done reading all entries")


def test_cli_reports_a_missing_datapath_clearly(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "cli", "ebpf", "maps", f"--bpf-pin-root={tmp_path}/nothing"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 1
    assert "no datapath pinned under" in run.stderr


async def test_status_and_metrics_include_the_other_processes(
    running: tuple[AgentRig, SimPod, SimPod, SimPod, LocalClient],
) -> None:
    rig, server, _c1, c2, client = running
    log_file = str(Path(rig.runtime_dir).parent / "flows.log")
    await rig.start_process("conntrack", "--conntrack-cache-cleanup-period=1")
    await rig.start_process(
        "flowlogs", "--enable-policy-event-logs=true", f"--log-file={log_file}", "--log-level=info"
    )
    st = None
    for _ in range(100):
        st = await client.get("/v1/status", NodeStatus)
        if st.conntrack.running and st.flowlogs.running:
            break
        await asyncio.sleep(0.1)
    assert st is not None
    assert st.conntrack.running, st.conntrack.error
    assert st.flowlogs.running, st.flowlogs.error
    assert int(st.flowlogs.stats["enabled"]) == 1
    assert not await rig.probe(c2, server, port=80)
    _, metrics = await rig.http(8162, "/metrics")
    for name in (
        "awsnodeagent_policy_programming_latency_seconds",
        "awsnodeagent_conntrack_sweeps_total",
        "network_policy_drop_count_total",
        "awsnodeagent_flowlogs_events_total",
    ):
        assert name in metrics, name
    # the chart's dashboard and alerts read only what this scrape has: a renamed
    # metric fails here, not on a dashboard
    exported = chartqueries.exported(metrics)
    assert "awsnodeagent_ready 1.0" in metrics
    for expr in chartqueries.queries(render_chart(MONITORING)):
        missing = chartqueries.metric_names(expr) - exported
        assert not missing, f"{expr}: {sorted(missing)} not exported"
    ct = await rig.acli("conntrack")
    assert ct.returncode == 0, ct.stderr
    assert "total_sweeps=" in ct.stdout
    status = await rig.acli("status")
    assert re.search(r"^conntrack cleaner\s+running$", status.stdout, re.M), status.stdout
    assert re.search(r"^flow-log shipper\s+running$", status.stdout, re.M), status.stdout
