"""Prometheus metrics of the enforcer (reference names kept), in an explicit registry."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class AgentMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.programming_latency = Histogram(
            "awsnodeagent_policy_programming_latency_seconds",
            "Time from a PolicyEndpoint change (networking.k8s.aws/last-change-trigger-time) "
            "to its rules being in force for a pod",
            buckets=LATENCY_BUCKETS, registry=r)
        self.setup_latency = Summary(
            "awsnodeagent_policy_setup_latency_ms",
            "Time to program the pods of a PolicyEndpoint, ms", ["name", "namespace"],
            registry=r)
        self.teardown_latency = Summary(
            "awsnodeagent_policy_teardown_latency_ms",
            "Time to remove a PolicyEndpoint from its pods, ms", ["name", "namespace"],
            registry=r)
        self.rejected = Counter(
            "awsnodeagent_policyendpoint_rejected_total",
            "Invalid PolicyEndpoints rejected (not enforced; the last accepted version stays)",
            ["namespace", "name"], registry=r)
        self.ignored_entries = Counter(
            "awsnodeagent_policyendpoint_entries_ignored_total",
            "podSelectorEndpoints entries not applied: another namespace's pod "
            "(foreign-namespace), or a local pod's name under an address it does not have "
            "(address-mismatch)", ["reason"], registry=r)
        self.fetches = Counter(
            "awsnodeagent_policyendpoint_fetches_total",
            "PolicyEndpoints fetched again because their policy came to select a local pod",
            ["result"], registry=r)
        self.pods = Gauge("awsnodeagent_pods", "Local pods by enforcement status", ["status"],
                          registry=r)
        self.reconciles = Counter("awsnodeagent_reconcile_batches_total",
                                  "Programming batches applied to the datapath", registry=r)
        self.errors = Counter("awsnodeagent_datapath_errors_total",
                              "Datapath operations that failed (retried)", ["operation"],
                              registry=r)
        self.watch_relists = Gauge("awsnodeagent_watch_lists", "Lists done per resource",
                                   ["resource"], registry=r)
        self.watch_errors = Gauge("awsnodeagent_watch_errors", "Watch failures per resource",
                                  ["resource"], registry=r)
