"""The enforcer's worker-thread side: everything that touches the datapath's maps.

The enforcer (event loop) plans; :class:`Programmer` runs on the datapath worker thread
(agent.worker) and returns typed results (:class:`Outcome` per pod). Nothing here runs
on the event loop, and nothing in agent.enforcer touches the maps directly.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from agent.desired import pod_directions
from agent.endpoints import Endpoints, PodRef
from bpf import layout as lay
from bpf.datapath import Datapath, DirectionPolicy, PodPolicy
from bpf.errors import BpfError, RuleLimitError
from bpf.registry import TableFullError

log = structlog.get_logger("agent.enforcer")

# trie entries compiled before a batch of pods is switched (bounds the peak memory)
PROGRAM_BATCH_ENTRIES = 32768


@dataclass(frozen=True)
class Outcome:
    """What programming one pod did. ``written``: a record is in force (with
    ``reason == "rule-limit"``, the rules that fit: fewer allowed ports, never more)."""

    pod_id: int = 0
    ingress: str = ""
    egress: str = ""
    error: str = ""
    reason: str = ""
    written: bool = True


@dataclass
class Plan:
    ref: PodRef
    uid: str
    ifindex: int
    endpoints: tuple[Endpoints, ...]
    weight: int = 0


class Programmer:
    """Runs on the datapath worker thread only."""

    def __init__(self, dp: Datapath, *, strict: bool) -> None:
        self.dp = dp
        self.strict = strict

    def program(self, plans: Sequence[Plan]) -> list[Outcome]:
        """Compile and switch every planned pod. Pods are switched in
        batches of about PROGRAM_BATCH_ENTRIES trie entries: compiled rules are large
        (a full node's would take tens of MB at once) and are dropped once their tries
        are built. A failure is the failing pod's alone: its record in force stays,
        every other pod of the batch is switched."""
        dp = self.dp
        compiled: dict[tuple[Endpoints, ...], tuple[DirectionPolicy, DirectionPolicy, str]] = {}
        pods: dict[int, PodPolicy] = {}
        out: dict[int, Outcome] = {}
        pending_entries = 0

        def policy_id(ref: PodRef) -> int:
            return dp.policy_id(namespace=ref[0], name=ref[1])

        def flush() -> None:
            try:
                dp.program_pods(pods)
                return
            except (BpfError, OSError):
                pass
            for ifindex, pod in pods.items():  # find the pod that fails, switch the rest
                try:
                    dp.program_pods({ifindex: pod})
                except (BpfError, OSError) as exc:
                    out[ifindex] = Outcome(
                        pod.pod_id,
                        error=str(exc),
                        written=False,
                        reason="table-full" if _full(exc) else "kernel",
                    )

        for plan in plans:
            if pending_entries >= PROGRAM_BATCH_ENTRIES:
                flush()
                pods, compiled, pending_entries = {}, {}, 0
            where = f"{plan.ref[0]}/{plan.ref[1]}"
            try:
                pod_id = dp.register_pod(namespace=plan.ref[0], name=plan.ref[1], uid=plan.uid)
                if plan.endpoints not in compiled:
                    compiled[plan.endpoints] = self.compile(plan.endpoints, policy_id)
            except TableFullError as exc:
                log.error("enforcer.pod_failed", pod=where, reason="table-full", error=str(exc))
                out[plan.ifindex] = Outcome(error=str(exc), reason="table-full", written=False)
                continue
            ingress, egress, limit = compiled[plan.endpoints]
            if limit:
                log.error(
                    "enforcer.rules_truncated",
                    pod=where,
                    error=limit,
                    enforcing="the rules that fit (fewer allowed ports)",
                )
            pods[plan.ifindex] = PodPolicy(pod_id, ingress, egress)
            pending_entries += sum(
                len(d.rules.entries) for d in (ingress, egress) if d.rules is not None
            )
            out[plan.ifindex] = Outcome(
                pod_id,
                lay.STATE_NAMES[ingress.state],
                lay.STATE_NAMES[egress.state],
                error=f"rule-limit: {limit}" if limit else "",
                reason="rule-limit" if limit else "",
            )
        if pods:
            flush()
        return [out[plan.ifindex] for plan in plans]

    def compile(
        self, endpoints: tuple[Endpoints, ...], policy_id: Callable[[PodRef], int]
    ) -> tuple[DirectionPolicy, DirectionPolicy, str]:
        """(ingress, egress, "" or the limit exceeded). Over the datapath's per-CIDR
        limit, the pod enforces what fits, never a stale allow."""
        try:
            ingress, egress = pod_directions(endpoints, strict=self.strict, policy_id=policy_id)
            return ingress, egress, ""
        except RuleLimitError as exc:
            ingress, egress = pod_directions(
                endpoints, strict=self.strict, policy_id=policy_id, truncate=True
            )
            return ingress, egress, str(exc)

    def remove(self, ifindexes: Sequence[int]) -> None:
        """Drop records (their pods' ids stay named for late flow logs)."""
        self.dp.remove_pods(ifindexes)

    def end_ids(self, live_uids: set[str]) -> None:
        """Pod ids of UIDs not live retire, names past their grace are freed, lost pins
        restored (see Enforcer._lifecycle)."""
        self.dp.retire_pods_except(live_uids)
        self.dp.free_ids()
        self.dp.restore_pins()


def _full(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM)
