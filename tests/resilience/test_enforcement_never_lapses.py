"""Enforcement never lapses: fresh flows from an allowed and a denied client run without
pause while the enforcer is stopped, killed mid-reconcile, restarted, upgraded to new
programs, and while the API server drops connections, loses its history (410) and is
unreachable for a minute. Allowed datagrams dropped and denied datagrams passed are
counted per fault; both must be zero."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from bpf.attach import attachment
from bpf.objects import Program
from common.netlink import Netlink
from simnode.node import SimPod
from simnode.stack import REPO
from simnode.traffic import PodServer
from tests.privileged.agentrig import AgentRig
from tests.resilience.flows import FlowCounter

LOAD_PODS = 40  # other pods whose large policies make reconciles long
LOAD_CIDRS = 1000
KILL_DELAYS = (0.0, 0.05, 0.1, 0.2, 0.35, 0.6)  # seconds after a big change


def _load_policy(rig: AgentRig, i: int, pod: SimPod, generation: int) -> dict[str, Any]:
    base = 0x0B000000 + (i * LOAD_CIDRS + generation % 7) * 16
    cidrs = [
        f"{(base + j * 16) >> 24 & 255}.{(base + j * 16) >> 16 & 255}."
        f"{(base + j * 16) >> 8 & 255}.{(base + j * 16) & 255}/28"
        for j in range(LOAD_CIDRS)
    ]
    return rig.policy_endpoint(
        f"load{i}-00000", policy=f"load{i}", targets=[pod], ingress=[{"cidr": c} for c in cidrs]
    )


def _server_policy(rig: AgentRig, server: SimPod, good: SimPod, generation: int) -> dict[str, Any]:
    """Allows ``good`` (UDP, any port); the rest changes with ``generation`` (an address
    nobody uses) so that every change really swaps the server's rules."""
    return rig.policy_endpoint(
        "server-00000",
        policy="server",
        targets=[server],
        ingress=[
            {"cidr": f"{good.ipv4}/32", "ports": [{"protocol": "UDP"}]},
            {"cidr": f"192.0.2.{generation % 250}/32"},
        ],
    )


async def _build_variant(out: Path) -> str:
    """The datapath built with one harmless extra instruction: an upgrade's programs."""
    obj = out / "policy-variant.bpf.o"
    proc = await asyncio.create_subprocess_exec(
        "make",
        "-s",
        "-C",
        str(REPO / "bpf"),
        "check",
        f"OUT={out}",
        "EXTRA_CFLAGS=-DNP_BUILD_VARIANT=2",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    os.rename(out / "policy.bpf.o", obj)
    return str(obj)


async def _attached_tag(rig: AgentRig, ifindex: int) -> str:
    async with Netlink(netns=rig.sim.netns) as nl:
        att = await attachment(nl, ifindex)
    prog = Program.from_id(att.ingress_prog_id)
    try:
        return prog.info.tag
    finally:
        prog.close()


class Faults:
    """Each fault the node goes through, with the policy changes made meanwhile."""

    def __init__(self, rig: AgentRig, server: SimPod, good: SimPod, load: list[SimPod]) -> None:
        self.rig = rig
        self.server = server
        self.good = good
        self.load = load
        self.generation = 0
        self.variant = ""
        self.committed_tag = ""

    async def restart(self, sig: int = signal.SIGTERM) -> None:
        expected = 0 if sig == signal.SIGTERM else -sig
        assert await self.rig.stop_agent(sig) == expected
        await self.rig.start_agent("--log-level=info")
        await self.rig.ready(timeout=30)

    async def big_change(self) -> None:
        self.generation += 1
        rig = self.rig
        rig.apply(_server_policy(rig, self.server, self.good, self.generation))
        for i, pod in enumerate(self.load):
            rig.apply(_load_policy(rig, i, pod, self.generation))

    async def baseline(self) -> None:
        await asyncio.sleep(1)

    async def sigterm_and_restart(self) -> None:
        await self.big_change()
        await asyncio.sleep(0.1)
        assert await self.rig.stop_agent(signal.SIGTERM) == 0
        await asyncio.sleep(1)  # nothing runs: the pinned datapath enforces alone
        await self.rig.start_agent("--log-level=info")
        await self.rig.ready(timeout=30)

    def kill_mid_reconcile(self, delay: float) -> Any:
        async def fault() -> None:
            await self.big_change()
            await asyncio.sleep(delay)
            await self.restart(signal.SIGKILL)
            await self.rig.settle_agent()

        return fault

    async def upgrade_and_back(self) -> None:
        rig = self.rig
        assert await rig.stop_agent(signal.SIGTERM) == 0
        await rig.start_agent("--log-level=info", env={"NP_BPF_OBJECT": self.variant})
        await rig.ready(timeout=30)
        assert await _attached_tag(rig, self.server.ifindex) != self.committed_tag, "not upgraded"
        await self.big_change()
        await rig.settle_agent()
        await asyncio.sleep(0.5)
        await self.restart()
        assert await _attached_tag(rig, self.server.ifindex) == self.committed_tag

    async def watches_dropped(self) -> None:
        for _ in range(3):
            await self.rig.api.drop_watches()
            await self.big_change()
            await self.rig.settle_agent()

    async def history_lost(self) -> None:
        # the API server restarts with a compacted history: watches from old versions
        # get 410 and re-list; changes made meanwhile are picked up
        await self.rig.api.drop_watches()
        self.rig.api.compact()
        await self.big_change()
        self.rig.api.compact()
        await self.rig.settle_agent()

    async def unreachable_for_a_minute(self) -> None:
        rig = self.rig
        await rig.api.pause()
        await asyncio.sleep(20)
        # the agent restarts while the API server is away: it must keep what is pinned
        assert await rig.stop_agent(signal.SIGTERM) == 0
        await rig.start_agent("--log-level=info")
        await asyncio.sleep(40)
        await rig.api.resume()
        await self.big_change()
        await rig.ready(timeout=60)
        await rig.settle_agent()


async def test_no_allowed_drop_and_no_denied_pass_through_faults(
    rig: AgentRig, tmp_path: Path
) -> None:
    server = await rig.add_pod("server", ports=())
    good, bad = await rig.add_pod("good", ports=()), await rig.add_pod("bad", ports=())
    udp = PodServer(name="server", netns=server.netns, listen=[(5000, "UDP")])
    await udp.start()
    rig.servers["server-udp"] = udp
    load = [await rig.add_pod(f"load{i}", ports=()) for i in range(LOAD_PODS)]
    faults = Faults(rig, server, good, load)
    rig.apply(_server_policy(rig, server, good, 0))
    for i, pod in enumerate(load):
        rig.apply(_load_policy(rig, i, pod, 0))
    await rig.start_agent("--log-level=info")
    await rig.ready(timeout=30)
    await rig.converge(
        [(good, server, 5000, "UDP", 4), (bad, server, 5000, "UDP", 4)], [True, False]
    )
    flows = FlowCounter(
        server=udp, target=server, clients={"good": good, "bad": bad}, allowed={"good"}
    )
    flows.start()
    report: dict[str, tuple[int, int, int]] = {}

    async def phase(name: str, fault: Any) -> None:
        flows.mark(name)
        await fault()
        counts = await flows.tally(name)
        dropped, passed = flows.lapses(counts)
        report[name] = (counts["good"].sent + counts["bad"].sent, dropped, passed)

    faults.variant = await _build_variant(tmp_path)
    faults.committed_tag = await _attached_tag(rig, server.ifindex)
    phases = [
        ("baseline", faults.baseline),
        ("SIGTERM, 1 s down, restart", faults.sigterm_and_restart),
        *[
            (f"kill -9 {delay * 1000:.0f} ms into a reconcile", faults.kill_mid_reconcile(delay))
            for delay in KILL_DELAYS
        ],
        ("upgrade to new programs and back", faults.upgrade_and_back),
        ("API watches dropped x3", faults.watches_dropped),
        ("API history lost (410)", faults.history_lost),
        ("API unreachable 60 s, agent restarted meanwhile", faults.unreachable_for_a_minute),
    ]
    try:
        for name, fault in phases:
            await phase(name, fault)
    finally:
        await flows.stop()
    lines = [
        f"{name:<48} datagrams {n:>6}  allowed dropped {d}  denied passed {p}"
        for name, (n, d, p) in report.items()
    ]
    print("\n" + "\n".join(lines))
    total = sum(n for n, _, _ in report.values())
    assert total > 10_000, f"too little traffic to prove anything: {total}"
    assert all(d == 0 and p == 0 for _, d, p in report.values()), "\n".join(lines)
