"""The flow-log shipper never writes credentials anywhere: not in its logs (debug level
included), not in the flow log or its spill file, not in its stats or metrics -- while
shipping, and while CloudWatch is unreachable and every call fails.

(Root-only sockets: tests/privileged/test_local_api.py; network listeners:
tests/resilience/test_api_fuzz.py; the chart's capabilities:
tests/privileged/test_chart_privileges.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

from common.apimodels import ProcessStats
from common.localapi import FLOWLOGS_SOCKET, LocalClient, Unavailable, socket_path
from simnode.cloudwatch import LocalCloudWatch
from tests.privileged.agentrig import AgentRig, eventually

ACCESS_KEY = "AKIAZZZZSECRETACCESS1"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzSECRETKEY"
SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLESESSIONTOKENzzzSECRET//////////wEaDA=="


async def test_no_credentials_in_logs_files_stats_or_metrics(rig: AgentRig, tmp_path: Path) -> None:
    cloudwatch = LocalCloudWatch(netns=rig.sim.netns)  # where the node's processes run
    cloudwatch.start()
    env = dict(
        cloudwatch.environment(),
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_SESSION_TOKEN=SESSION_TOKEN,
    )
    flow_log = tmp_path / "flows.log"
    try:
        server, client = await rig.add_pod("server"), await rig.add_pod("client")
        rig.apply(rig.policy_endpoint("deny-00000", policy="deny", targets=[server]))
        await rig.start_agent("--enable-policy-event-logs=true")
        await rig.ready()
        await rig.settle_agent()
        await rig.start(
            "flowlogs",
            "--enable-policy-event-logs=true",
            "--enable-cloudwatch-logs=true",
            "--log-level=debug",
            f"--log-file={flow_log}",
            env=env,
        )
        stats = LocalClient(socket_path(rig.runtime_dir, FLOWLOGS_SOCKET), process="flowlogs")

        async def shipped() -> bool:
            await rig.probe(client, server)
            try:
                st = await stats.get("/v1/stats", ProcessStats)
            except Unavailable:  # not listening yet
                return False
            return int(st.stats.get("cloudwatch_shipped", 0)) > 0

        await eventually(shipped, timeout=30, what="events shipped to CloudWatch")
        # CloudWatch goes away: every call fails and is retried (and logged)
        cloudwatch.stop()
        for _ in range(20):
            await rig.probe(client, server)
            await asyncio.sleep(0.2)
        await eventually(
            lambda: _logged(rig, "cloudwatch.retry"), timeout=30, what="failed calls logged"
        )
        outputs = {
            "process log": rig.log_file("flowlogs").read_text(errors="replace"),
            "flow log": flow_log.read_text(errors="replace") if flow_log.exists() else "",
            "spill file": _read(Path(str(flow_log) + ".cloudwatch-spill")),
            "stats": await stats.text("/v1/stats"),
            "metrics": await stats.text("/metrics"),
            "agent log": rig.log_path.read_text(errors="replace"),
        }
    finally:
        cloudwatch.stop()
    assert "Verdict DENY" in outputs["flow log"]
    assert "cloudwatch.retry" in outputs["process log"]
    for where, text in outputs.items():
        for secret in (SECRET_KEY, SESSION_TOKEN, ACCESS_KEY):
            assert secret not in text, f"{secret[:8]}... found in the {where}"


async def _logged(rig: AgentRig, event: str) -> bool:
    return event in await asyncio.to_thread(rig.log_file("flowlogs").read_text)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
