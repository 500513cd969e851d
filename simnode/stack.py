"""The real node processes on a simulated node, against a fake API server.

:class:`NodeStack` runs the fake Kubernetes API server (in this process, listening in the
node's network namespace) and starts the node processes -- ``np-agent``,
``np-resolver``, ``np-conntrack``, ``np-flowlogs`` -- as real child processes in that
namespace, the way a hostNetwork DaemonSet runs them. Only the network namespace is
entered (``nsenter --net``): ``ip netns exec`` would also remount ``/sys`` and hide the
host's bpffs, which the processes share with the host like the chart's hostPath mount.

Every process gets the same flag list (each uses what concerns it) plus its own extras,
and logs to ``<workdir>/<process>.log``, a ``---- run N`` line separating restarts.
Used by the demo, the privileged tests and the conformance harness.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common.apimodels import WaitResult
from common.localapi import AGENT_SOCKET, LocalClient, Unavailable, socket_path
from fakekube import store as fs
from fakekube.server import FakeKube
from resolver.main import RESOLVER_SOCKET, ResolverStatus
from simnode.netns import socket_in
from simnode.node import SimNode, SimPod

REPO = Path(__file__).resolve().parents[1]
NODE = "node-1"
# process name -> Python module (the console scripts np-agent, np-resolver, ... run these)
MODULES = {
    "agent": "agent",
    "resolver": "resolver",
    "conntrack": "conntrack",
    "flowlogs": "flowlogs",
    # the image's /controller: agent and conntrack (and flowlogs) in one container
    "controller": "agent.controller",
}


_PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies, so that a
    caller killed outright (SIGKILL) leaves no node process behind."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class NodeStack:
    def __init__(
        self,
        sim: SimNode,
        *,
        pin_root: str,
        workdir: Path,
        node: str = NODE,
        mode: str = "standard",
        bookmark_interval: float = 0.5,
        ct_entries: int = 32768,
        admission: bool = False,
    ) -> None:
        self.sim = sim
        self.pin_root = pin_root
        self.workdir = workdir
        self.node = node
        self.mode = mode
        self.ct_entries = ct_entries
        self.api = FakeKube(bookmark_interval=bookmark_interval, admission=admission)
        self.kubeconfig = str(workdir / "kubeconfig")
        self.runtime_dir = str(workdir / "run")
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.runs: Counter[str] = Counter()
        self._api_port = 0
        self.agent = LocalClient(socket_path(self.runtime_dir, AGENT_SOCKET))
        self.resolver = LocalClient(
            socket_path(self.runtime_dir, RESOLVER_SOCKET), process="resolver"
        )

    # ---- the API server ---------------------------------------------------------------
    async def start_api(self) -> None:
        def factory() -> socket.socket:
            s = socket_in(self.sim.netns, socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self._api_port))
            self._api_port = s.getsockname()[1]
            return s

        await self.api.start(sock_factory=factory)
        self.api.write_kubeconfig(self.kubeconfig)

    def create_pod_object(
        self,
        pod: SimPod,
        *,
        namespace: str = "default",
        name: str | None = None,
        labels: dict[str, str] | None = None,
        ports: Iterable[tuple[str, int, str]] = (),
    ) -> dict[str, Any]:
        """The Pod object of a simulated pod on this node, Running with both its IPs;
        ``ports`` are (name, containerPort, protocol) of its one container."""
        return self.api.store.create(
            fs.PODS,
            namespace,
            {
                "metadata": {
                    "name": name or pod.name,
                    "namespace": namespace,
                    "labels": dict(labels or {}),
                },
                "spec": {
                    "nodeName": self.node,
                    "containers": [
                        {
                            "name": "main",
                            "ports": [
                                {"name": n, "containerPort": p, "protocol": proto}
                                for n, p, proto in ports
                                if n
                            ],
                        }
                    ],
                },
                "status": {
                    "phase": "Running",
                    "hostIP": str(self.sim.node_ipv4),
                    "podIP": str(pod.ipv4),
                    "podIPs": [{"ip": str(pod.ipv4)}, {"ip": str(pod.ipv6)}],
                },
            },
        )

    def schedule_pod(
        self, name: str, *, namespace: str = "default", labels: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """The Pod object as the scheduler leaves it: on this node, no address yet (what
        the agent knows of a pod when the CNI announces it)."""
        return self.api.store.create(
            fs.PODS,
            namespace,
            {
                "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
                "spec": {"nodeName": self.node, "containers": [{"name": "main"}]},
                "status": {"phase": "Pending", "hostIP": str(self.sim.node_ipv4)},
            },
        )

    def schedule_written(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A Pod object a client wrote, placed on this node by the scheduler."""
        meta = obj["metadata"]
        body = dict(self.api.store.get(fs.PODS, meta["namespace"], meta["name"]))
        body["spec"] = {**(body.get("spec") or {}), "nodeName": self.node}
        body["status"] = {"phase": "Pending", "hostIP": str(self.sim.node_ipv4)}
        return self.api.store.update(fs.PODS, meta["namespace"], meta["name"], body)

    def pod_running(self, pod: SimPod) -> dict[str, Any]:
        """The kubelet's status update once the sandbox is up: the pod's addresses."""
        body = dict(self.api.store.get(fs.PODS, pod.namespace, pod.name))
        body["status"] = {
            "phase": "Running",
            "hostIP": str(self.sim.node_ipv4),
            "podIP": str(pod.ipv4),
            "podIPs": [{"ip": str(pod.ipv4)}, {"ip": str(pod.ipv6)}],
        }
        return self.api.store.update(fs.PODS, pod.namespace, pod.name, body)

    async def resolver_caught_up(self, timeout: float = 10.0) -> bool:
        """Wait until the resolver has seen every change made so far and written its
        PolicyEndpoints; False if it did not within ``timeout``."""
        deadline = time.monotonic() + timeout
        target = self.api.store.rv
        while time.monotonic() < deadline:
            try:
                st = await self.resolver.get("/v1/status", ResolverStatus, timeout=2)
            except Unavailable:
                await asyncio.sleep(0.05)
                continue
            if st.idle and st.observed_resource_version >= target:
                return True
            await asyncio.sleep(0.02)
        return False

    async def programmed(self, timeout: float = 60.0) -> None:
        """Every local pod programmed with the current objects (no resolver involved),
        the agent's API waited for if it is not listening yet; AssertionError if not
        within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                res = await self.agent.get(
                    "/v1/wait",
                    WaitResult,
                    params={"timeout": f"{min(remaining, 30):.2f}"},
                    timeout=min(remaining, 30) + 10,
                )
            except Unavailable:  # not listening yet
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
                continue
            if res.programmed:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not programmed after {timeout}s: {res.pending}")

    async def settle(self, timeout: float = 10.0) -> WaitResult:
        """Wait until the resolver has caught up, then until the agent has programmed
        every local pod."""
        deadline = time.monotonic() + timeout
        await self.resolver_caught_up(timeout)
        remaining = max(0.1, deadline - time.monotonic())
        return await self.agent.get(
            "/v1/wait", WaitResult, params={"timeout": f"{remaining:.2f}"}, timeout=remaining + 5
        )

    # ---- processes --------------------------------------------------------------------
    def log_file(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def flags(self) -> list[str]:
        """The flags every process gets, as a DaemonSet would give them."""
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--bpf-pin-root={self.pin_root}",
            f"--runtime-dir={self.runtime_dir}",
            f"--conntrack-cache-table-size={self.ct_entries}",
            f"--pod-interface-prefixes={self.sim.tag}h,{self.sim.cni_prefix},vlan",
            f"--npa-socket={self.npa_socket}",
            f"--ipamd-socket={self.runtime_dir}/ipamd.sock",
        ]

    @property
    def npa_socket(self) -> str:
        """Where the agent serves the CNI's calls (the node's /var/run/aws-node/npa.sock)."""
        return f"{self.runtime_dir}/npa.sock"

    async def start(
        self, name: str, *extra: str, wrap: Sequence[str] = (), env: Mapping[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        """Start process ``name`` (a key of :data:`MODULES`); extras override flags.
        ``wrap`` is a command prefix run inside the namespace (e.g. ``setpriv`` with a
        reduced capability set, as a container runtime would apply it); ``env`` adds
        environment variables."""
        if name in self.procs and self.procs[name].returncode is None:
            raise RuntimeError(f"{name} is running")
        self.runs[name] += 1
        environment = dict(
            os.environ,
            NETWORK_POLICY_ENFORCING_MODE=self.mode,
            MY_NODE_NAME=self.node,
            PYTHONPATH=str(REPO),
            **(env or {}),
        )
        # the resolver shares the node's network here (a Deployment pod in a cluster):
        # its health port must not take the agent's
        own = (
            ["--health-probe-bind-addr=127.0.0.1:0", "--metrics-bind-addr=127.0.0.1:0"]
            if name == "resolver"
            else []
        )
        args = [
            "nsenter",
            f"--net=/run/netns/{self.sim.netns}",
            *wrap,
            sys.executable,
            "-m",
            MODULES[name],
            *self.flags(),
            *own,
            *extra,
        ]
        with open(self.log_file(name), "a") as log:  # noqa: ASYNC230 (local file, tiny)
            log.write(f"---- run {self.runs[name]}\n")
            log.flush()
            # a session of its own: a Ctrl-C meant for the caller (the demo) must not
            # reach the processes, which the caller stops in order
            proc = await asyncio.create_subprocess_exec(
                *args,
                env=environment,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=_stop_with_parent,
            )
        self.procs[name] = proc
        return proc

    def running(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.returncode is None

    async def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Signal the process and wait; killed if it outlives ``timeout``."""
        proc = self.procs.pop(name)
        if proc.returncode is None:
            proc.send_signal(sig)
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def close(self) -> None:
        """Stop every process (resolver first: it writes what the others read), then
        the API server."""
        for name in sorted(self.procs, key=lambda n: n != "resolver"):
            await self.stop(name)
        await self.api.stop()
