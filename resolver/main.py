"""np-resolver: writes PolicyEndpoints from NetworkPolicies (leader-elected replicas).

For clusters without the AWS network policy controller (kind, self-managed). Replicas
elect a leader over a Lease (--leader-elect); the others keep their watches warm and
write nothing until they hold it. Its local API (``resolver.sock`` under --runtime-dir)
reports whether it has caught up; /healthz and /readyz (watches synced) are served on
--health-probe-bind-addr, the controller's metrics on --metrics-bind-addr.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import uuid
from collections.abc import Sequence

import structlog
from aiohttp import web
from pydantic import BaseModel

from common import logs
from common.flags import Settings, parse_settings
from common.httpserve import health_app, serve
from common.kube import (
    APPLICATION_NETWORK_POLICIES,
    CLUSTER_NETWORK_POLICIES,
    CLUSTER_POLICY_ENDPOINTS,
    NAMESPACES,
    NETWORK_POLICIES,
    PODS,
    POLICY_ENDPOINTS,
    SERVICES,
    KubeClient,
)
from common.localapi import make_app, serve_unix, socket_path
from common.supervisor import run_process, supervise
from common.watching import WatchStats, list_watch, stalled_problems
from resolver.leader import LeaderElector
from resolver.metrics import metrics_app
from resolver.sync import Resolver

log = structlog.get_logger("resolver")
RESOLVER_SOCKET = "resolver.sock"
OPTIONAL = (CLUSTER_NETWORK_POLICIES, CLUSTER_POLICY_ENDPOINTS, APPLICATION_NETWORK_POLICIES)


class ResolverStatus(BaseModel):
    synced: bool
    leader: bool  # holds the Lease (always, without --leader-elect)
    identity: str
    idle: bool
    observed_resource_version: int
    policies: int
    pods: int
    policyendpoints: int
    writes: int
    creates: int
    updates: int
    deletes: int
    conflicts: int
    errors: int
    invalid: int  # NetworkPolicies that could not be resolved
    bugs: int = 0  # resolutions that raised (a resolver bug: see the log)
    batches: int
    last_batch_ms: float


def api(resolver: Resolver, elector: LeaderElector | None, identity: str) -> web.Application:
    async def status(_: web.Request) -> web.Response:
        s = resolver.stats
        body = ResolverStatus(
            synced=all(resolver.synced.values()),
            leader=elector is None or elector.is_leader.is_set(),
            identity=identity,
            idle=resolver.idle.is_set(),
            observed_resource_version=s.observed_rv,
            policies=len(resolver.policies),
            pods=len(resolver.world.pods),
            policyendpoints=sum(len(v) for v in resolver.owned.values()),
            writes=s.writes,
            creates=s.creates,
            updates=s.updates,
            deletes=s.deletes,
            conflicts=s.conflicts,
            errors=s.errors,
            invalid=s.invalid,
            bugs=s.bugs,
            batches=s.batches,
            last_batch_ms=s.last_batch_ms,
        )
        return web.json_response(body.model_dump())

    app = make_app()
    app.router.add_get("/v1/status", status)
    return app


async def run(settings: Settings, *, stop: asyncio.Event) -> None:
    kube = await KubeClient.connect(settings.kubeconfig)
    try:
        resolver = Resolver(
            kube, layout=settings.endpoint_layout, chunk_size=settings.endpoint_chunk_size
        )
        identity = _identity()
        elector = None
        if settings.leader_elect:
            elector = LeaderElector(
                kube,
                namespace=settings.leader_election_namespace,
                name=settings.leader_election_id,
                identity=identity,
                lease_duration=settings.leader_election_lease_duration,
                renew_deadline=settings.leader_election_renew_deadline,
                retry_period=settings.leader_election_retry_period,
            )

        watch_stats = {
            name: WatchStats()
            for name in (
                "networkpolicies",
                "pods",
                "namespaces",
                "services",
                "policyendpoints",
                "clusternetworkpolicies",
                "clusterpolicyendpoints",
                "applicationnetworkpolicies",
            )
        }

        def ready() -> list[str]:
            problems = [] if all(resolver.synced.values()) else ["watches not synced"]
            return problems + stalled_problems(watch_stats)

        async def resolve() -> None:
            if elector is not None:
                await elector.is_leader.wait()
            resolver.metrics.leader.set(1)
            await resolver.run()

        tasks = {
            "api": serve_unix(
                api(resolver, elector, identity), socket_path(settings.runtime_dir, RESOLVER_SOCKET)
            ),
            "health": serve(health_app([ready]), settings.health_probe_bind_addr),
            "metrics": serve(metrics_app(resolver.metrics), settings.metrics_bind_addr),
            "resolve": resolve(),
        }
        if elector is not None:
            tasks["leader-election"] = elector.run()
        for name, resource in (
            ("networkpolicies", NETWORK_POLICIES),
            ("pods", PODS),
            ("namespaces", NAMESPACES),
            ("services", SERVICES),
            ("policyendpoints", POLICY_ENDPOINTS),
            ("clusternetworkpolicies", CLUSTER_NETWORK_POLICIES),
            ("clusterpolicyendpoints", CLUSTER_POLICY_ENDPOINTS),
            ("applicationnetworkpolicies", APPLICATION_NETWORK_POLICIES),
        ):
            tasks[f"watch-{name}"] = list_watch(
                kube,
                resource,
                resolver.consumer(name),
                stats=watch_stats[name],
                # the networking.k8s.aws policy CRDs may not be installed
                optional=resource in OPTIONAL,
            )
        log.info(
            "resolver.starting",
            identity=identity,
            layout=settings.endpoint_layout,
            chunk_size=settings.endpoint_chunk_size,
            leader_elect=settings.leader_elect,
        )
        await supervise(tasks, stop=stop, grace=settings.shutdown_timeout)
    finally:
        await kube.close()


def _identity() -> str:
    """POD_NAME (the Downward API) or the host name, plus a random part: two processes
    never share an identity (client-go's hostname_uuid)."""
    base = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{base}_{uuid.uuid4().hex[:8]}"


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings("np-resolver", __doc__.splitlines()[0], argv)
    logs.configure(settings.log_level, process="resolver", json=not sys.stderr.isatty())
    run_process("np-resolver", lambda stop: run(settings, stop=stop))


if __name__ == "__main__":
    main()
