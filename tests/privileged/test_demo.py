"""The README's demo: the walkthrough on a simulated node with the real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from simnode.netns import NETNS_DIR
from simnode.stack import REPO


async def _start_demo() -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simnode.demo",
        "--no-color",
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


def _leftovers(pid: int) -> list[str]:
    tag = f"npd{pid % 10000:04d}"
    found = [f"netns {n}" for n in os.listdir(NETNS_DIR) if n.startswith(tag)]
    if os.path.exists(f"/sys/fs/bpf/np-demo-{pid}"):
        found.append(f"pins /sys/fs/bpf/np-demo-{pid}")
    return found


async def test_demo_walks_through_the_policies_and_cleans_up() -> None:
    proc = await _start_demo()
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "Every probe matched the walkthrough." in text
    assert "UNEXPECTED" not in text
    # the real processes did the work: programmed signal, explain, flow-log lines
    assert text.count("np-agent reports every pod programmed") == 6, text
    assert "why: 10.66.0.3 is in no CIDR allowed for the ingress of default/demo-app" in text
    assert (
        "Proto TCP Verdict DENY Direction ingress, Tier NETWORK_POLICY Pod default/demo-app "
        "Policy -" in text
    )
    assert (
        "Dest Port: 53 Proto UDP Verdict DENY Direction egress, Tier NETWORK_POLICY "
        "Pod default/client-one" in text
    )
    assert _leftovers(proc.pid) == []


async def test_demo_cleans_up_on_ctrl_c() -> None:
    proc = await _start_demo()
    assert proc.stdout is not None
    seen = b""
    while b"Step 2." not in seen:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line, seen.decode()
        seen += line
    proc.send_signal(signal.SIGINT)
    rest, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = (seen + rest).decode()
    assert proc.returncode == 130, text
    assert "interrupted, cleaning up" in text
    assert "cleaned up: processes stopped" in text
    assert _leftovers(proc.pid) == []
