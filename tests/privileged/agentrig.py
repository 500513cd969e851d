"""An end-to-end rig: the real np-agent process in a simulated node's network namespace,
the fake API server inside that namespace, namespace pods, real traffic."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from bpf import layout as lay
from bpf.maps import Map, TypedMap
from bpf.objects import Program
from common.apimodels import WaitResult
from fakekube import store as fs
from simnode.netns import socket_in
from simnode.node import SimNode, SimPod
from simnode.stack import REPO, NodeStack
from simnode.traffic import PodServer, tcp_probe, udp_probe

# client (None: the node), target, port, protocol, family
Case = tuple[SimPod | None, SimPod, int, str, int]
AGENT_FLAGS = (
    "--enable-network-policy=true",
    "--metrics-bind-addr=127.0.0.1:8162",
    "--health-probe-bind-addr=127.0.0.1:8163",
    "--log-level=debug",
)


class AgentRig(NodeStack):
    """A :class:`NodeStack` with the agent in focus: pods with servers, PolicyEndpoints
    written straight to the API (no resolver), probes and the pinned state."""

    def __init__(
        self, sim: SimNode, *, pin_root: str, workdir: Path, mode: str = "standard"
    ) -> None:
        super().__init__(sim, pin_root=pin_root, workdir=workdir, mode=mode)
        self.servers: dict[str, PodServer] = {}
        self.pods: dict[str, SimPod] = {}

    # ---- the agent --------------------------------------------------------------------
    @property
    def proc(self) -> asyncio.subprocess.Process | None:
        return self.procs.get("agent")

    @property
    def log_path(self) -> Path:
        return self.log_file("agent")

    async def start_agent(self, *extra: str, env: dict[str, str] | None = None) -> None:
        await self.start("agent", *AGENT_FLAGS, *extra, env=env)

    async def start_process(self, name: str, *extra: str) -> asyncio.subprocess.Process:
        """Another node process (conntrack, flowlogs) beside the agent."""
        return await self.start(name, *extra)

    async def stop_agent(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        return await self.stop("agent", sig, timeout)

    async def settle_agent(self, timeout: float = 30) -> None:
        """Every local pod programmed with the current PolicyEndpoints."""
        res = await self.agent.get(
            "/v1/wait", WaitResult, params={"timeout": str(timeout)}, timeout=timeout + 10
        )
        assert res.programmed, f"not programmed after {timeout}s: {res.pending}"

    def records(self) -> dict[int, lay.NpPod]:
        """The datapath's pod records as pinned (not what the agent believes)."""
        with Map.from_pin(os.path.join(self.pin_root, "maps", lay.MAP_PODS)) as raw:
            pods = TypedMap(raw, lay.u32, lay.NpPod)
            return {k.value: v for k, v in pods.items()}

    def pinned_program_ids(self) -> tuple[int, int]:
        ids = []
        for name in (lay.PROG_INGRESS, lay.PROG_EGRESS):
            prog = Program.from_pin(os.path.join(self.pin_root, "programs", name))
            ids.append(prog.id)
            prog.close()
        return ids[0], ids[1]

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run np-cli against this agent (from the host, like an operator)."""
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "cli",
                *args,
                f"--runtime-dir={self.runtime_dir}",
                f"--bpf-pin-root={self.pin_root}",
            ],
            capture_output=True,
            text=True,
            check=False,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )

    async def acli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(self.cli, *args)

    async def explain(
        self,
        pod: str,
        peer: SimPod,
        *,
        port: int = 80,
        protocol: str = "TCP",
        direction: str = "ingress",
    ) -> dict[str, Any]:
        """``np-cli explain --json`` for a new flow from ``peer``'s IPv4 address."""
        out = await self.acli(
            "explain",
            pod,
            "--peer",
            str(peer.ipv4),
            "--port",
            str(port),
            "--protocol",
            protocol,
            "--direction",
            direction,
            "--json",
        )
        assert out.returncode == 0, out.stderr
        answer: dict[str, Any] = json.loads(out.stdout)
        return answer

    async def http(self, port: int, path: str) -> tuple[int, str]:
        loop = asyncio.get_running_loop()
        sock = socket_in(self.sim.netns, socket.AF_INET, socket.SOCK_STREAM)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 2)
            await loop.sock_sendall(sock, f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 5):
                data += chunk
        except (OSError, TimeoutError):
            return 0, ""
        finally:
            sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body.decode(errors="replace")

    async def ready(self, timeout: float = 20) -> None:
        await eventually(lambda: self._ready(), timeout=timeout, what="agent /readyz")

    async def _ready(self) -> bool:
        status, _ = await self.http(8163, "/readyz")
        return status == 200

    # ---- pods -------------------------------------------------------------------------
    async def add_pod(
        self,
        name: str,
        *,
        namespace: str = "default",
        labels: dict[str, str] | None = None,
        ports: Iterable[int] = (80, 81),
        create_object: bool = True,
    ) -> SimPod:
        pod = await self.sim.add_pod(name)
        server = PodServer(name=name, netns=pod.netns, ports=ports)
        await server.start()
        self.servers[name] = server
        self.pods[name] = pod
        if create_object:
            self.create_pod_object(pod, namespace=namespace, labels=labels)
        return pod

    def endpoint(self, pod: SimPod, namespace: str = "default") -> dict[str, str]:
        return {
            "podIP": str(pod.ipv4),
            "hostIP": str(self.sim.node_ipv4),
            "name": pod.name,
            "namespace": namespace,
        }

    def policy_endpoint(
        self,
        name: str,
        *,
        targets: list[SimPod],
        policy: str | None = None,
        namespace: str = "default",
        isolation: list[str] | None = None,
        ingress: list[dict[str, Any]] | None = None,
        egress: list[dict[str, Any]] | None = None,
        trigger_time: str | None = None,
        pod_selector: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, "namespace": namespace}
        if trigger_time:
            meta["annotations"] = {"networking.k8s.aws/last-change-trigger-time": trigger_time}
        return {
            "metadata": meta,
            "spec": {
                "policyRef": {"name": policy or name, "namespace": namespace},
                "podIsolation": isolation if isolation is not None else ["Ingress"],
                **({"podSelector": pod_selector} if pod_selector is not None else {}),
                "podSelectorEndpoints": [self.endpoint(p, namespace) for p in targets],
                "ingress": ingress or [],
                "egress": egress or [],
            },
        }

    def open_policy(self, name: str, pods: list[SimPod]) -> None:
        """A policy letting ``pods`` send and receive anything (strict mode denies a pod
        that no policy selects)."""
        anywhere = [{"cidr": "0.0.0.0/0"}, {"cidr": "::/0"}]
        self.apply(
            self.policy_endpoint(
                f"{name}-abc",
                policy=name,
                targets=pods,
                isolation=["Ingress", "Egress"],
                ingress=anywhere,
                egress=anywhere,
            )
        )

    def apply(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        try:
            current = self.api.store.get(fs.POLICY_ENDPOINTS, meta["namespace"], meta["name"])
        except fs.ApiError:
            self.api.store.create(fs.POLICY_ENDPOINTS, meta["namespace"], body)
            return
        body = dict(
            body, metadata=dict(meta, resourceVersion=current["metadata"]["resourceVersion"])
        )
        self.api.store.update(fs.POLICY_ENDPOINTS, meta["namespace"], meta["name"], body)

    def delete(self, name: str, namespace: str = "default") -> None:
        self.api.store.delete(fs.POLICY_ENDPOINTS, namespace, name)

    # ---- traffic ----------------------------------------------------------------------
    async def probe(
        self,
        client: SimPod | None,
        target: SimPod,
        *,
        port: int = 80,
        protocol: str = "TCP",
        family: int = 4,
        timeout: float = 0.4,
    ) -> bool:
        netns = client.netns if client else self.sim.netns
        fn = tcp_probe if protocol == "TCP" else udp_probe
        return await fn(
            netns=netns,
            target=target.address(family),
            port=port,
            timeout=timeout,
            expect=target.name,
        )

    async def matrix(self, cases: Sequence[Case]) -> list[bool]:
        return list(
            await asyncio.gather(
                *(self.probe(c, t, port=p, protocol=pr, family=f) for c, t, p, pr, f in cases)
            )
        )

    async def converge(
        self, cases: Sequence[Case], expect: list[bool], timeout: float = 10
    ) -> None:
        last: list[bool] = []

        async def check() -> bool:
            nonlocal last
            last = await self.matrix(cases)
            return last == expect

        await eventually(check, timeout=timeout, what=lambda: f"matrix {last} != {expect}")

    async def close(self) -> None:
        await super().close()
        for server in self.servers.values():
            await server.close()


def allow_from(
    *peers: SimPod, ports: list[dict[str, object]] | None = None
) -> list[dict[str, object]]:
    rules: list[dict[str, object]] = []
    for p in peers:
        for ip in (p.ipv4, p.ipv6):
            rule: dict[str, object] = {"cidr": str(ip)}
            if ports is not None:
                rule["ports"] = ports
            rules.append(rule)
    return rules


async def eventually(
    check: Callable[[], Awaitable[bool]],
    *,
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.1,
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if await check():
            return
        if loop.time() > deadline:
            raise AssertionError(f"not reached in {timeout}s: {what() if callable(what) else what}")
        await asyncio.sleep(interval)
