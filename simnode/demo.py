"""The walkthrough demo on a simulated node (run by ``scripts/demo.sh``).

A node built from network namespaces with pods modelled on the EKS launch walkthrough
(default/demo-app, default/client-one, another-ns/another-client-one, and the cluster
DNS kube-system/coredns), the fake API server, and the real node processes: np-resolver
turns NetworkPolicies into PolicyEndpoints, np-agent programs the eBPF datapath on the
pods' veths, np-conntrack sweeps the conntrack map, np-flowlogs writes the decision log.

The walkthrough's policies (``examples/walkthrough/*.yaml``) are applied one step at a
time; after each, the demo waits for the agent's "programmed" signal, probes real
traffic over IPv4 and IPv6, asks the agent to explain each denied flow, and prints the
DENY lines the flow-log shipper wrote. Exits 1 if any probe differs from the
walkthrough's expectation; removes every namespace, veth, pin and file on exit, Ctrl-C
included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bpf.datapath import Datapath
from common.apimodels import ExplainRequest, ExplainResult, NodeStatus
from common.localapi import Unavailable
from fakekube import store as fs
from simnode.node import SimNode, SimPod
from simnode.stack import REPO, NodeStack
from simnode.traffic import PodServer, tcp_probe, udp_probe

WALKTHROUGH = REPO / "examples" / "walkthrough"
BOLD, GREEN, RED, DIM, YELLOW, RESET = (
    "\033[1m",
    "\033[32m",
    "\033[31m",
    "\033[2m",
    "\033[33m",
    "\033[0m",
)


@dataclass(frozen=True)
class DemoPod:
    namespace: str
    name: str
    labels: dict[str, str]
    listen: tuple[tuple[int, str], ...]


PODS = (
    DemoPod("default", "demo-app", {"app": "demo-app"}, ((80, "TCP"),)),
    DemoPod("default", "client-one", {"app": "client-one"}, ((80, "TCP"),)),
    DemoPod("another-ns", "another-client-one", {"app": "another-client-one"}, ((80, "TCP"),)),
    DemoPod("kube-system", "coredns", {"k8s-app": "kube-dns"}, ((53, "UDP"), (53, "TCP"))),
)


@dataclass(frozen=True)
class Flow:
    client: str
    server: str
    port: int
    protocol: str

    def label(self) -> str:
        return f"{self.client:>18} -> {self.server}:{self.port}/{self.protocol}"


FLOWS = (
    Flow("client-one", "demo-app", 80, "TCP"),
    Flow("another-client-one", "demo-app", 80, "TCP"),
    Flow("client-one", "coredns", 53, "UDP"),
)

# (title, manifest applied or None, expected verdict of each flow in FLOWS)
STEPS: tuple[tuple[str, str | None, tuple[bool, bool, bool]], ...] = (
    ("No policy: every pod may talk to every pod", None, (True, True, True)),
    ("Deny all ingress to demo-app", "01-deny-all-ingress.yaml", (False, False, True)),
    (
        "Allow client-one to demo-app on TCP 80",
        "03-allow-ingress-from-samens-client-one.yaml",
        (True, False, True),
    ),
    (
        "Allow every pod of another-ns to demo-app",
        "04-allow-ingress-from-xns.yaml",
        (True, True, True),
    ),
    (
        "Deny all egress from client-one, DNS included",
        "06-deny-egress-from-client-one.yaml",
        (False, True, False),
    ),
    (
        "Allow client-one to reach the cluster DNS",
        "07-allow-egress-to-coredns.yaml",
        (False, True, True),
    ),
    (
        "Allow client-one to reach demo-app on TCP 80",
        "08-allow-egress-to-demo-app.yaml",
        (True, True, True),
    ),
)


class Demo:
    def __init__(
        self, *, color: bool, workdir: Path, node: str = "demo-node", admission: bool = False
    ) -> None:
        tag = f"npd{os.getpid() % 10000:04d}"
        self.sim = SimNode(tag)
        self.pin_root = f"/sys/fs/bpf/np-demo-{os.getpid()}"
        self.workdir = workdir
        self.stack = NodeStack(
            self.sim, pin_root=self.pin_root, workdir=workdir, node=node, admission=admission
        )
        self.flow_log = workdir / "flows.log"
        self.color = color
        self.pods: dict[str, SimPod] = {}
        self.servers: dict[str, PodServer] = {}  # by pod name
        self.pod_uids: dict[str, str] = {}  # pod name -> the uid of its Pod object
        self._flow_offset = 0
        self._next_port = 30000
        self.unexpected = 0

    def c(self, code: str, text: str) -> str:
        return f"{code}{text}{RESET}" if self.color else text

    # ---- setting up -------------------------------------------------------------------
    async def setup(self) -> None:
        print(
            self.c(
                BOLD,
                "Setting up a simulated node: network namespaces, veths, "
                "a fake API server, the four node processes",
            )
        )
        await self.sim.start()
        await self.stack.start_api()
        store = self.stack.api.store
        for ns in sorted({p.namespace for p in PODS}):
            store.create(fs.NAMESPACES, None, {"metadata": {"name": ns}})
        common = (
            "--enable-network-policy=true",
            "--enable-policy-event-logs=true",
            "--log-level=info",
            f"--log-file={self.flow_log}",
        )
        await self.stack.start("resolver", *common)
        await self.stack.start(
            "agent",
            *common,
            "--metrics-bind-addr=127.0.0.1:8162",
            "--health-probe-bind-addr=127.0.0.1:8163",
        )
        await self.stack.start("conntrack", *common, "--conntrack-cache-cleanup-period=10")
        await self.stack.start("flowlogs", *common)
        status = await self._ready()
        print(
            f"  np-agent ready on node {status.node} ({status.mode} mode), "
            f"programs {status.ingress_prog_id}/{status.egress_prog_id}, "
            f"pins under {status.pin_root}"
        )
        self.sim.cni_socket = self.stack.npa_socket
        self.sim.mode = status.mode
        for spec in PODS:
            pod, answered_ms = await self.add_pod(spec)
            print(
                f"  pod {spec.namespace + '/' + spec.name:<30} {pod.ipv4!s:<11} "
                f"{pod.ipv6!s:<13} host veth {pod.host_veth} "
                f"(wired and EnforceNpToPod answered in {answered_ms:.0f} ms)"
            )
        print(self.c(DIM, f"  process logs and the flow log are in {self.workdir}"))

    async def add_pod(
        self, spec: DemoPod, *, written: dict[str, Any] | None = None
    ) -> tuple[SimPod, float]:
        """A pod as it arrives on EKS: scheduled, wired by the CNI (which calls the agent
        before the pod's containers start), then reported running with its addresses,
        with a server answering its name on ``spec.listen``. ``written``: the Pod object
        exists already (written by a client), and is scheduled here. Returns the pod and
        how long the CNI's call to the agent took (ms)."""
        if written is None:
            obj = self.stack.schedule_pod(spec.name, namespace=spec.namespace, labels=spec.labels)
        else:
            obj = self.stack.schedule_written(written)
        self.pod_uids[spec.name] = obj["metadata"]["uid"]
        started = time.monotonic()
        pod = await self.sim.add_pod(spec.name, namespace=spec.namespace, labels=spec.labels)
        answered_ms = (time.monotonic() - started) * 1000
        self.stack.pod_running(pod)
        server = PodServer(
            name=f"{spec.namespace}/{spec.name}", netns=pod.netns, listen=spec.listen
        )
        await server.start()
        self.servers[spec.name] = server
        self.pods[spec.name] = pod
        return pod, answered_ms

    async def remove_pod(self, name: str) -> None:
        """The pod gone: its server, its namespace and veth, and what is known of it (its
        object's deletion, if any, is the caller's)."""
        self.pod_uids.pop(name, None)
        server = self.servers.pop(name, None)
        if server is not None:
            await server.close()
        await self.sim.remove_pod(name)
        self.pods.pop(name, None)

    async def _ready(self, timeout: float = 30) -> NodeStatus:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            for name in self.stack.procs:
                if not self.stack.running(name):
                    raise RuntimeError(f"np-{name} exited at start:\n{self._tail(name)}")
            try:
                st = await self.stack.agent.get("/v1/status", NodeStatus, timeout=2)
                if st.ready and st.flowlogs.running and st.conntrack.running:
                    return st
                last = "; ".join(st.problems) or "the other processes are starting"
            except Unavailable as exc:
                last = str(exc)
            await asyncio.sleep(0.2)
        raise RuntimeError(
            f"the node did not become ready in {timeout}s: {last}\n{self._tail('agent')}"
        )

    def _tail(self, name: str, lines: int = 15) -> str:
        path = self.stack.log_file(name)
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    # ---- a step -----------------------------------------------------------------------
    async def step(
        self, n: int, title: str, manifest: str | None, expect: tuple[bool, ...]
    ) -> None:
        print()
        print(self.c(BOLD, f"Step {n}. {title}"))
        if manifest:
            policy = self.apply(WALKTHROUGH / manifest)
            print(f"  kubectl apply -f examples/walkthrough/{manifest}  (networkpolicy {policy})")
            started = time.monotonic()
            done = await self.stack.settle(timeout=15)
            took = (time.monotonic() - started) * 1000
            state = "programmed" if done.programmed else self.c(RED, "NOT programmed")
            print(
                f"  resolver wrote the PolicyEndpoints; np-agent reports every pod "
                f"{state} ({took:.0f} ms after the apply)"
            )
        for flow, want in zip(FLOWS, expect, strict=True):
            results = [await self.probe(flow, family) for family in (4, 6)]
            verdicts = "  ".join(
                f"IPv{f} " + (self.c(GREEN, "allowed") if ok else self.c(RED, "denied "))
                for f, ok in zip((4, 6), results, strict=True)
            )
            as_expected = all(ok == want for ok in results)
            note = (
                self.c(DIM, "as expected")
                if as_expected
                else self.c(YELLOW, f"UNEXPECTED (walkthrough: {'allowed' if want else 'denied'})")
            )
            self.unexpected += not as_expected
            print(f"  {flow.label():<44} {verdicts}   {note}")
            if not all(results):
                print(self.c(DIM, f"  {'':>18}    why: {await self.explain(flow)}"))
        await self.print_flow_log()

    def apply(self, path: Path) -> str:
        body: dict[str, Any] = yaml.safe_load(path.read_text())
        meta = body["metadata"]
        self.stack.api.store.create(fs.NETWORK_POLICIES, meta["namespace"], body)
        return f"{meta['namespace']}/{meta['name']}"

    async def probe(self, flow: Flow, family: int) -> bool:
        return await self.probe_pods(
            self.pods[flow.client], self.pods[flow.server], flow.port, flow.protocol, family
        )

    async def probe_pods(
        self, client: SimPod, server: SimPod, port: int, protocol: str, family: int
    ) -> bool:
        """Whether ``client`` reaches ``server``'s server on port/protocol over IPv4 or
        IPv6 (the answer must carry the server's name)."""
        # a fresh client port each time: a reused one could match a flow still tracked
        # from an earlier step and pass as established
        self._next_port = 30000 if self._next_port >= 60000 else self._next_port + 1
        fn = tcp_probe if protocol == "TCP" else udp_probe
        return await fn(
            netns=client.netns,
            target=server.address(family),
            port=port,
            timeout=0.4,
            expect=f"{server.namespace}/{server.name}",
            source_port=self._next_port,
        )

    async def explain(self, flow: Flow) -> str:
        return await self.explain_pods(
            self.pods[flow.client], self.pods[flow.server], flow.port, flow.protocol
        )

    async def explain_pods(self, client: SimPod, server: SimPod, port: int, protocol: str) -> str:
        """The agent's account of the denial, asked on both ends (np-cli explain)."""
        asks = (
            ExplainRequest(
                pod=f"{client.namespace}/{client.name}",
                peer=str(server.ipv4),
                port=port,
                protocol=protocol,  # type: ignore[arg-type]
                direction="egress",
            ),
            ExplainRequest(
                pod=f"{server.namespace}/{server.name}",
                peer=str(client.ipv4),
                port=port,
                protocol=protocol,  # type: ignore[arg-type]
                direction="ingress",
            ),
        )
        for ask in asks:
            res = await self.stack.agent.request("POST", "/v1/explain", ExplainResult, body=ask)
            if res.verdict == "DENY":
                return res.summary
        return "no side denies it now (the policy changed since the probe?)"

    async def print_flow_log(self) -> None:
        """The DENY lines np-flowlogs wrote since the last step (it drains the ring
        buffer continuously; give it a moment to catch up)."""
        lines: list[str] = []
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 0.4:
            await asyncio.sleep(0.1)
            fresh = self._read_flow_log()
            if fresh:
                lines.extend(fresh)
                quiet_since = time.monotonic()
        if lines:
            print(self.c(DIM, f"  flow log ({self.flow_log.name}), {len(lines)} new lines:"))
            for line in lines[:8]:
                print(self.c(DIM, f"    {line}"))
            if len(lines) > 8:
                print(self.c(DIM, f"    ... {len(lines) - 8} more"))

    def _read_flow_log(self) -> list[str]:
        if not self.flow_log.exists():
            return []
        with open(self.flow_log, "rb") as f:
            f.seek(self._flow_offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._flow_offset += len(complete)
        return complete.decode(errors="replace").splitlines()

    # ---- the whole run ----------------------------------------------------------------
    async def run(self) -> int:
        await self.setup()
        for n, (title, manifest, expect) in enumerate(STEPS, 1):
            await self.step(n, title, manifest, expect)
        st = await self.stack.agent.get("/v1/status", NodeStatus)
        print()
        print(
            self.c(BOLD, "Node status (np-cli status): ")
            + f"{st.pods} pods, {st.programmed} programmed, {st.policyendpoints} "
            f"PolicyEndpoints, datapath allowed {st.datapath.get('packets_allowed', 0)} "
            f"and denied {st.datapath.get('packets_denied', 0)} packets"
        )
        if self.unexpected:
            print(self.c(YELLOW, f"{self.unexpected} probes differed from the walkthrough"))
            return 1
        print(self.c(GREEN, "Every probe matched the walkthrough."))
        return 0

    async def close(self) -> None:
        await self.stack.close()
        for server in self.servers.values():
            await server.close()
        await self.sim.close()
        Datapath.unpin(self.pin_root)


@contextlib.contextmanager
def cancelled_by_signals() -> Iterator[None]:
    """Within: SIGINT and SIGTERM cancel the current task. On leaving, both are ignored,
    so that the cleanup which follows finishes even if a second Ctrl-C arrives."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        if task is not None:
            loop.add_signal_handler(sig, task.cancel)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)


async def amain(*, color: bool, keep: bool) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="np-demo-"))
    demo = Demo(color=color, workdir=workdir)
    try:
        with cancelled_by_signals():
            try:
                return await demo.run()
            except asyncio.CancelledError:
                print("\ninterrupted, cleaning up")
                return 130
            except Exception as exc:  # the demo reports and cleans up whatever went wrong
                print(f"\ndemo failed: {exc}", file=sys.stderr)
                return 1
    finally:
        await demo.close()
        if keep:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        print("cleaned up: processes stopped; namespaces, veths and pins removed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-color", action="store_true", help="plain output")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the processes' logs and the flow log"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("demo: run as root (it creates network namespaces and loads eBPF programs)")
    sys.exit(
        asyncio.run(amain(color=not args.no_color and sys.stdout.isatty(), keep=args.keep_logs))
    )


if __name__ == "__main__":
    main()
