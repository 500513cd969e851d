"""The chart's capabilities are the minimum that work: each process, run with exactly
the capabilities its container gets (and nothing else, not root's full set), does its
job; without any one of them, it cannot. Each stops within its shutdown timeout, which
the pod's grace period outlasts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from common.apimodels import ExplainRequest, ExplainResult
from tests.privileged.agentrig import AGENT_FLAGS, AgentRig, eventually
from tests.unit.test_chart import containers, render

# flags whose chart values point at the node's real paths and ports; the rig sets its own
LOCAL = (
    "--bpf-pin-root",
    "--runtime-dir",
    "--log-file",
    "--pod-interface-prefixes",
    "--metrics-bind-addr",
    "--health-probe-bind-addr",
    "--conntrack-cache-table-size",
    "--conntrack-cache-cleanup-period",
)
CHART = containers(render({"nodeAgent": {"enablePolicyEventLogs": True, "logLevel": "info"}}))


def caps(container: str) -> list[str]:
    return list(CHART[container]["securityContext"]["capabilities"]["add"])


def chart_args(container: str) -> list[str]:
    return [a for a in CHART[container]["args"] if not a.startswith(LOCAL)]


def only(capabilities: list[str]) -> list[str]:
    """A command prefix giving the process exactly these capabilities, as a container
    runtime does (bounding set; uid 0 keeps nothing else)."""
    keep = ",".join(f"+{c.lower()}" for c in capabilities)
    return [
        "setpriv",
        "--inh-caps=-all",
        f"--bounding-set=-all{',' + keep if keep else ''}",
        "--no-new-privs",
    ]


async def test_each_process_works_with_its_containers_capabilities(
    rig: AgentRig, tmp_path: Path
) -> None:
    assert caps("agent") == ["BPF", "NET_ADMIN", "PERFMON"]
    a, b, c = await rig.add_pod("a"), await rig.add_pod("b"), await rig.add_pod("c")
    flow_log = tmp_path / "flows.log"
    await rig.start(
        "agent", *chart_args("agent"), *AGENT_FLAGS, "--log-level=info", wrap=only(caps("agent"))
    )
    await rig.ready(timeout=20)
    rig.apply(
        rig.policy_endpoint("web-11111", policy="web", targets=[a], ingress=[{"cidr": str(b.ipv4)}])
    )
    await rig.converge([(b, a, 80, "TCP", 4), (c, a, 80, "TCP", 4)], [True, False])
    # explain reads the live tries by their pins: no CAP_SYS_ADMIN needed
    why = await rig.agent.request(
        "POST",
        "/v1/explain",
        ExplainResult,
        body=ExplainRequest(pod="default/a", peer=str(c.ipv4), port=80),
    )
    assert why.verdict == "DENY"

    await rig.start(
        "conntrack",
        *chart_args("conntrack"),
        "--conntrack-cache-cleanup-period=1",
        wrap=only(caps("conntrack")),
    )
    await rig.start(
        "flowlogs", *chart_args("flowlogs"), f"--log-file={flow_log}", wrap=only(caps("flowlogs"))
    )

    async def denied_flow_logged() -> bool:
        await rig.probe(c, a)
        return flow_log.exists() and "Verdict DENY" in flow_log.read_text()

    await eventually(denied_flow_logged, timeout=15, what="a DENY line from np-flowlogs")
    await eventually(
        lambda: _logged(rig, "conntrack", "conntrack.swept"), timeout=15, what="a conntrack sweep"
    )
    assert not await _logged(rig, "conntrack", "sweep_failed")

    # SIGTERM: every process is gone well within its --shutdown-timeout (chart: 10 s,
    # grace period 15 s)
    timeout = float(
        next(a for a in CHART["agent"]["args"] if a.startswith("--shutdown-timeout=")).split("=")[1]
    )
    for name in ("flowlogs", "conntrack", "agent"):
        started = time.monotonic()
        assert await rig.stop(name, timeout=timeout) == 0, name
        assert time.monotonic() - started < timeout


async def _logged(rig: AgentRig, name: str, event: str) -> bool:
    return event in await asyncio.to_thread(rig.log_file(name).read_text)


@pytest.mark.parametrize("dropped", ["BPF", "NET_ADMIN", "PERFMON"])
async def test_the_agent_needs_each_of_its_capabilities(rig: AgentRig, dropped: str) -> None:
    await rig.add_pod("a")
    proc = await rig.start(
        "agent",
        *chart_args("agent"),
        *AGENT_FLAGS,
        wrap=only([c for c in caps("agent") if c != dropped]),
    )
    rc = await asyncio.wait_for(proc.wait(), 30)
    assert rc != 0
    assert not await rig._ready()
    assert (
        "Operation not permitted" in rig.log_path.read_text()
        or "Permission denied" in rig.log_path.read_text()
    )


async def test_the_cleaner_needs_net_admin(rig: AgentRig) -> None:
    await rig.add_pod("a")
    await rig.start_agent()
    await rig.ready()
    await rig.start(
        "conntrack",
        *chart_args("conntrack"),
        "--conntrack-cache-cleanup-period=1",
        wrap=only([c for c in caps("conntrack") if c != "NET_ADMIN"]),
    )
    await eventually(
        lambda: _logged(rig, "conntrack", "conntrack.sweep_failed"),
        timeout=15,
        what="the sweep refused without NET_ADMIN",
    )
    assert "Operation not permitted" in rig.log_file("conntrack").read_text()
