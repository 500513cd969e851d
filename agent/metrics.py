"""Prometheus metrics of the enforcer (reference names kept), in an explicit registry."""

from __future__ import annotations

import contextlib
from collections.abc import Container
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class AgentMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self._labelled: set[tuple[str, str]] = set()
        r = self.registry
        self.programming_latency = Histogram(
            "awsnodeagent_policy_programming_latency_seconds",
            "Time from a PolicyEndpoint change (networking.k8s.aws/last-change-trigger-time) "
            "to its rules being in force for a pod",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cluster_programming_latency = Histogram(
            "awsnodeagent_cluster_policy_programming_latency_seconds",
            "Time from a ClusterPolicyEndpoint change (networking.k8s.aws/"
            "last-change-trigger-time) to its rules being in force for a pod",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fqdn_learned = Counter(
            "awsnodeagent_fqdn_addresses_learned_total",
            "Addresses pods learned from DNS answers under a name their domain rules match",
            registry=r,
        )
        self.fqdn_expired = Counter(
            "awsnodeagent_fqdn_addresses_expired_total",
            "Learned addresses forgotten after their TTL and grace",
            registry=r,
        )
        self.fqdn_evicted = Counter(
            "awsnodeagent_fqdn_addresses_evicted_total",
            "Learned addresses the datapath evicted before they expired (its table full)",
            registry=r,
        )
        self.fqdn_entries = Gauge(
            "awsnodeagent_fqdn_learned_entries",
            "Learned addresses in the datapath's table (np_learned, 65,536 at most)",
            registry=r,
        )
        self.setup_latency = Summary(
            "awsnodeagent_policy_setup_latency_ms",
            "Time to program the pods of a PolicyEndpoint, ms",
            ["name", "namespace"],
            registry=r,
        )
        self.teardown_latency = Summary(
            "awsnodeagent_policy_teardown_latency_ms",
            "Time to remove a PolicyEndpoint from its pods, ms",
            ["name", "namespace"],
            registry=r,
        )
        self.rejected = Counter(
            "awsnodeagent_policyendpoint_rejected_total",
            "Invalid PolicyEndpoints rejected (not enforced; the last accepted version stays)",
            ["namespace", "name"],
            registry=r,
        )
        self.ignored_entries = Counter(
            "awsnodeagent_policyendpoint_entries_ignored_total",
            "podSelectorEndpoints entries not applied: another namespace's pod "
            "(foreign-namespace), or a local pod's name under an address it does not have "
            "(address-mismatch)",
            ["reason"],
            registry=r,
        )
        self.fetches = Counter(
            "awsnodeagent_policyendpoint_fetches_total",
            "PolicyEndpoints fetched again because their policy came to select a local pod",
            ["result"],
            registry=r,
        )
        self.failures = Counter(
            "awsnodeagent_pod_programming_failures_total",
            "Pods whose programming failed, by reason: table-full (the pod keeps its record "
            "in force, retried), rule-limit (the rules that fit are enforced), kernel",
            ["reason"],
            registry=r,
        )
        self.table_entries = Gauge(
            "awsnodeagent_datapath_table_entries",
            "Entries in use in the datapath's tables",
            ["table"],
            registry=r,
        )
        self.table_capacity = Gauge(
            "awsnodeagent_datapath_table_capacity",
            "Capacity of the datapath's tables",
            ["table"],
            registry=r,
        )
        self.pods = Gauge(
            "awsnodeagent_pods", "Local pods by enforcement status", ["status"], registry=r
        )
        self.ready = Gauge(
            "awsnodeagent_ready",
            "1 when the agent is ready (as /readyz answers), else 0",
            registry=r,
        )
        self.reconciles = Counter(
            "awsnodeagent_reconcile_batches_total",
            "Programming batches applied to the datapath",
            registry=r,
        )
        self.errors = Counter(
            "awsnodeagent_datapath_errors_total",
            "Datapath operations that failed (retried)",
            ["operation"],
            registry=r,
        )
        self.watch_relists = Gauge(
            "awsnodeagent_watch_lists", "Lists done per resource", ["resource"], registry=r
        )
        self.watch_errors = Gauge(
            "awsnodeagent_watch_errors", "Watch failures per resource", ["resource"], registry=r
        )
        self.pods_rejected = Counter(
            "awsnodeagent_pod_objects_rejected",
            "Pod objects refused as unusable (wrong field shapes); the last valid version stays",
            registry=r,
        )
        self.cni_calls = Counter(
            "awsnodeagent_cni_calls_total",
            "Calls of the VPC CNI served, by method and outcome (programmed, default, "
            "timeout, released, unknown, refused, error, disabled): bounded labels",
            ["method", "outcome"],
            registry=r,
        )
        self.cni_latency = Histogram(
            "awsnodeagent_cni_call_seconds",
            "Time to answer a call of the VPC CNI",
            ["method"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.watch_malformed = Gauge(
            "awsnodeagent_watch_skipped_objects",
            "Watch events or objects skipped as malformed or not usable, per resource",
            ["resource"],
            registry=r,
        )

    # ---- series labelled by a PolicyEndpoint: they end with it ------------------------
    def observe_setup(self, *, namespace: str, name: str, ms: float) -> None:
        self._labelled.add((namespace, name))
        self.setup_latency.labels(name, namespace).observe(ms)

    def observe_teardown(self, *, namespace: str, name: str, ms: float) -> None:
        self._labelled.add((namespace, name))
        self.teardown_latency.labels(name, namespace).observe(ms)

    def count_rejected(self, *, namespace: str, name: str) -> None:
        self._labelled.add((namespace, name))
        self.rejected.labels(namespace, name).inc()

    def prune(self, live: Container[tuple[str, str]]) -> int:
        """End the series of PolicyEndpoints that are gone; how many ended."""
        gone = [k for k in self._labelled if k not in live]
        for namespace, name in gone:
            for metric in (self.setup_latency, self.teardown_latency):
                with contextlib.suppress(KeyError):
                    metric.remove(name, namespace)
            with contextlib.suppress(KeyError):
                self.rejected.remove(namespace, name)
            self._labelled.discard((namespace, name))
        return len(gone)
