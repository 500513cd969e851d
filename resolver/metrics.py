"""np-resolver's Prometheus metrics, under the AWS network policy controller's names."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

POLICY_TYPE = "NetworkPolicy"  # the controller's label value for NetworkPolicies
CLUSTER_POLICY_TYPE = "ClusterNetworkPolicy"


@dataclass
class ResolverMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.reconciliations = Counter(
            "network_policy_reconciliations_total",
            "Total number of policy reconciliations by type and result",
            ["policy_type", "result"],
            registry=r,
        )
        self.reconcile_duration = Histogram(
            "network_policy_reconcile_duration_seconds",
            "How long in seconds reconciling a policy takes",
            ["policy_type"],
            registry=r,
        )
        self.objects = Gauge(
            "network_policy_objects_total",
            "Total number of policy objects in the cluster by type",
            ["policy_type"],
            registry=r,
        )
        self.leader = Gauge(
            "np_resolver_leader", "1 while this replica holds the leader Lease", registry=r
        )


def metrics_app(metrics: ResolverMetrics) -> web.Application:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", handler)
    return app
