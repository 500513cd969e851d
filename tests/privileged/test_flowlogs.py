"""The flow-log shipper: real denied packets become lines in the file."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bpf import layout as lay
from bpf.datapath import DENY_ALL, Datapath, DirectionPolicy
from bpf.ruleset import PeerRule, PortRange, compile_rules
from common.apimodels import ProcessStats
from common.localapi import FLOWLOGS_SOCKET, LocalClient, socket_path
from simnode.node import SimNode, SimPod
from simnode.stack import REPO
from tests.privileged.podnet import PodNet


@pytest.fixture
async def pods(sim: SimNode, datapath: Datapath) -> AsyncIterator[PodNet]:
    pn = PodNet(sim, datapath)
    datapath.set_event_flags(emit_deny=True, emit_allow=True)
    try:
        yield pn
    finally:
        await pn.close()


async def start(pin_root: str, tmp_path: Path, *extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "flowlogs",
        "--enable-policy-event-logs=true",
        f"--bpf-pin-root={pin_root}",
        f"--runtime-dir={tmp_path / 'run'}",
        f"--log-file={tmp_path / 'flows.log'}",
        "--node-name=node-1",
        *extra,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def stop(proc: asyncio.subprocess.Process) -> None:
    proc.terminate()
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


async def lines_with(path: Path, *needles: str, timeout: float = 10) -> list[str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        text = await asyncio.to_thread(_read, path)
        found = [ln for ln in text.splitlines() if all(n in ln for n in needles)]
        if found:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"no line with {needles} in {path}")


async def test_denied_packets_become_lines(pods: PodNet, pin_root: str, tmp_path: Path) -> None:
    client, server = await pods.add_pod("client"), await pods.add_pod("server")
    policy = pods.dp.policy_id(namespace="default", name="allow-client")
    pods.program(
        server,
        ingress=DirectionPolicy(
            lay.NP_STATE_POLICIES_APPLIED,
            compile_rules(
                [
                    PeerRule(
                        _host(client),
                        policy_id=policy,
                        ports=(PortRange(lay.NP_PROTO_TCP, 81, 81),),
                    )
                ]
            ),
        ),
    )
    proc = await start(pin_root, tmp_path, "--log-level=info")
    log = tmp_path / "flows.log"
    try:
        await asyncio.sleep(0.5)  # the ring buffer is drained from now on
        assert not await pods.probe(client, server, port=80)
        assert await pods.probe(client, server, port=81)  # ACCEPT: not logged at info
        denied = await lines_with(log, "Verdict DENY", f"Src IP: {client.ipv4}")
        line = denied[0]
        assert (
            f"Dest IP: {server.ipv4} Dest Port: 80 Proto TCP Verdict DENY Direction ingress, "
            "Tier NETWORK_POLICY" in line
        )
        assert line.endswith("Pod default/server Policy -")
        text = await asyncio.to_thread(log.read_text)
        assert "Verdict ACCEPT" not in text
        api = LocalClient(socket_path(str(tmp_path / "run"), FLOWLOGS_SOCKET))
        stats = await api.get("/v1/stats", ProcessStats)
        assert int(stats.stats["events_written"]) >= 1
        assert int(stats.stats["events_filtered"]) >= 1, "ACCEPT events were filtered out"
        assert int(stats.stats["ring_overruns"]) == 0
        metrics = await api.text("/metrics")
        drop = [
            ln
            for ln in metrics.splitlines()
            if ln.startswith('network_policy_drop_count_total{direction="ingress"}')
        ]
        assert drop
        assert float(drop[0].split()[-1]) >= 1
        assert "awsnodeagent_flowlogs_dropped" in metrics
        by_pod = {
            ln.split()[0]: float(ln.split()[-1])
            for ln in metrics.splitlines()
            if ln.startswith("awsnodeagent_pod_denied_packets_total{")
        }
        series = (
            'awsnodeagent_pod_denied_packets_total{{direction="{}",namespace="default",pod="{}"}}'
        )
        assert by_pod[series.format("ingress", "server")] >= 1, by_pod
        assert by_pod[series.format("egress", "client")] == 0
        assert "awsnodeagent_flowlogs_cloudwatch_backlog 0.0" in metrics
        cli = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "cli", "flows", "-n", "5", f"--runtime-dir={tmp_path / 'run'}"],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            check=False,
        )
        assert cli.returncode == 0, cli.stderr
        assert "Verdict DENY" in cli.stdout
    finally:
        await stop(proc)


async def test_debug_level_logs_accepts_as_json(
    pods: PodNet, pin_root: str, tmp_path: Path
) -> None:
    client, server = await pods.add_pod("client"), await pods.add_pod("server")
    pods.program(client, egress=DENY_ALL)
    proc = await start(pin_root, tmp_path, "--log-level=debug", "--flow-log-format=json")
    log = tmp_path / "flows.log"
    try:
        await asyncio.sleep(0.5)
        assert await pods.probe(server, client, port=80, family=6)
        assert not await pods.probe(client, server, port=80, family=6)
        await lines_with(log, '"verdict":"ACCEPT"', '"pod":"default/client"')
        accepts = [
            json.loads(ln)
            for ln in await lines_with(log, '"verdict":"ACCEPT"', f'"src_ip":"{server.ipv6}"')
        ]
        # one new flow, judged (and logged) at both ends
        assert {(a["direction"], a["pod"]) for a in accepts} == {
            ("egress", "default/server"),
            ("ingress", "default/client"),
        }
        deny = json.loads((await lines_with(log, '"verdict":"DENY"'))[0])
        assert (deny["direction"], deny["pod"], deny["reason"]) == (
            "egress",
            "default/client",
            "default-deny",
        )
    finally:
        await stop(proc)


def _host(pod: SimPod) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"{pod.ipv4}/32")


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
