"""np-agent: the policy enforcer process.

Watches this node's pods and the PolicyEndpoints, and keeps the eBPF datapath on the
pods' veths programmed accordingly. Stopping it (SIGTERM, crash, kill -9) leaves the
datapath enforcing the last programmed state; a new run adopts it without a gap.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import structlog

from agent.api import AgentApi, table_warnings
from agent.cache import Cache
from agent.cni.calls import CniCalls
from agent.cni.ipamd import NodeConfig, from_ipamd
from agent.dnsproxy import DnsProxy, Upstream
from agent.dnssteer import Steering
from agent.enforcer import Enforcer
from agent.fetching import fetch_stubs
from agent.gate import Gate
from agent.hostnet import HostNet
from agent.metrics import AgentMetrics
from agent.probes import bpffs_ready, global_maps_pinned, metrics_app
from agent.worker import DatapathWorker
from bpf import layout as lay
from bpf import preflight, recovery
from bpf.datapath import Datapath
from bpf.errors import BpfError
from bpf.loading import PinnedSizeError
from common import logs, memory
from common.flags import Settings, parse_settings
from common.httpserve import health_app, serve
from common.kube import (
    CLUSTER_POLICY_ENDPOINTS,
    PODS,
    POLICY_ENDPOINTS,
    SERVICES,
    KubeClient,
    KubeError,
)
from common.localapi import (
    AGENT_SOCKET,
    CONNTRACK_SOCKET,
    FLOWLOGS_SOCKET,
    serve_unix,
    socket_path,
)
from common.loopmon import LoopMonitor
from common.netlink import Netlink
from common.supervisor import FlagError, StartupError, run_process, supervise
from common.watching import WatchStats, list_watch, stalled_problems

log = structlog.get_logger("agent")


def open_datapath(settings: Settings) -> Datapath:
    try:
        return Datapath.open(
            settings.bpf_pin_root,
            ct_entries=settings.conntrack_cache_table_size,
            read_tries=False,  # read by the enforcer's "tries" task, while it programs
        )
    except PinnedSizeError as exc:
        raise FlagError(
            f"invalid --conntrack-cache-table-size={settings.conntrack_cache_table_size}: {exc}"
        ) from None
    except BpfError as exc:
        log.debug("datapath.load_failed", detail=exc.detail)
        raise StartupError(f"cannot load the datapath: {exc.strerror}") from None


async def recover_pins(settings: Settings) -> None:
    """If the maps' pins are gone but our programs are still attached to pod veths,
    pin the live maps again (see bpf.recovery) so that this run adopts them."""
    if not recovery.pins_missing(settings.bpf_pin_root):
        return
    async with Netlink() as nl:
        for link in await nl.links():
            if not any(link.name.startswith(p) for p in settings.pod_interface_prefixes):
                continue
            for f in await nl.bpf_filters(link.index):
                if f.name not in (lay.PROG_INGRESS, lay.PROG_EGRESS) or not f.prog_id:
                    continue
                try:
                    pinned = recovery.repin_from_program(f.prog_id, settings.bpf_pin_root)
                except (BpfError, ValueError) as exc:
                    log.warning("datapath.recovery_failed", prog_id=f.prog_id, error=str(exc))
                    continue
                log.warning(
                    "datapath.recovered",
                    from_program=f.prog_id,
                    interface=link.name,
                    maps=pinned,
                    reason="pins were missing; live maps pinned again",
                )
                return


class Node:
    """The agent's parts on one node, and what its tasks and probes ask of them."""

    def __init__(
        self,
        settings: Settings,
        dp: Datapath,
        kube: KubeClient,
        metrics: AgentMetrics,
        ipamd: NodeConfig | None = None,
    ) -> None:
        self.settings = settings
        self.dp = dp
        self.kube = kube
        self.metrics = metrics
        self.worker = DatapathWorker(dp)
        self.hostnet = HostNet(
            prefixes=settings.pod_interface_prefixes,
            extra_addresses=frozenset(ipamd.addresses if ipamd else ()),
        )
        self.cache = Cache(
            node_addresses=self.hostnet.node_addresses,
            on_rejected=lambda ns, name, _: metrics.count_rejected(namespace=ns, name=name),
            on_ignored=lambda reason: metrics.ignored_entries.labels(reason).inc(),
            on_pod_rejected=metrics.pods_rejected.inc,
        )
        self.upstreams = [
            Upstream(ipaddress.ip_address(a), 53, settings.dns_proxy_port + i)
            for i, a in enumerate(settings.cluster_dns)
        ]
        self.steering = Steering(self.upstreams) if self.upstreams else None
        self.enforcer = Enforcer(
            cache=self.cache,
            hostnet=self.hostnet,
            worker=self.worker,
            metrics=metrics,
            strict=settings.enforcing_mode == "strict",
            gate=Gate(settings.pod_interface_prefixes, enabled=settings.enforcing_mode == "strict"),
            steering=self.steering,
            fqdn_ttl_grace=settings.fqdn_ttl_grace,
        )
        self.proxy = DnsProxy(self.upstreams, learn=self.enforcer.learn) if self.upstreams else None
        self.watches = {
            "pods": WatchStats(),
            "policyendpoints": WatchStats(),
            "clusterpolicyendpoints": WatchStats(),
        }
        self.cni = CniCalls(
            enforcer=self.enforcer,
            hostnet=self.hostnet,
            metrics=metrics,
            answer_timeout=settings.cni_answer_timeout,
            multi_nic=bool(ipamd and ipamd.multi_nic),
        )

    # ---- tasks ----------------------------------------------------------------------
    async def watch_pods(self) -> None:
        await list_watch(
            self.kube,
            PODS,
            self.cache.pods_consumer(),
            stats=self.watches["pods"],
            field_selector=f"spec.nodeName={self.settings.node_name}",
        )

    async def local_state_known(self) -> None:
        """The node's addresses and its pods: what decides which PolicyEndpoints concern
        the node (those of namespaces without local pods are kept as stubs)."""
        await self.hostnet.ready.wait()
        await self.watches["pods"].synced.wait()

    async def watch_endpoints(self) -> None:
        # the list's first pages are on their way while the local state loads
        await list_watch(
            self.kube,
            POLICY_ENDPOINTS,
            self.cache.endpoints_consumer(),
            stats=self.watches["policyendpoints"],
            ready=self.local_state_known,
        )

    async def watch_cluster_endpoints(self) -> None:
        await list_watch(
            self.kube,
            CLUSTER_POLICY_ENDPOINTS,
            self.cache.endpoints_consumer(cluster=True),
            stats=self.watches["clusterpolicyendpoints"],
            optional=True,  # clusters without the ClusterNetworkPolicy CRDs
            ready=self.local_state_known,
        )

    async def steer_dns(self) -> None:
        """Steer pods' DNS to the proxy while the agent runs; removed on the way out,
        so DNS goes to the cluster DNS directly when the agent is stopped."""
        assert self.steering is not None
        await self.hostnet.ready.wait()
        node: dict[int, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
        for text in sorted(self.hostnet.node_addresses()):
            addr = ipaddress.ip_address(text)
            if not (addr.is_loopback or addr.is_link_local):
                node.setdefault(addr.version, addr)
        try:
            await self.steering.install(node, ())
            await asyncio.Event().wait()
        finally:
            await self.steering.remove()

    async def fetch_endpoints(self) -> None:
        await fetch_stubs(
            self.kube, self.cache, count=lambda result: self.metrics.fetches.labels(result).inc()
        )

    # ---- probes and metrics -----------------------------------------------------------
    def ready(self) -> list[str]:
        problems = bpffs_ready() + global_maps_pinned(self.settings.bpf_pin_root)
        if not self.cni.serving.is_set():
            problems.append(f"the CNI's socket {self.settings.npa_socket} is not served")
        if not all(st.synced.is_set() for st in self.watches.values()):
            problems.append("watches not synced")
        elif not self.enforcer.synced.is_set():
            problems.append("initial reconcile not done")
        problems += stalled_problems(self.watches)
        problems += [
            f"table {t} is full ({e}/{c}): new pods cannot be programmed"
            for t, (e, c) in sorted(self.dp.occupancy().items())
            if c and e >= c
        ]
        return problems

    def warnings(self) -> list[str]:
        return table_warnings(self.dp.occupancy())

    async def refresh_metrics(self) -> None:
        # the drop counters come from the flow-log shipper (appended to /metrics)
        problems = await asyncio.to_thread(self.ready)  # looks at files: off the loop
        self.metrics.ready.set(0 if problems else 1)
        for name, st in self.watches.items():
            self.metrics.watch_relists.labels(name).set(st.lists)
            self.metrics.watch_errors.labels(name).set(st.errors)
            self.metrics.watch_malformed.labels(name).set(st.malformed + st.rejected)

    async def list_endpoints(self, namespace: str) -> list[dict[str, Any]]:
        """The PolicyEndpoints of a namespace; "": the ClusterPolicyEndpoints (none if
        their CRD is not installed)."""
        if namespace:
            items, _ = await asyncio.wait_for(
                self.kube.list_metadata(POLICY_ENDPOINTS, namespace=namespace), 5
            )
            return items
        try:
            items, _ = await asyncio.wait_for(self.kube.list_metadata(CLUSTER_POLICY_ENDPOINTS), 5)
        except KubeError as exc:
            if exc.status == 404:
                return []
            raise
        return items

    async def endpoints_version(self) -> str:
        """The API server's current resourceVersion (see KubeClient.collection_version)."""
        return await self.kube.collection_version(POLICY_ENDPOINTS)

    def tasks(self) -> dict[str, Coroutine[Any, Any, None]]:
        settings = self.settings
        api = AgentApi(
            settings=settings,
            cache=self.cache,
            enforcer=self.enforcer,
            hostnet=self.hostnet,
            worker=self.worker,
            watches=self.watches,
            ready=self.ready,
            list_endpoints=self.list_endpoints,
            current_version=self.endpoints_version,
        )
        others = [
            socket_path(settings.runtime_dir, CONNTRACK_SOCKET),
            socket_path(settings.runtime_dir, FLOWLOGS_SOCKET),
        ]
        tasks: dict[str, Coroutine[Any, Any, None]] = {
            "api": serve_unix(api.app(), socket_path(settings.runtime_dir, AGENT_SOCKET)),
            "cni": self.cni.serve(settings.npa_socket),
            "hostnet": self.hostnet.run(),
            "watch-pods": self.watch_pods(),
            "watch-policyendpoints": self.watch_endpoints(),
            "watch-clusterpolicyendpoints": self.watch_cluster_endpoints(),
            "fetch-policyendpoints": self.fetch_endpoints(),
            "enforcer": self.enforcer.run(),
            "tries": self.enforcer.keep_tries(),
            "loop-monitor": LoopMonitor(self.metrics.registry, "awsnodeagent").run(),
            "health": serve(
                health_app([self.ready], [self.warnings]), settings.health_probe_bind_addr
            ),
            "metrics": serve(
                metrics_app(self.metrics, self.refresh_metrics, others),
                settings.metrics_bind_addr,
            ),
        }
        if self.proxy is not None:
            tasks["dns-proxy"] = self.proxy.serve()
            tasks["dns-steering"] = self.steer_dns()
        if os.environ.get(memory.PROFILE_ENV):  # diagnostics only (see common.memory)
            tasks["memory-profile"] = memory.profile(os.environ[memory.PROFILE_ENV])
        return tasks


CLUSTER_DNS_SERVICE = ("kube-system", "kube-dns")


async def discover_cluster_dns(kube: KubeClient) -> tuple[str, ...]:
    """The cluster DNS addresses when --cluster-dns is not given: the ClusterIPs of the
    kube-system/kube-dns Service (what pods' resolv.conf names). None found: domain
    rules learn nothing, which is logged."""
    ns, name = CLUSTER_DNS_SERVICE
    try:
        svc = await asyncio.wait_for(kube.get(SERVICES, ns, name), 10)
    except (KubeError, OSError, TimeoutError) as exc:
        log.warning(
            "agent.cluster_dns_unknown",
            service=f"{ns}/{name}",
            error=str(exc)[:200],
            effect="domain-name rules learn nothing; set --cluster-dns",
        )
        return ()
    spec = svc.get("spec") or {}
    ips = [ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")] if ip and ip != "None"]
    log.info("agent.cluster_dns", service=f"{ns}/{name}", addresses=ips)
    return tuple(ips)


async def run(settings: Settings, *, stop: asyncio.Event) -> None:
    metrics = AgentMetrics()
    if not settings.enable_network_policy:
        log.info("agent.disabled", reason="--enable-network-policy is false")
        # the CNI calls whenever ipamd has a mode: every call succeeds, enforcing nothing
        cni = CniCalls(enforcer=None, hostnet=None, metrics=metrics, answer_timeout=0)
        await Gate((), enabled=False).install(())  # a strict run's gate would stay shut
        await supervise(
            {
                "cni": cni.serve(settings.npa_socket),
                "health": serve(health_app([]), settings.health_probe_bind_addr),
                "metrics": serve(metrics_app(metrics), settings.metrics_bind_addr),
            },
            stop=stop,
            grace=settings.shutdown_timeout,
        )
        return
    ipamd = await from_ipamd(settings.ipamd_socket)
    if ipamd is not None and ipamd.mode and ipamd.mode != settings.enforcing_mode:
        log.info(
            "agent.mode_from_ipamd",
            mode=ipamd.mode,
            environment=settings.enforcing_mode,
            reason="ipamd's mode is the one the CNI sends with every pod",
        )
        settings = settings.model_copy(update={"enforcing_mode": ipamd.mode})

    problems = preflight.problems(settings.bpf_pin_root)
    if problems:
        raise StartupError("; ".join(problems))
    await recover_pins(settings)
    dp = await asyncio.get_running_loop().run_in_executor(None, open_datapath, settings)
    kube: KubeClient | None = None
    node: Node | None = None
    try:
        kube = await KubeClient.connect(settings.kubeconfig)
        if not settings.cluster_dns:
            settings = settings.model_copy(update={"cluster_dns": await discover_cluster_dns(kube)})
        node = Node(settings, dp, kube, metrics, ipamd)
        await node.worker.call(
            dp.set_event_flags,
            emit_deny=settings.enable_policy_event_logs,
            emit_allow=settings.enable_policy_event_logs and settings.log_level == "debug",
        )
        log.info(
            "agent.starting",
            node=settings.node_name,
            mode=settings.enforcing_mode,
            pin_root=settings.bpf_pin_root,
        )
        await supervise(node.tasks(), stop=stop, grace=settings.shutdown_timeout)
    finally:
        if kube is not None:
            await kube.close()
        if node is not None:
            node.worker.close()
        dp.close()
        log.info("agent.stopped", datapath="left enforcing (pinned)")


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings("np-agent", __doc__.splitlines()[1], argv)
    if settings.enable_network_policy and not settings.node_name:
        sys.stderr.write("np-agent: invalid --node-name='': required (or set MY_NODE_NAME)\n")
        raise SystemExit(2)
    logs.configure(settings.log_level, process="agent", json=not sys.stderr.isatty())
    run_process("np-agent", lambda stop: run(settings, stop=stop))


if __name__ == "__main__":
    main()
