"""The conformance harness: scenarios run against the real processes on one simulated node.

One node serves every scenario of a run: the fake API server (in this process, listening
in the node's namespace), the resolver and the enforcer (real processes in the node's
network namespace), and namespace pods answering on their declared ports. Between
scenarios the world is reconciled (namespaces, pods, labels) and every policy removed.

After each step's actions the harness waits for the resolver to catch up and for the
agent's "programmed" signal, then probes every ordered pair of pods concurrently,
retrying until the matrix matches or 10 s passed since the actions; it then asks the
agent to ``explain`` every cell and checks that the answers agree with the traffic.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.apimodels import ExplainRequest, ExplainResult
from fakekube import store as fs
from simnode.node import SimNode, SimPod
from simnode.traffic import PodServer, tcp_probe, udp_probe
from tests.conformance.scenario import (
    Obj,
    PodKey,
    PodSpec,
    Probe,
    Scenario,
    WorldSpec,
    api_defaults,
    cluster_defaults,
    expected,
    render,
)
from tests.privileged.agentrig import AgentRig

CONVERGE_SECONDS = 10.0
PROBE_TIMEOUT = 0.3
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class LivePod:
    spec: PodSpec
    sim: SimPod
    server: PodServer


@dataclass
class CaseResult:
    name: str
    ok: bool
    message: str = ""
    step_seconds: list[float] = field(default_factory=list)

    def line(self) -> str:
        times = ", ".join(f"{t:.2f}s" for t in self.step_seconds)
        head = f"{'PASS' if self.ok else 'FAIL'} {self.name} (steps: {times})"
        return head if self.ok else f"{head}: {self.message}"


# How the resolver lays policies out, per conformance pass: our paired layout at the
# default chunk size, and the AWS controller's layout at chunk size 1, so that every
# policy with more than one pod or entry is split into pod-only and rule-only objects.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "paired": (),
    "controller-1": ("--endpoint-layout=controller", "--endpoint-chunk-size=1"),
}


class Cluster:
    def __init__(
        self, sim: SimNode, *, workdir: Path, pin_root: str, layout: str = "paired"
    ) -> None:
        self.layout = layout
        self.sim = sim
        self.rig = AgentRig(sim, pin_root=pin_root, workdir=workdir)
        self.workdir = workdir
        self.store = self.rig.api.store
        self.pods: dict[PodKey, LivePod] = {}
        self._next_port: dict[PodKey, int] = {}
        self.agent = self.rig.agent

    # ---- processes --------------------------------------------------------------------
    async def start(self) -> None:
        await self.rig.start_api()
        await self.rig.start("resolver", "--log-level=info", *LAYOUTS[self.layout])
        await self.rig.start_agent("--log-level=info")
        await self.rig.ready(timeout=30)

    async def stop(self) -> None:
        for live in self.pods.values():
            await live.server.close()
        await self.rig.close()

    # ---- the world --------------------------------------------------------------------
    def address(self, key: PodKey, family: int) -> Address:
        return self.pods[key].sim.address(family)

    async def prepare(self, world: WorldSpec) -> None:
        for ns, name in list(self.store.objects[fs.NETWORK_POLICIES]):
            self.store.delete(fs.NETWORK_POLICIES, ns, name)
        for _, name in list(self.store.objects[fs.CLUSTER_NETWORK_POLICIES]):
            self.store.delete(fs.CLUSTER_NETWORK_POLICIES, "", name)
        wanted_ns = set(world.namespaces) | {p.namespace for p in world.pods}
        for ns in sorted(wanted_ns):
            labels = world.namespace_labels(ns)
            try:
                current = self.store.get(fs.NAMESPACES, "", ns)
            except fs.ApiError:
                self.store.create(fs.NAMESPACES, None, {"metadata": {"name": ns, "labels": labels}})
                continue
            if current["metadata"].get("labels") != labels:
                current["metadata"]["labels"] = labels
                self.store.update(fs.NAMESPACES, "", ns, current)
        wanted = {p.key: p for p in world.pods}
        for key in [
            k
            for k in self.pods
            if k not in wanted or tuple(self.pods[k].spec.ports) != tuple(wanted[k].ports)
        ]:
            await self._delete_pod(key)
        for key, spec in wanted.items():
            if key in self.pods:
                self._set_labels(key, spec.labels)
            else:
                await self._create_pod(spec)
        for _, ns in list(self.store.objects[fs.NAMESPACES]):
            if ns not in wanted_ns:
                self.store.delete(fs.NAMESPACES, "", ns)
        await self.settle()

    async def _create_pod(self, spec: PodSpec) -> None:
        sim = await self.sim.add_pod(f"{spec.namespace}-{spec.name}")
        listen = [(int(p["port"]), str(p.get("protocol", "TCP"))) for p in spec.ports]
        server = PodServer(name=f"{spec.namespace}/{spec.name}", netns=sim.netns, listen=listen)
        await server.start()
        self.pods[spec.key] = LivePod(spec, sim, server)
        self.rig.create_pod_object(
            sim,
            namespace=spec.namespace,
            name=spec.name,
            labels=dict(spec.labels),
            ports=[
                (str(p.get("name") or ""), int(p["port"]), str(p.get("protocol", "TCP")))
                for p in spec.ports
            ],
        )

    async def _delete_pod(self, key: PodKey) -> None:
        live = self.pods.pop(key)
        self.store.delete(fs.PODS, key[0], key[1])
        await live.server.close()
        await self.sim.remove_pod(live.sim.name)

    def _set_labels(self, key: PodKey, labels: dict[str, str]) -> None:
        pod = self.store.get(fs.PODS, key[0], key[1])
        if pod["metadata"].get("labels") != labels:
            pod["metadata"]["labels"] = dict(labels)
            self.store.update(fs.PODS, key[0], key[1], pod)
        self.pods[key].spec.labels = dict(labels)

    # ---- actions ----------------------------------------------------------------------
    async def apply(self, action: Obj, family: int) -> None:
        ((kind, arg),) = action.items()
        if kind in ("create_policy", "update_policy"):
            body = api_defaults(
                render(
                    arg,
                    address=lambda k: self.address(k, family),
                    node_ip=str(self.sim.node_ipv4 if family == 4 else self.sim.node_ipv6),
                )
            )
            ns = body["metadata"].setdefault("namespace", "default")
            if kind == "create_policy":
                self.store.create(fs.NETWORK_POLICIES, ns, body)
            else:
                current = self.store.get(fs.NETWORK_POLICIES, ns, body["metadata"]["name"])
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                self.store.update(fs.NETWORK_POLICIES, ns, body["metadata"]["name"], body)
        elif kind == "delete_policy":
            self.store.delete(fs.NETWORK_POLICIES, arg.get("namespace", "default"), arg["name"])
        elif kind in ("create_cluster_policy", "update_cluster_policy"):
            body = cluster_defaults(
                render(
                    arg,
                    address=lambda k: self.address(k, family),
                    node_ip=str(self.sim.node_ipv4 if family == 4 else self.sim.node_ipv6),
                )
            )
            name = body["metadata"]["name"]
            body["metadata"].pop("namespace", None)
            if kind == "create_cluster_policy":
                self.store.create(fs.CLUSTER_NETWORK_POLICIES, None, body)
            else:
                current = self.store.get(fs.CLUSTER_NETWORK_POLICIES, "", name)
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                self.store.update(fs.CLUSTER_NETWORK_POLICIES, "", name, body)
        elif kind == "delete_cluster_policy":
            self.store.delete(fs.CLUSTER_NETWORK_POLICIES, "", arg["name"])
        elif kind == "set_pod_labels":
            ns, name = arg["pod"].split("/")
            self._set_labels((ns, name), dict(arg.get("labels") or {}))
        elif kind == "set_namespace_labels":
            ns = arg["namespace"]
            current = self.store.get(fs.NAMESPACES, "", ns)
            current["metadata"]["labels"] = {
                **(arg.get("labels") or {}),
                "kubernetes.io/metadata.name": ns,
            }
            self.store.update(fs.NAMESPACES, "", ns, current)
        elif kind == "create_pod":
            spec = PodSpec(arg["ns"], arg["name"], dict(arg.get("labels") or {}))
            if arg.get("ports"):
                spec.ports = tuple(arg["ports"])
            await self._create_pod(spec)
        elif kind == "delete_pod":
            ns, name = arg["pod"].split("/")
            await self._delete_pod((ns, name))
        else:
            raise ValueError(f"unknown action {kind}")

    async def settle(self, timeout: float = CONVERGE_SECONDS) -> None:
        """The resolver has seen every change and written its objects; the agent has
        programmed every local pod."""
        await self.rig.settle(timeout)

    # ---- traffic ----------------------------------------------------------------------
    def _source_port(self, key: PodKey) -> int:
        """A client port not used recently by this pod: a reused port could match a flow
        the datapath still tracks from an earlier step and pass as established."""
        port = self._next_port.get(key, 20000)
        self._next_port[key] = 20000 if port >= 60999 else port + 1
        return port

    async def observe(self, probe: Probe, family: int) -> dict[tuple[PodKey, PodKey], bool]:
        keys = sorted(self.pods)
        cells = [(s, d) for s in keys for d in keys if s != d]
        fn = tcp_probe if probe.protocol == "TCP" else udp_probe

        async def one(src: PodKey, dst: PodKey) -> bool:
            return await fn(
                netns=self.pods[src].sim.netns,
                target=self.address(dst, family),
                port=probe.port,
                timeout=PROBE_TIMEOUT,
                expect=f"{dst[0]}/{dst[1]}",
                source_port=self._source_port(src),
            )

        results = await asyncio.gather(*(one(s, d) for s, d in cells))
        return dict(zip(cells, results, strict=True))

    async def explain(
        self, probe: Probe, family: int, observed: dict[tuple[PodKey, PodKey], bool]
    ) -> list[str]:
        """Cells where the agent's explanation disagrees with the traffic."""
        if probe.protocol not in ("TCP", "UDP", "SCTP"):
            return []

        async def direction(subject: PodKey, peer: PodKey, way: str) -> bool:
            req = ExplainRequest(
                pod=f"{subject[0]}/{subject[1]}",
                peer=str(self.address(peer, family)),
                port=probe.port,
                protocol=probe.protocol,  # type: ignore[arg-type]
                direction=way,  # type: ignore[arg-type]
            )
            res = await self.agent.request("POST", "/v1/explain", ExplainResult, body=req)
            return res.verdict != "DENY"

        async def cell(src: PodKey, dst: PodKey) -> bool:
            out, into = await asyncio.gather(
                direction(src, dst, "egress"), direction(dst, src, "ingress")
            )
            return out and into

        cells = sorted(observed)
        predicted = await asyncio.gather(*(cell(s, d) for s, d in cells))
        return [
            f"{_k(s)}->{_k(d)} traffic {_v(observed[(s, d)])} explain {_v(p)}"
            for (s, d), p in zip(cells, predicted, strict=True)
            if p != observed[(s, d)]
        ]

    # ---- a scenario -------------------------------------------------------------------
    async def run(self, scenario: Scenario) -> CaseResult:
        result = CaseResult(f"{scenario.name} [{self.layout}]", ok=True)
        family = scenario.world.family
        await self.prepare(scenario.world)
        for i, step in enumerate(scenario.steps, 1):
            started = time.monotonic()
            for action in step.actions:
                await self.apply(action, family)
            await self.settle()
            while True:
                observed = await asyncio.gather(*(self.observe(p, family) for p in step.probes))
                wrong = _mismatches(step.probes, observed, sorted(self.pods))
                if not wrong or time.monotonic() - started > CONVERGE_SECONDS:
                    break
            result.step_seconds.append(time.monotonic() - started)
            if wrong:
                result.ok = False
                result.message = f"step {i}: {len(wrong)} cells differ: " + "; ".join(wrong[:4])
                return result
            for probe, cells in zip(step.probes, observed, strict=True):
                disagree = await self.explain(probe, family, cells)
                if disagree:
                    result.ok = False
                    result.message = (
                        f"step {i} {probe.port}/{probe.protocol}: explain "
                        f"disagrees on {len(disagree)} cells: " + "; ".join(disagree[:4])
                    )
                    return result
        return result


def _k(key: PodKey) -> str:
    return f"{key[0]}/{key[1]}"


def _v(allowed: bool) -> str:
    return "allow" if allowed else "deny"


def _mismatches(
    probes: list[Probe], observed: list[dict[tuple[PodKey, PodKey], bool]], pods: list[PodKey]
) -> list[str]:
    out: list[str] = []
    for probe, cells in zip(probes, observed, strict=True):
        want = expected(probe, pods)
        for cell in sorted(want):
            if want[cell] != cells[cell]:
                out.append(
                    f"{probe.port}/{probe.protocol} {_k(cell[0])}->{_k(cell[1])} "
                    f"expected {_v(want[cell])} got {_v(cells[cell])}"
                )
    return out


def summary(results: list[CaseResult]) -> str:
    passed = sum(1 for r in results if r.ok)
    return f"{passed} passed, {len(results) - passed} failed"
