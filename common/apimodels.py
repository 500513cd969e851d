"""Models of the local APIs (``/v1``), shared by the servers and the CLI."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PortRuleView(_Model):
    protocol: str  # TCP | UDP | SCTP | ANY (with "other": every port no rule covers)
    start_port: int
    end_port: int
    policy: str  # namespace/name (a ClusterNetworkPolicy: name), or "" if none
    # the decision: who decided (ADMIN, NETWORK_POLICY, BASELINE, DEFAULT) and how
    tier: str = "NETWORK_POLICY"
    verdict: Literal["ALLOW", "DENY"] = "ALLOW"


class RuleView(_Model):
    """One trie entry: a peer prefix and what it allows (nothing: an except hole)."""

    cidr: str
    ports: list[PortRuleView]
    # folded ClusterNetworkPolicy tiers: what every port and protocol the rules above
    # do not cover gets (None: denied, as NetworkPolicy has it)
    other: PortRuleView | None = None


class DirectionView(_Model):
    state: str  # POLICIES_APPLIED | DEFAULT_ALLOW | DEFAULT_DENY
    trie_id: int
    rules: list[RuleView] = Field(default_factory=list)


class PolicyRefView(_Model):
    policyendpoint: str  # namespace/name (a ClusterPolicyEndpoint: name)
    policy: str  # namespace/name of the NetworkPolicy (a ClusterNetworkPolicy: name)
    generation: int  # current (from the API)
    programmed_generation: int | None  # in force on the node (None: not yet)
    tier: str | None = None  # Admin | Baseline for a ClusterNetworkPolicy
    priority: int | None = None


class PodView(_Model):
    namespace: str
    name: str
    uid: str
    ips: list[str]
    interface: str
    ifindex: int
    pod_id: int
    attached: bool  # our programs are on the interface, the current ones
    ingress_prog_id: int
    egress_prog_id: int
    programmed: bool  # every PolicyEndpoint generation listing it is in force
    programmed_at: float | None
    error: str
    ingress: DirectionView | None
    egress: DirectionView | None
    policies: list[PolicyRefView]
    failure: str = ""  # why programming failed: table-full | rule-limit | kernel


class PolicyView(_Model):
    namespace: str  # "" for a ClusterNetworkPolicy
    name: str
    tier: str | None = None  # Admin | Baseline for a ClusterNetworkPolicy
    priority: int | None = None
    policyendpoints: dict[str, int]  # name -> generation
    pods: list[str]  # local pods it selects (namespace/name)
    rejected: dict[str, str]  # policyendpoint name -> reason


class WatchView(_Model):
    synced: bool
    lists: int
    gone: int
    errors: int
    events: int
    last_error: str


class ProcessStats(_Model):
    running: bool
    error: str = ""
    stats: dict[str, float | int | str] = Field(default_factory=dict)


class TableView(_Model):
    entries: int
    capacity: int

    @property
    def fill(self) -> float:
        return self.entries / self.capacity if self.capacity else 0.0


TABLE_WARN = 0.9  # a table this full shows in /readyz, np-cli status and alerts


class NodeStatus(_Model):
    node: str
    mode: str
    ready: bool
    problems: list[str]
    pin_root: str
    ingress_prog_id: int
    egress_prog_id: int
    pods: int
    programmed: int
    tries: int
    portsets: int
    policyendpoints: int
    policyendpoint_stubs: int = 0  # objects of policies selecting no local pod (not kept)
    rejected: int
    failed: dict[str, str] = {}  # pod -> why its programming failed
    tables: dict[str, TableView] = {}
    warnings: list[str] = []  # tables near full
    datapath: dict[str, int]
    watches: dict[str, WatchView]
    conntrack: ProcessStats
    flowlogs: ProcessStats


class ExplainRequest(_Model):
    pod: str  # namespace/name
    peer: str  # address of the other side
    port: int = Field(ge=0, le=65535)  # the destination port of a new flow
    protocol: Literal["TCP", "UDP", "SCTP", "ICMP"] = "TCP"
    direction: Literal["ingress", "egress"] = "ingress"

    @field_validator("peer")
    @classmethod
    def _ip(cls, value: str) -> str:
        return str(ipaddress.ip_address(value))

    @field_validator("pod")
    @classmethod
    def _pod(cls, value: str) -> str:
        if value.count("/") != 1 or not all(value.split("/")):
            raise ValueError("pod must be namespace/name")
        return value


class ExplainResult(_Model):
    verdict: Literal["ALLOW", "DENY", "NOT_ENFORCED"]
    reason: str  # datapath reason name (rule, default-allow, no-peer-match, ...)
    summary: str  # one sentence for people
    pod: str
    ifindex: int
    state: str
    matched_cidr: str | None = None
    rule: PortRuleView | None = None
    policy: str | None = None
    # the PolicyEndpoint objects (namespace/name) whose entries decided: a policy's
    # rules may be spread over several objects (ClusterPolicyEndpoints: name alone)
    policyendpoints: list[str] = []
    # which tier decided: ADMIN, NETWORK_POLICY, BASELINE, DEFAULT (every tier passed),
    # ERROR; for ADMIN and BASELINE the ClusterNetworkPolicy's priority and rule action
    tier: str | None = None
    priority: int | None = None
    action: str | None = None
    # egress to an address the pod learned from a DNS answer: the name, when, the TTL
    learned: LearnedView | None = None


class LearnedView(_Model):
    """An address a pod learned from a DNS answer (``np-cli fqdn``)."""

    pod: str  # namespace/name
    address: str
    name: str  # the name the pod asked for ("" if learned before the agent restarted)
    learned_at: float | None  # epoch seconds
    ttl: int | None  # the answer's TTL, seconds
    expires_in: float  # seconds from now (negative: expired, new flows judged by rules)


class WaitResult(_Model):
    programmed: bool
    pending: list[str]  # pods not programmed yet (namespace/name)
    failed: dict[str, str] = {}  # of those, the ones whose programming failed, and why
    waited: float  # seconds
    checked_with_api: bool = False  # compared with the API server's current objects
    # how: "objects" (the namespaces' PolicyEndpoints read), "resource-version" (the
    # watches had delivered up to the API server's current version), "" (not checked)
    api_check: str = ""
