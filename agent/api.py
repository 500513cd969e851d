"""The enforcer's local API (Unix socket, ``/v1``): status, pods, policies, explain, wait.

Pod views and ``explain`` read the live maps (records, tries, port sets, policy names)
in the datapath worker thread: they show what the datapath does, not what the agent
believes it wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import math
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from pydantic import BaseModel

from agent.cache import Cache
from agent.deciders import deciding_cluster_objects, deciding_objects
from agent.endpoints import PodRef
from agent.enforcer import Enforcer
from agent.hostnet import HostNet
from agent.mapview import MapReader
from agent.verdict import PROTOCOLS, decide
from agent.worker import DatapathWorker
from bpf import layout as lay
from bpf.attach import attachment, ours
from bpf.datapath import Datapath
from common.apimodels import (
    TABLE_WARN,
    ExplainRequest,
    ExplainResult,
    LearnedView,
    NodeStatus,
    PodView,
    PolicyRefView,
    PolicyView,
    ProcessStats,
    TableView,
    WaitResult,
    WatchView,
)
from common.echo import bounded
from common.flags import Settings
from common.kube import KubeError
from common.localapi import (
    CONNTRACK_SOCKET,
    FLOWLOGS_SOCKET,
    ApiError,
    LocalClient,
    Unavailable,
    make_app,
    socket_path,
)
from common.netlink import Netlink, NetlinkOpError
from common.watching import WatchStats

log = structlog.get_logger("agent.api")
MAX_WAIT = 600.0
# /v1/wait: how long the watches may take to reach the API server's current version while
# the objects are read in parallel (whichever settles first decides)
CATCH_UP = 0.5
HEAD_START = 0.05  # the version read alone, before the objects' read starts too


@dataclass
class AgentApi:
    settings: Settings
    cache: Cache
    enforcer: Enforcer
    hostnet: HostNet
    worker: DatapathWorker
    watches: dict[str, WatchStats]
    ready: Callable[[], list[str]]
    # the PolicyEndpoints (metadata) of a namespace, from the API server (None: no API)
    list_endpoints: Callable[[str], Awaitable[list[dict[str, Any]]]] | None = None
    # the API server's current resourceVersion (None: not asked; the objects decide)
    current_version: Callable[[], Awaitable[str]] | None = None

    @property
    def dp(self) -> Datapath:
        return self.worker.dp

    @functools.cached_property
    def reader(self) -> MapReader:
        """The worker-thread side (call it through ``self.worker``)."""
        return MapReader(self.worker.dp)

    def app(self) -> web.Application:
        app = make_app()
        app.router.add_get("/v1/status", self.status)
        app.router.add_get("/v1/pods", self.pods)
        app.router.add_get("/v1/pods/{namespace}/{name}", self.pod)
        app.router.add_get("/v1/policies", self.policies)
        app.router.add_post("/v1/explain", self.explain)
        app.router.add_get("/v1/wait", self.wait)
        app.router.add_get("/v1/fqdn", self.fqdn)
        return app

    # ---- status -----------------------------------------------------------------------
    async def status(self, _: web.Request) -> web.Response:
        problems = self.ready()
        stats = await self.worker.call(self.dp.stats)
        counts = self.dp.counts()
        conntrack, flowlogs = await asyncio.gather(
            _process_stats(self.settings.runtime_dir, CONNTRACK_SOCKET, "conntrack cleaner"),
            _process_stats(self.settings.runtime_dir, FLOWLOGS_SOCKET, "flow-log shipper"),
        )
        body = NodeStatus(
            node=self.settings.node_name,
            mode=self.settings.enforcing_mode,
            ready=not problems,
            problems=problems,
            pin_root=self.settings.bpf_pin_root,
            ingress_prog_id=self.dp.ingress_prog.id,
            egress_prog_id=self.dp.egress_prog.id,
            pods=len(self.cache.pods),
            programmed=sum(1 for ref in self.cache.pods if self.enforcer.is_programmed(ref)),
            tries=counts["tries"],
            portsets=counts["portsets"],
            policyendpoints=len(self.cache.endpoints),
            policyendpoint_stubs=len(self.cache.stubs),
            rejected=len(self.cache.rejected),
            failed={
                f"{r[0]}/{r[1]}": st.error
                for r, st in sorted(self.enforcer.status.items())
                if st.error
            },
            tables={
                t: TableView(entries=e, capacity=c)
                for t, (e, c) in sorted(self.dp.occupancy().items())
            },
            warnings=table_warnings(self.dp.occupancy()),
            datapath=stats,
            watches={
                k: WatchView(
                    synced=w.synced.is_set(),
                    lists=w.lists,
                    gone=w.gone,
                    errors=w.errors,
                    events=w.events,
                    last_error=w.last_error,
                )
                for k, w in self.watches.items()
            },
            conntrack=conntrack,
            flowlogs=flowlogs,
        )
        return _json(body)

    # ---- pods -------------------------------------------------------------------------
    async def pods(self, _: web.Request) -> web.Response:
        async with Netlink() as nl:  # one socket for every pod's attachment
            views = [await self._pod_view(ref, nl) for ref in sorted(self.cache.pods)]
        return web.json_response([v.model_dump(mode="json") for v in views])

    async def pod(self, request: web.Request) -> web.Response:
        ref = (request.match_info["namespace"], request.match_info["name"])
        if ref not in self.cache.pods:
            raise web.HTTPNotFound(reason=f"pod {ref[0]}/{ref[1]} is not on this node")
        async with Netlink() as nl:
            return _json(await self._pod_view(ref, nl))

    async def _pod_view(self, ref: PodRef, nl: Netlink) -> PodView:
        pod = self.cache.pods[ref]
        st = self.enforcer.status.get(ref)
        ifindex = st.ifindex if st else 0
        ingress = egress = None
        ing_id = egr_id = 0
        if ifindex:
            ingress, egress = await self.worker.call(self.reader.directions, ifindex)
            try:
                att = await attachment(nl, ifindex)
                ing_id, egr_id = att.ingress_prog_id, att.egress_prog_id
            except NetlinkOpError:
                pass
        link = self.hostnet.links.get(ifindex)
        current = {e.key: e for e in self.cache.endpoints_for(ref)}
        programmed = st.programmed if st else {}
        return PodView(
            namespace=pod.namespace,
            name=pod.name,
            uid=pod.uid,
            ips=list(pod.ips),
            interface=link.name if link else "",
            ifindex=ifindex,
            pod_id=st.pod_id if st else 0,
            attached=bool(ifindex) and (ing_id, egr_id) == ours(self.dp),
            ingress_prog_id=ing_id,
            egress_prog_id=egr_id,
            programmed=self.enforcer.is_programmed(ref),
            programmed_at=st.programmed_at if st and st.programmed_at else None,
            error=st.error if st else "",
            failure=st.reason if st and st.error else "",
            ingress=ingress,
            egress=egress,
            policies=[
                PolicyRefView(
                    policyendpoint=_name(k),
                    policy=_name(e.policy),
                    generation=e.generation,
                    programmed_generation=programmed.get(f"{k[0]}/{k[1]}"),
                    tier=_TIERS[e.cluster.tier] if e.cluster else None,
                    priority=e.cluster.priority if e.cluster else None,
                )
                for k, e in sorted(current.items())
            ],
        )

    # ---- policies ---------------------------------------------------------------------
    async def policies(self, _: web.Request) -> web.Response:
        by_policy: dict[tuple[str, str], PolicyView] = {}
        for e in self.cache.endpoints.values():
            view = by_policy.setdefault(
                e.policy,
                PolicyView(
                    namespace=e.policy[0],
                    name=e.policy[1],
                    tier=_TIERS[e.cluster.tier] if e.cluster else None,
                    priority=e.cluster.priority if e.cluster else None,
                    policyendpoints={},
                    pods=[],
                    rejected={},
                ),
            )
            view.policyendpoints[e.name] = e.generation
            view.pods = sorted(
                set(view.pods) | {f"{p[0]}/{p[1]}" for p in e.pods if p in self.cache.pods}
            )
        rejected = [
            PolicyView(namespace=k[0], name="?", policyendpoints={}, pods=[], rejected={k[1]: why})
            for k, why in self.cache.rejected.items()
        ]
        views = [by_policy[k] for k in sorted(by_policy)] + rejected
        return web.json_response([v.model_dump(mode="json") for v in views])

    # ---- explain ----------------------------------------------------------------------
    async def explain(self, request: web.Request) -> web.Response:
        req = ExplainRequest.model_validate(await _body(request))
        ns, name = req.pod.split("/")
        ref = (ns, name)
        pod = self.cache.pods.get(ref)
        st = self.enforcer.status.get(ref)
        if pod is None:
            raise web.HTTPNotFound(reason=f"pod {req.pod} is not on this node")
        if pod.host_network or st is None or not st.ifindex:
            why = "a hostNetwork pod" if pod.host_network else "its interface is not known yet"
            return _json(
                ExplainResult(
                    verdict="NOT_ENFORCED",
                    reason="not-enforced",
                    summary=f"{req.pod} is not enforced: {why}",
                    pod=req.pod,
                    ifindex=0,
                    state="",
                )
            )
        programmed = self.enforcer.programmed_endpoints(ref)
        priorities = {e.policy[1]: e.cluster.priority for e in programmed if e.cluster}
        snapshot = await self.worker.call(self.reader.snapshot, req, st.ifindex)
        result = decide(req, snapshot, priorities=priorities)
        if snapshot.learned is not None:
            views = [
                v
                for v in await self._learned_views([ref])
                if v.address == str(ipaddress.ip_address(req.peer))
            ]
            if views:
                v = views[0]
                result.learned = v
                when = (
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v.learned_at))
                    if v.learned_at
                    else "before the agent restarted"
                )
                because = (
                    f"{v.name.rstrip('.')} resolved to it at {when}, TTL {v.ttl}"
                    if v.name
                    else f"it was learned from a DNS answer {when}"
                )
                verb = "allowed" if result.verdict == "ALLOW" else "decided"
                result.summary = f"{verb} because {because} ({result.summary})"
            return _json(result)
        if result.priority is not None:
            result.policyendpoints = deciding_cluster_objects(
                programmed,
                policy=result.policy or "",
                ingress=req.direction == "ingress",
                peer=ipaddress.ip_address(req.peer),
                protocol=PROTOCOLS[req.protocol],
                port=0 if req.protocol == "ICMP" else req.port,
            )
        elif (
            result.state in ("POLICIES_APPLIED", "DEFAULT_DENY")
            and result.reason != "host"
            and result.tier != "DEFAULT"
        ):
            result.policyendpoints = deciding_objects(
                [e for e in programmed if e.cluster is None],
                ingress=req.direction == "ingress",
                peer=ipaddress.ip_address(req.peer),
                protocol=PROTOCOLS[req.protocol],
                port=0 if req.protocol == "ICMP" else req.port,
                allowed=result.verdict == "ALLOW",
            )
        return _json(result)

    # ---- fqdn -------------------------------------------------------------------------
    async def _learned_views(self, refs: list[PodRef]) -> list[LearnedView]:
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        interfaces = {
            ref: st.ifindexes
            for ref in refs
            if (st := self.enforcer.status.get(ref)) is not None and st.ifindexes
        }
        by_ifindex = await self.worker.call(
            self.enforcer.programmer.learned_by, [i for v in interfaces.values() for i in v]
        )
        out = []
        for ref, ifindexes in interfaces.items():
            learned = {a: e for i in ifindexes for a, e in by_ifindex.get(i, {}).items()}
            for address, e in sorted(learned.items(), key=lambda kv: (kv[0].version, kv[0])):
                out.append(
                    LearnedView(
                        pod=f"{ref[0]}/{ref[1]}",
                        address=str(address),
                        name=e.name,
                        learned_at=e.at or None,
                        ttl=e.ttl if e.name else None,
                        expires_in=round((e.expires_ns - now_ns) / 1e9, 3),
                    )
                )
        return out

    async def fqdn(self, request: web.Request) -> web.Response:
        """Addresses pods learned from their DNS answers (``?pod=ns/name``: one pod)."""
        wanted = request.query.get("pod")
        refs = [_ref(wanted)] if wanted else sorted(self.cache.pods)
        views = await self._learned_views(refs)
        return web.json_response([v.model_dump(mode="json") for v in views])

    # ---- wait -------------------------------------------------------------------------
    async def wait(self, request: web.Request) -> web.Response:
        """Until the pods (or every local pod) have programmed the *current* generation
        of their PolicyEndpoints: the agent's own view is checked against a fresh read
        from the API server (the PolicyEndpoints in each pod's namespace, where every
        one selecting it lives), so a change the watch has not delivered yet is waited
        for too. Without the API server, the agent's view is all there is (and the
        answer says so)."""
        try:
            timeout = float(request.query.get("timeout", "30"))
        except ValueError:
            timeout = math.nan
        if not 0 <= timeout < math.inf:
            raise web.HTTPBadRequest(reason="timeout must be a number of seconds, >= 0")
        timeout = min(timeout, MAX_WAIT)
        wanted = request.query.getall("pod", [])
        for w in wanted:
            if w.count("/") != 1:
                raise web.HTTPBadRequest(reason=f"pod must be namespace/name, got {bounded(w)}")
        started = time.monotonic()
        deadline = started + timeout
        truth: dict[str, dict[str, int]] | None = None
        trusted: tuple[bool, bool] = (False, False)
        read_at = -1.0
        while True:
            refs = self._wait_refs(wanted)
            if (
                self.list_endpoints is not None
                and self.enforcer.synced.is_set()  # before it, pending whatever the API says
                and time.monotonic() - read_at >= 0.5
            ):
                # re-read while pending: a PolicyEndpoint created after the last read
                # shows in the agent's view first
                read_at = time.monotonic()
                truth, trusted = await self._api_truth(refs)
            pending = self._pending(refs, wanted, truth, trusted=trusted)
            remaining = deadline - time.monotonic()
            if not pending or remaining <= 0:
                failed = {
                    p: self.enforcer.status[r].error
                    for p in pending
                    if (r := _ref(p)) in self.enforcer.status and self.enforcer.status[r].error
                }
                return _json(
                    WaitResult(
                        programmed=not pending,
                        pending=pending,
                        failed=failed,
                        waited=round(time.monotonic() - started, 3),
                        checked_with_api=truth is not None,
                        api_check=(
                            "" if truth is None else "resource-version" if trusted[0] else "objects"
                        ),
                    )
                )
            async with self.enforcer.progress:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.enforcer.progress.wait(), min(remaining, 0.5))

    def _wait_refs(self, wanted: list[str]) -> list[PodRef]:
        if wanted:
            return [(w.split("/", 1)[0], w.split("/", 1)[1]) for w in wanted]
        return [r for r, p in self.cache.pods.items() if not p.host_network and p.ips]

    async def _api_truth(
        self, refs: list[PodRef]
    ) -> tuple[dict[str, dict[str, int]] | None, tuple[bool, bool]]:
        """What the API server holds now, to check the agent's view against: (objects
        read, (PolicyEndpoint views current, ClusterPolicyEndpoint view current)).

        Two ways, raced: the API server's current resourceVersion (one item's metadata)
        is compared with the versions the watches' views are at, and, unless that
        settled within HEAD_START, the objects of the pods' namespaces are read in
        parallel (their metadata: a namespace may hold thousands). A watch at or past
        that version has delivered every change made before this call: its view is the
        API's, and its objects need not be read. Whichever settles first decides; the
        ClusterPolicyEndpoints (few) are read unless their view is current too."""
        if self.current_version is None:
            return await self._api_view(refs), (False, False)
        version = asyncio.ensure_future(self._views_current())
        full: asyncio.Future[dict[str, dict[str, int]] | None] | None = None
        try:
            # the cheap read gets a head start: an API server that serves one request at
            # a time would otherwise make it wait behind the large one
            await asyncio.wait({version}, timeout=HEAD_START)
            if not (version.done() and version.result()[0]):
                full = asyncio.ensure_future(self._api_view(refs))
                await asyncio.wait({full, version}, return_when=asyncio.FIRST_COMPLETED)
                if full.done() or not version.result()[0]:
                    return await full, (False, False)
            if version.result()[1]:
                return {}, (True, True)
            return await self._api_view(refs, namespaces=False), (True, False)
        finally:
            for task in (full, version):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _views_current(self) -> tuple[bool, bool]:
        """(PolicyEndpoint view, ClusterPolicyEndpoint view) at or past the API server's
        current resourceVersion, waiting up to CATCH_UP for the PolicyEndpoints' (an
        event in flight). Both False when it cannot be told (versions that are not
        numbers, the API server unavailable)."""
        assert self.current_version is not None
        try:
            target = int(await asyncio.wait_for(self.current_version(), 5))
        except (KubeError, OSError, TimeoutError, ValueError) as exc:
            log.debug("wait.version_unknown", error=str(exc)[:200])
            return False, False
        deadline = time.monotonic() + CATCH_UP
        while True:
            namespaces = self._view_at("policyendpoints") >= target
            cluster = self._view_at("clusterpolicyendpoints") >= target
            if namespaces or time.monotonic() >= deadline:
                return namespaces, cluster
            await asyncio.sleep(0.005)

    def _view_at(self, watch: str) -> int:
        """The resourceVersion a watch's view is at (-1: unknown; a resource the API
        server does not serve has nothing to deliver)."""
        st = self.watches.get(watch)
        if st is None:
            return -1
        if not st.served:
            return sys.maxsize
        try:
            return int(st.resource_version)
        except ValueError:
            return -1

    async def _api_view(
        self, refs: list[PodRef], *, namespaces: bool = True
    ) -> dict[str, dict[str, int]] | None:
        """namespace -> {PolicyEndpoint name: generation} as the API server has them now
        (metadata only: cheap whatever the objects' size); None if it cannot be asked.
        ``namespaces`` False: the ClusterPolicyEndpoints alone."""
        assert self.list_endpoints is not None
        out: dict[str, dict[str, int]] = {}
        # "": the ClusterPolicyEndpoints (cluster-scoped: any of them may select a pod)
        scopes = ["", *sorted({r[0] for r in refs})] if namespaces else [""]
        for ns in scopes if refs else []:
            try:
                items = await self.list_endpoints(ns)
            except (KubeError, OSError, TimeoutError) as exc:
                log.warning("wait.api_unavailable", namespace=ns, error=str(exc))
                return None
            out[ns] = {
                str((pe.get("metadata") or {}).get("name", "")): int(
                    (pe.get("metadata") or {}).get("generation") or 0
                )
                for pe in items
            }
        return out

    def _pending(
        self,
        refs: list[PodRef],
        wanted: list[str],
        truth: dict[str, dict[str, int]] | None,
        *,
        trusted: tuple[bool, bool] = (False, False),
    ) -> list[str]:
        """Pods whose current PolicyEndpoints are not all in force. With the API's view
        of the pod's namespace (every PolicyEndpoint selecting a pod lives there) and of
        the ClusterPolicyEndpoints: the watch must have delivered the current generation
        of each of them (so the agent knows which select the pod), none the agent holds
        for the pod may be gone, and none may have been rejected. A scope ``trusted``
        (namespaces, cluster) is one whose watch had delivered up to the API server's
        current version (see _api_truth): the agent's view of it is the API's."""
        if not self.enforcer.synced.is_set():
            return wanted or ["(initial sync)"]
        seen = self.cache.generations
        pending = []
        for ref in refs:
            done = self.enforcer.is_programmed(ref)
            if done and truth is not None:
                held = self.cache.endpoints_for(ref)
                done = not any(e.key in self.cache.rejected for e in held)
                for ns in (ref[0], ""):  # its namespace's objects, and the cluster's
                    if trusted[0 if ns else 1]:
                        continue
                    current = truth.get(ns, {})
                    done = (
                        done
                        and all(seen.get((ns, n), -1) >= g for n, g in current.items())
                        and all(e.name in current for e in held if e.namespace == ns)
                    )
            if not done:
                pending.append(f"{ref[0]}/{ref[1]}")
        return pending


_TIERS = {lay.NP_TIER_ADMIN: "Admin", lay.NP_TIER_BASELINE: "Baseline"}


def _name(ref: tuple[str, str]) -> str:
    """namespace/name; a cluster-scoped object by its name alone."""
    return f"{ref[0]}/{ref[1]}" if ref[0] else ref[1]


def _ref(text: str) -> PodRef:
    ns, _, name = text.partition("/")
    return (ns, name)


def table_warnings(occupancy: dict[str, tuple[int, int]]) -> list[str]:
    """Tables at or over TABLE_WARN of their capacity, as sentences."""
    return [
        f"table {t} is {e}/{c} full ({e / c:.0%})"
        for t, (e, c) in sorted(occupancy.items())
        if c and e / c >= TABLE_WARN
    ]


async def _process_stats(runtime_dir: str, sock: str, what: str) -> ProcessStats:
    client = LocalClient(socket_path(runtime_dir, sock), process=what)
    try:
        return await client.get("/v1/stats", ProcessStats, timeout=2)
    except (Unavailable, ApiError) as exc:
        return ProcessStats(running=False, error=str(exc))


async def _body(request: web.Request) -> object:
    try:
        return await request.json()
    except ValueError:
        raise web.HTTPBadRequest(reason="body must be JSON") from None


def _json(model: BaseModel) -> web.Response:
    return web.json_response(model.model_dump(mode="json"))
