"""np-sandbox as a user runs it: started, driven with the real kubectl and its own helper
commands, stopped with Ctrl-C, and nothing left behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.localapi import LocalClient
from simnode.demo import FLOWS, STEPS, WALKTHROUGH
from simnode.netns import exists
from simnode.sandboxapi import CONTROL, ProbeRequest, ProbeResult, Settled, parse_port
from tests.kubectl import kubectl

NAMESPACE_OF = {"demo-app": "default", "client-one": "default", "coredns": "kube-system"}
NAMESPACE_OF["another-client-one"] = "another-ns"


@dataclass
class Running:
    proc: asyncio.subprocess.Process
    state: Path
    kubeconfig: str
    output: Path

    async def helper(self, *args: str, timeout: float = 60) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "simnode.sandbox", "--state-dir", str(self.state), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        return proc.returncode or 0, out.decode()

    async def kubectl_ok(self, *args: str) -> str:
        run = await kubectl(self.kubeconfig, *args)
        assert run.rc == 0, f"kubectl {' '.join(args)}: {run.err}"
        return run.out

    @property
    def control(self) -> LocalClient:
        """The control socket the helper commands use (quicker than a process each)."""
        return LocalClient(str(self.state / CONTROL), process="np-sandbox")

    async def settle(self) -> None:
        res = await self.control.request(
            "POST", "/v1/settle", Settled, params={"timeout": "30"}, timeout=40
        )
        assert res.programmed, res.pending

    async def verdict(self, client: str, server: str, port: str) -> bool:
        number, protocol = parse_port(port)
        res = await self.control.request(
            "POST",
            "/v1/probe",
            ProbeResult,
            body=ProbeRequest(client=client, server=server, port=number, protocol=protocol),
            timeout=30,
        )
        assert set(res.allowed) == {4, 6}
        assert len(set(res.allowed.values())) == 1, f"the families differ: {res}"
        return all(res.allowed.values())


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Running]:
    state = tmp_path / "sandbox"
    output = tmp_path / "sandbox.out"
    with open(output, "w") as out:  # noqa: ASYNC230 (the test's own log file)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "simnode.sandbox", "--state-dir", str(state), "up", "--no-color",
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    running = Running(proc, state, str(state / "kubeconfig"), output)
    try:
        for _ in range(600):
            if "The sandbox is up" in output.read_text():
                break
            assert proc.returncode is None, output.read_text()
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"the sandbox did not come up:\n{output.read_text()}")
        yield running
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), 60)


def _netns_of(output: str) -> list[str]:
    return sorted({w for w in output.split() if w.startswith("npd") and "-p" in w})


async def test_walkthrough_with_kubectl_apply(sandbox: Running) -> None:
    """Each walkthrough file applied with kubectl gives the demo's verdicts, probed with
    real traffic by `np-sandbox probe`; then the whole directory at once, as
    `kubectl apply -f examples/walkthrough/`."""
    text = sandbox.output.read_text()
    assert f"export KUBECONFIG={sandbox.kubeconfig}" in text
    pods = await sandbox.kubectl_ok("get", "pods", "-A", "-o", "wide")
    assert pods.count("Running") == 4
    for title, manifest, expect in STEPS:
        if manifest:
            await sandbox.kubectl_ok("apply", "-f", str(WALKTHROUGH / manifest))
            await sandbox.settle()
        got = [
            await sandbox.verdict(
                f"{NAMESPACE_OF[f.client]}/{f.client}",
                f"{NAMESPACE_OF[f.server]}/{f.server}",
                f"{f.port}/{f.protocol}",
            )
            for f in FLOWS
        ]
        assert tuple(got) == expect, title
    rc, out = await sandbox.helper("probe", "default/client-one", "default/demo-app", "81/TCP")
    assert rc == 3, out
    assert "default/client-one -> default/demo-app 81/TCP IPv4: denied" in out
    assert "why: " in out
    rc, out = await sandbox.helper("probe", "default/client-one", "default/demo-app", "80/TCP")
    assert rc == 0, out
    rc, out = await sandbox.helper("settle")
    assert rc == 0, out

    policies = [m for _, m, _ in STEPS if m]
    await sandbox.kubectl_ok("delete", *(a for m in policies for a in ("-f", str(WALKTHROUGH / m))))
    await sandbox.settle()
    assert await sandbox.verdict("default/client-one", "another-ns/another-client-one", "80/TCP")
    out = await sandbox.kubectl_ok("apply", "-f", str(WALKTHROUGH) + "/")
    assert "networkpolicy.networking.k8s.io/client-one-deny-egress created" in out
    await sandbox.settle()
    for f, want in zip(FLOWS, STEPS[-1][2], strict=True):
        allowed = await sandbox.verdict(
            f"{NAMESPACE_OF[f.client]}/{f.client}",
            f"{NAMESPACE_OF[f.server]}/{f.server}",
            f"{f.port}/{f.protocol}",
        )
        assert allowed == want, f
    # client-one's egress is denied but for DNS and demo-app
    assert not await sandbox.verdict(
        "default/client-one", "another-ns/another-client-one", "80/TCP"
    )


async def test_pods_from_kubectl_and_the_helpers_then_ctrl_c_removes_everything(
    sandbox: Running,
) -> None:
    pod = """
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec:
  containers:
  - name: web
    image: nginx
    ports: [{containerPort: 8080}]
"""
    run = await kubectl(sandbox.kubeconfig, "apply", "-f", "-", stdin=pod)
    assert run.rc == 0, run.err
    for _ in range(100):
        out = await sandbox.kubectl_ok("get", "pod", "web", "-o", "wide")
        if "Running" in out:
            break
        await asyncio.sleep(0.1)
    assert "sandbox-node" in out
    await sandbox.settle()
    assert await sandbox.verdict("default/client-one", "default/web", "8080/TCP")
    assert not await sandbox.verdict("default/client-one", "default/web", "8081/TCP")

    rc, out = await sandbox.helper(
        "pod", "add", "team-a/db", "--label", "app=db", "--port", "5432/TCP"
    )
    assert rc == 0, out
    assert "team-a" in await sandbox.kubectl_ok("get", "namespaces")
    labels = await sandbox.kubectl_ok("get", "pod", "db", "-n", "team-a", "--show-labels")
    assert "app=db" in labels
    deny_db = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-only-web, namespace: team-a}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: default}}
      podSelector: {matchLabels: {app: web}}
"""
    run = await kubectl(sandbox.kubeconfig, "apply", "-f", "-", stdin=deny_db)
    assert run.rc == 0, run.err
    await sandbox.settle()
    assert await sandbox.verdict("default/web", "team-a/db", "5432/TCP")
    assert not await sandbox.verdict("default/client-one", "team-a/db", "5432/TCP")

    rc, out = await sandbox.helper("pods")
    assert "team-a/db" in out
    assert "default/web" in out
    await sandbox.kubectl_ok("delete", "pod", "web")
    rc, out = await sandbox.helper("pod", "delete", "team-a/db")
    assert rc == 0, out
    rc, out = await sandbox.helper("pods")
    assert "web" not in out
    assert "db" not in out
    rc, out = await sandbox.helper("pod", "add", "default/demo-app")
    assert rc == 1
    assert "exists" in out
    rc, out = await sandbox.helper("probe", "default/client-one", "default/nobody", "80/TCP")
    assert rc == 1
    assert "no pod default/nobody" in out

    pins = [p for p in os.listdir("/sys/fs/bpf") if p.startswith("np-demo-")]
    listed = await asyncio.create_subprocess_exec(
        "ip", "netns", "list", stdout=asyncio.subprocess.PIPE
    )
    namespaces = _netns_of((await listed.communicate())[0].decode())
    assert pins
    assert namespaces
    sandbox.proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(sandbox.proc.wait(), 60) == 0
    text = sandbox.output.read_text()
    assert "cleaned up" in text
    assert not [n for n in namespaces if exists(n)]
    assert not set(pins) & set(os.listdir("/sys/fs/bpf"))
    assert not sandbox.state.exists()
    rc, out = await sandbox.helper("pods")
    assert rc == 1
    assert "no sandbox is running" in out
