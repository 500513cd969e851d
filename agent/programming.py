"""The enforcer's worker-thread side: everything that touches the datapath's maps.

The enforcer (event loop) plans; :class:`Programmer` runs on the datapath worker thread
(agent.worker) and returns typed results (:class:`Outcome` per pod). Nothing here runs
on the event loop, and nothing in agent.enforcer touches the maps directly.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import structlog

from agent.desired import plan_pod
from agent.domains import EgressInputs, decision_for
from agent.endpoints import Endpoints, PodRef
from bpf import layout as lay
from bpf.datapath import Datapath, DirectionPolicy, PodPolicy
from bpf.errors import BpfError, RuleLimitError
from bpf.registry import TableFullError

log = structlog.get_logger("agent.enforcer")

_CompileKey = tuple[tuple["Endpoints", ...], bool]  # (objects, strict)
_Compiled = tuple[DirectionPolicy, DirectionPolicy, str, EgressInputs]
# trie entries compiled before a batch of pods is switched (bounds the peak memory)
PROGRAM_BATCH_ENTRIES = 32768
# the code a pod's record is compiled by: a change of any (an upgrade) makes every
# record's inputs digest differ, so a restarted agent compiles every pod again
_COMPILER = (
    "agent/desired.py",
    "agent/domains.py",
    "agent/endpoints.py",
    "agent/programming.py",
    "bpf/codec.py",
    "bpf/datapath.py",
    "bpf/ruleset.py",
    "bpf/store.py",
    "bpf/tiers.py",
    "common/clusterpolicyendpoint.py",
    "common/policyendpoint.py",
)


@functools.cache
def compiler_digest() -> bytes:
    """BLAKE2b of the compiler's sources and the datapath object (read once, on the
    worker thread that compiles)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.blake2b(digest_size=32)
    try:
        for name in _COMPILER:
            h.update(name.encode())
            h.update((root / name).read_bytes())
        h.update(resources.files("bpf").joinpath(lay.OBJECT_FILE).read_bytes())
    except OSError as exc:
        # a digest no earlier run can have: every pod is compiled, nothing is wrong
        log.warning("enforcer.compiler_digest_unavailable", error=str(exc))
        h.update(os.urandom(32))
    return h.digest()


def inputs_digest(
    endpoints: Iterable[Endpoints], *, strict: bool, policy_id: Callable[[PodRef], int]
) -> bytes:
    """What a pod's record is built from, hashed: each PolicyEndpoint's identity (uid)
    and spec generation, the id of its policy, the pod's mode and the compiler itself.
    Equal digests compile to equal records. b"" for a pod with domain-name rules (what
    it learns is kept beside the record and needs the compiled inputs)."""
    h = hashlib.blake2b(compiler_digest(), digest_size=lay.NP_INPUTS_DIGEST_LEN)
    h.update(b"strict" if strict else b"standard")
    for e in sorted(endpoints, key=lambda e: (e.namespace, e.name)):
        if e.domains or (e.cluster is not None and e.cluster.domains):
            return b""
        h.update(
            f"\0{e.namespace}\0{e.name}\0{e.uid}\0{e.generation}\0{policy_id(e.policy)}".encode()
        )
    return h.digest()


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
    domains: bool = False  # its egress has domain rules (its DNS is steered to the proxy)
    confirmed: bool = False  # the record in force was built from the same inputs: kept


@dataclass(frozen=True)
class Learned:
    """An address a pod learned: under which name, when (wall clock), with which TTL,
    until when (the datapath's clock). An entry adopted after a restart has no name."""

    name: str
    expires_ns: int
    at: float = 0.0
    ttl: int = 0


@dataclass
class Plan:
    ref: PodRef
    uid: str
    ifindexes: tuple[int, ...]  # every host interface of the pod (one per network card)
    endpoints: tuple[Endpoints, ...]
    weight: int = 0
    strict: bool = False  # the pod's mode: what an unselected direction defaults to


class Programmer:
    """Runs on the datapath worker thread only."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        # what each interface's egress was compiled from, while its record is ours: the
        # addresses its pod learns are decided from it (agent.domains)
        self.inputs: dict[int, EgressInputs] = {}
        # (ifindex, address) -> what it was learned under: re-decided when the pod's
        # rules change; ends with the entry
        self.learned: dict[tuple[int, lay.Address], Learned] = {}
        # adopted after a restart: the name is not known, the entry stays as it is
        # until it expires
        for key, expires in dp.learned_expiries().items():
            self.learned[key] = Learned("", expires)

    def program(self, plans: Sequence[Plan]) -> list[Outcome]:
        """Compile and switch every planned pod. Pods are switched in
        batches of about PROGRAM_BATCH_ENTRIES trie entries: compiled rules are large
        (a full node's would take tens of MB at once) and are dropped once their tries
        are built. A failure is the failing pod's alone: its record in force stays,
        every other pod of the batch is switched."""
        dp = self.dp
        compiled: dict[_CompileKey, _Compiled] = {}
        pods: dict[int, PodPolicy] = {}
        owner: dict[int, int] = {}  # ifindex -> index of its plan
        out: dict[int, Outcome] = {}  # by plan index
        pending_entries = 0

        def policy_id(ref: PodRef) -> int:
            return dp.policy_id(namespace=ref[0], name=ref[1])

        for i, plan in enumerate(plans):
            if pending_entries >= PROGRAM_BATCH_ENTRIES:
                self._switch(pods, owner, out)
                pods, owner, compiled, pending_entries = {}, {}, {}, 0
            where = f"{plan.ref[0]}/{plan.ref[1]}"
            key = (plan.endpoints, plan.strict)
            try:
                pod_id = dp.register_pod(namespace=plan.ref[0], name=plan.ref[1], uid=plan.uid)
                digest = inputs_digest(plan.endpoints, strict=plan.strict, policy_id=policy_id)
                confirmed = self._confirmed(plan, pod_id, digest)
                if confirmed is not None:
                    out[i] = confirmed
                    continue
                if key not in compiled:
                    compiled[key] = self.compile(plan.endpoints, policy_id, strict=plan.strict)
            except TableFullError as exc:
                log.error("enforcer.pod_failed", pod=where, reason="table-full", error=str(exc))
                out[i] = Outcome(error=str(exc), reason="table-full", written=False)
                continue
            except RuleLimitError as exc:
                # folded tiers hold deny rules too: no cut is safe, the record in force stays
                log.error("enforcer.pod_failed", pod=where, reason="rule-limit", error=str(exc))
                out[i] = Outcome(error=str(exc), reason="rule-limit", written=False)
                continue
            ingress, egress, limit, inputs = compiled[key]
            if limit:
                log.error(
                    "enforcer.rules_truncated",
                    pod=where,
                    error=limit,
                    enforcing="the rules that fit (fewer allowed ports)",
                )
            for ifindex in plan.ifindexes:
                pods[ifindex] = PodPolicy(
                    pod_id,
                    ingress,
                    egress,
                    learned=inputs.has_domains,
                    inputs=b"" if limit else digest,  # a cut record: compiled every time
                )
                owner[ifindex] = i
                self.inputs[ifindex] = inputs
            pending_entries += sum(
                len(d.rules.entries) for d in (ingress, egress) if d.rules is not None
            )
            out[i] = Outcome(
                pod_id,
                lay.STATE_NAMES[ingress.state],
                lay.STATE_NAMES[egress.state],
                error=f"rule-limit: {limit}" if limit else "",
                reason="rule-limit" if limit else "",
                domains=inputs.has_domains,
            )
        if pods:
            self._switch(pods, owner, out)
        self._relearn({i for plan in plans for i in plan.ifindexes})
        return [out[i] for i in range(len(plans))]

    def _confirmed(self, plan: Plan, pod_id: int, digest: bytes) -> Outcome | None:
        """The record in force, if every interface of the pod has one built from inputs
        with ``digest`` for this pod id (a restart, or a change that changed nothing for
        it): its outcome, without compiling. None: compile."""
        if not digest or not plan.ifindexes:
            return None
        record = None
        for ifindex in plan.ifindexes:
            if self.dp.inputs_of(ifindex) != digest:
                return None
            record = self.dp.pod_record(ifindex)
            if record is None or record.pod_id != pod_id:
                return None
        assert record is not None
        return Outcome(
            pod_id,
            lay.STATE_NAMES[record.ingress_state],
            lay.STATE_NAMES[record.egress_state],
            confirmed=True,
        )

    def _switch(
        self, pods: dict[int, PodPolicy], owner: dict[int, int], out: dict[int, Outcome]
    ) -> None:
        """Write the records of a batch; if that fails, pod by pod (all interfaces of a
        pod together): the failing pod's records in force stay, the rest switch."""
        try:
            self.dp.program_pods(pods)
            return
        except (BpfError, OSError):
            pass
        by_plan: dict[int, dict[int, PodPolicy]] = {}
        for ifindex, pod in pods.items():
            by_plan.setdefault(owner[ifindex], {})[ifindex] = pod
        for i, records in by_plan.items():
            try:
                self.dp.program_pods(records)
            except (BpfError, OSError) as exc:
                out[i] = Outcome(
                    out[i].pod_id,
                    error=str(exc),
                    written=False,
                    reason="table-full" if _full(exc) else "kernel",
                )

    def compile(
        self,
        endpoints: tuple[Endpoints, ...],
        policy_id: Callable[[PodRef], int],
        *,
        strict: bool,
    ) -> _Compiled:
        """(ingress, egress, "" or the limit exceeded, egress inputs). Over the
        datapath's per-CIDR limit, the pod enforces what fits, never a stale allow."""
        try:
            p = plan_pod(endpoints, strict=strict, policy_id=policy_id)
            return p.ingress, p.egress, "", p.egress_inputs
        except RuleLimitError as exc:
            p = plan_pod(endpoints, strict=strict, policy_id=policy_id, truncate=True)
            return p.ingress, p.egress, str(exc), p.egress_inputs

    # ---- learned addresses -----------------------------------------------------------
    def learn(
        self,
        ifindexes: Sequence[int],
        name: str,
        addresses: Sequence[tuple[lay.Address, int]],
        *,
        grace: float,
        now_ns: int,
    ) -> int:
        """What a DNS answer teaches the pod on ``ifindexes`` (its interfaces): each
        address its domain rules open under ``name``, for its TTL plus ``grace``
        seconds. Returns how many entries were written."""
        written = 0
        for ifindex in ifindexes:
            inputs = self.inputs.get(ifindex)
            if inputs is None or not inputs.has_domains:
                continue
            for address, ttl in addresses:
                decision = decision_for(inputs, name=name, address=address)
                if decision is None:
                    continue
                expires = now_ns + int((ttl + grace) * 1e9)
                old = self.learned.get((ifindex, address))
                if old is not None and old.expires_ns > expires:
                    expires = old.expires_ns  # a shorter answer never cuts a longer one
                self.dp.learn(ifindex, address, decision, expires)
                self.learned[(ifindex, address)] = Learned(name, expires, time.time(), ttl)
                written += 1
        return written

    def _relearn(self, ifindexes: set[int]) -> None:
        """Decide the pods' learned addresses again with their new rules (an address no
        rule opens any more is forgotten)."""
        for (ifindex, address), entry in list(self.learned.items()):
            if ifindex not in ifindexes or not entry.name:
                continue
            inputs = self.inputs.get(ifindex)
            decision = decision_for(inputs, name=entry.name, address=address) if inputs else None
            if decision is None:
                self.dp.forget(ifindex, address)
                del self.learned[(ifindex, address)]
            else:
                self.dp.learn(ifindex, address, decision, entry.expires_ns)

    def learned_by(self, ifindexes: Iterable[int]) -> dict[int, dict[lay.Address, Learned]]:
        """What the pods on ``ifindexes`` learned: interface -> address -> entry (one
        pass over the entries, whatever the number of pods asked about)."""
        wanted = set(ifindexes)
        out: dict[int, dict[lay.Address, Learned]] = {}
        for (i, a), e in self.learned.items():
            if i in wanted:
                out.setdefault(i, {})[a] = e
        return out

    def expire(self, now_ns: int) -> tuple[int, int, int]:
        """Forget the learned entries past their expiry, and those the kernel evicted
        (connections opened while they were valid go on): (expired, evicted, left)."""
        expired, evicted = self.dp.expire_learned(now_ns)
        live = self.dp.learned_expiries()
        self.learned = {k: v for k, v in self.learned.items() if k in live}
        return expired, evicted, len(live)

    def remove(self, ifindexes: Sequence[int]) -> None:
        """Drop records (their pods' ids stay named for late flow logs), and what the
        pods learned."""
        self.dp.remove_pods(ifindexes)
        for ifindex in ifindexes:
            self.inputs.pop(ifindex, None)
        self.learned = {k: v for k, v in self.learned.items() if k[0] not in set(ifindexes)}

    def end_ids(self, live_uids: set[str]) -> None:
        """Pod ids of UIDs not live retire, names past their grace are freed, lost pins
        restored (see Enforcer._lifecycle)."""
        self.dp.retire_pods_except(live_uids)
        self.dp.free_ids()
        self.dp.restore_pins()


def _full(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM)
