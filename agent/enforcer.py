"""The enforcer: keeps every local pod's datapath record equal to what its policies say.

Lifecycle:
1. Adopt what a previous run left pinned: records of vanished interfaces are removed,
   the others stay in force while their veths are re-pointed (atomically) at this run's
   programs. Enforcement never lapses across a restart.
2. Until both watches have listed, only new pod interfaces are handled: each is attached
   at its first appearance with the mode's default (strict: deny, standard: allow).
3. Then every local pod is reconciled, and from then on only pods whose inputs changed
   (their PolicyEndpoints, IPs, interface), batched per wake-up: the datapath work of a
   batch (compile, tries, records) runs in the worker thread as one unit.

Per pod it records the PolicyEndpoint generations in force and when, which is what "this
pod is programmed" means to callers (local API, ``wait``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from agent.cache import Cache, LocalPod
from agent.desired import weight
from agent.dnssteer import Steering
from agent.endpoints import Endpoints, PodRef
from agent.gate import Gate, GateError
from agent.hostnet import HostNet
from agent.metrics import AgentMetrics
from agent.programming import Outcome, Plan, Programmer
from agent.worker import DatapathWorker
from bpf import layout as lay
from bpf.attach import attach_many, attachments, ours
from bpf.datapath import ALLOW_ALL, DENY_ALL, Datapath, PodPolicy
from bpf.errors import BpfError
from bpf.store import POOL_SIZE
from common import memory
from common.netlink import NetEvent, Netlink, NetlinkOpError

log = structlog.get_logger("agent.enforcer")
READ_BATCH = 16  # adopted tries read per step (see Enforcer.keep_tries)

UNKNOWN_POD = 0  # pod id of a record written before the pod is known
# Retired tries are collected once programming has been quiet for GC_QUIET seconds, or
# when GC_MAX_RETIRED of them wait, or GC_MAX_DELAY after the first of them retired: removing
# them from np_rules makes the kernel wait an RCU grace period (~8 ms), during which the
# worker thread cannot program, so it is kept off the path of a change.
GC_QUIET = 0.5
GC_MAX_RETIRED = 128
GC_MAX_DELAY = 5.0
# Ids and pins are looked after every LIFECYCLE_PERIOD seconds: retired pod ids start
# their grace period, names past it are freed, lost pins are restored; pods whose
# programming failed for a reason that may pass (a full table, a kernel error) are tried
# again.
LIFECYCLE_PERIOD = 5.0
LIFECYCLE_ENV = "NP_LIFECYCLE_PERIOD"  # tests only: a shorter period (seconds)


REFRESH_NS = 1_000_000_000  # a repeated answer within this is not written again
FRESH_MAX = 10_000  # (name, address) pairs kept per pod; beyond, the pod's are dropped


def _lifecycle_period() -> float:
    try:
        value = float(os.environ.get(LIFECYCLE_ENV, LIFECYCLE_PERIOD))
    except ValueError:
        return LIFECYCLE_PERIOD
    return value if 0 < value <= LIFECYCLE_PERIOD else LIFECYCLE_PERIOD


# A pod whose rules weigh more than HEAVY_RULES port rules (see agent.desired.weight) is
# compiled and switched on its own, after the lighter pods of its batch, and changes
# that arrive meanwhile go first: one large object cannot queue every other pod behind it.
HEAVY_RULES = 20_000


@dataclass(frozen=True)
class Inputs:
    """What a pod's record is compiled from: the same inputs, the same record."""

    strict: bool
    ifindexes: tuple[int, ...]
    uid: str
    endpoints: tuple[Endpoints, ...]


@dataclass
class PodStatus:
    namespace: str
    name: str
    uid: str
    ifindexes: tuple[int, ...] = ()  # the pod's host interfaces (one per network card)
    pod_id: int = 0
    ingress: str = ""
    egress: str = ""
    programmed: dict[str, int] = field(default_factory=dict)  # "ns/name" of PE -> generation
    programmed_at: float = 0.0  # epoch seconds
    error: str = ""
    reason: str = ""  # table-full | rule-limit | kernel, with error
    inputs: Inputs | None = None  # what the record in force was compiled from

    @property
    def ifindex(self) -> int:
        """The first host interface (0: none known)."""
        return self.ifindexes[0] if self.ifindexes else 0


class Enforcer:
    def __init__(
        self,
        *,
        cache: Cache,
        hostnet: HostNet,
        worker: DatapathWorker,
        metrics: AgentMetrics,
        strict: bool,
        netns: str | None = None,
        gate: Gate | None = None,
        steering: Steering | None = None,
        fqdn_ttl_grace: float = 30.0,
    ) -> None:
        self.cache = cache
        self.gate = gate or Gate((), enabled=False)
        # pods with domain rules: their DNS goes through the proxy (agent.dnssteer)
        self.steering = steering
        self.fqdn_ttl_grace = fqdn_ttl_grace
        self.domain_pods: dict[PodRef, tuple[str, ...]] = {}  # pod -> its addresses
        # pod address -> (asked name, address) -> the expiry last written for it: an
        # answer repeated within REFRESH needs no datapath write (the entry is in force).
        # A pod's part ends whenever it is programmed (its rules may differ now).
        self._fresh: dict[str, dict[tuple[str, str], int]] = {}
        self._steering_stale = False
        self.hostnet = hostnet
        self.worker = worker
        self.dp: Datapath = worker.dp
        self.metrics = metrics
        self.strict = strict
        self.programmer = Programmer(worker.dp)  # on the worker thread only
        self.netns = netns
        self.status: dict[PodRef, PodStatus] = {}
        self.bound: dict[int, PodRef] = {}
        self.attached: dict[int, tuple[int, int]] = {}
        self.records: set[int] = set()  # ifindexes with a record in np_pods
        # the mode the CNI asked for a pod (EnforceNpToPod), over the node's, and the
        # interfaces it announced; ends with DeletePodNp or when they are all gone
        self.modes: dict[PodRef, bool] = {}
        self.admitted: dict[int, PodRef] = {}
        self.awaited: set[PodRef] = set()  # CNI calls waiting: cleared at every pass
        # pods the CNI tore down (DeletePodNp) while their Pod object remains (by UID):
        # not programmed again, their ids released; ends when the object goes or a pod of
        # that name is set up again
        self.released: dict[PodRef, str] = {}
        # every write of pod records, so that a record is never overwritten by an older
        # decision (the CNI's default against a reconcile's policy, or the reverse)
        self.writing = asyncio.Lock()
        self.started = asyncio.Event()  # previous records adopted: the CNI can be served
        self.synced = asyncio.Event()  # first full reconcile done
        self.progress = asyncio.Condition()  # notified after every reconcile batch
        self._new_links: set[int] = set()
        self._gone_links: set[int] = set()
        self._routes_changed = False
        self._addresses_changed = True
        self._wake = asyncio.Event()
        self._nl: Netlink | None = None
        self._last_programmed = 0.0
        self.pool_short = asyncio.Event()  # wakes keep_tries
        self._retired_since: float | None = None
        self._last_lifecycle = 0.0
        self.lifecycle_period = _lifecycle_period()
        self._retry: set[PodRef] = set()
        hostnet.on_change = self._on_net_event

    # ---- events -------------------------------------------------------------------------
    def _on_net_event(self, ev: NetEvent) -> None:
        if ev.link is not None:
            if ev.added and self.hostnet.is_pod_interface(ev.link):
                self._new_links.add(ev.link.index)
            elif not ev.added:
                self._gone_links.add(ev.link.index)
            self._routes_changed = True
        elif ev.route is not None:
            self._routes_changed = True
        elif ev.addr is not None:
            self._addresses_changed = True
        self._wake.set()

    async def _wait(self, timeout: float | None = None) -> None:
        waiters = [
            asyncio.ensure_future(self.cache.changed.wait()),
            asyncio.ensure_future(self._wake.wait()),
        ]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        self._wake.clear()

    # ---- main loop ----------------------------------------------------------------------
    async def run(self) -> None:
        await self.hostnet.ready.wait()
        async with Netlink(netns=self.netns) as nl:
            self._nl = nl
            await self._adopt()
            try:
                await self.gate.install(self._judged(self.records))
            except GateError as exc:
                self.metrics.errors.labels("gate").inc()
                log.error("gate.unavailable", error=str(exc), enforcing="the datapath only")
            self.started.set()
            self._new_links.update(self.hostnet.pod_interfaces())
            while not (self.cache.pods_synced and self.cache.endpoints_synced):
                await self._interfaces()
                await self._wait()
            log.info(
                "enforcer.synced",
                pods=len(self.cache.pods),
                policyendpoints=len(self.cache.endpoints),
            )
            dirty: set[PodRef] = set(self.cache.pods)
            first = True
            while True:
                dirty |= self.cache.take_dirty()
                await self._interfaces()
                if self._routes_changed:
                    self._routes_changed = False
                    dirty |= {r for r, st in self.status.items() if not st.ifindex}
                    dirty |= {r for r in self.cache.pods if r not in self.status}
                await self._reconcile(dirty)
                await self._sync_steering()
                dirty = set()
                if first:
                    first = False
                    await self._release_unclaimed()
                    self.synced.set()
                    memory.release()  # the initial lists' and compilation's peak
                self._export_counts()
                async with self.progress:
                    self.progress.notify_all()
                pending_gc = await self._collect_garbage()
                if self.dp.store.pooled < POOL_SIZE:
                    self.pool_short.set()
                await self._lifecycle()
                await self._wait(GC_QUIET if pending_gc else self.lifecycle_period)

    # ---- adoption and interfaces --------------------------------------------------------
    async def _adopt(self) -> None:
        assert self._nl is not None
        present = self.hostnet.links
        stale = [i for i in self.dp.pod_ifindexes() if i not in present]
        if stale:
            await self.worker.call(self.programmer.remove, stale)
        self.records = set(self.dp.pod_ifindexes()) - set(stale)
        # a restart keeps the same programs (bpf.loading): most veths need no attaching,
        # only a look, and all are looked at in one read
        mine = ours(self.dp)
        try:
            current = await attachments(self._nl, sorted(self.records))
        except NetlinkOpError as exc:
            log.warning("enforcer.attachments_unread", error=str(exc))
            current = {}
        for ifindex, att in current.items():
            if (att.ingress_prog_id, att.egress_prog_id) == mine:
                self.attached[ifindex] = mine
        await self._attach_all(sorted(self.records))
        log.info("enforcer.adopted", records=len(self.records), removed_stale=len(stale))

    async def _attach_all(self, ifindexes: Iterable[int]) -> None:
        """This run's programs on every interface of ``ifindexes`` that does not have
        them yet, asked of the kernel at once; then what each interface has is read back
        (``attached``: what the datapath judges with). A failure is logged and counted
        for its interface alone; it is tried again when the interface is next armed or
        its pod programmed."""
        assert self._nl is not None
        mine = ours(self.dp)
        todo = [i for i in ifindexes if self.attached.get(i) != mine]
        if not todo:
            return
        try:
            failed = await attach_many(
                self._nl, todo, ingress=self.dp.ingress_prog, egress=self.dp.egress_prog
            )
            done = [i for i in todo if i not in failed]
            current = await attachments(self._nl, done)
        except NetlinkOpError as exc:  # the batch as a whole: no socket, no namespace
            failed, current = dict.fromkeys(todo, exc), {}
        for ifindex, err in failed.items():
            log.warning("enforcer.attach_failed", ifindex=ifindex, error=str(err))
            self.metrics.errors.labels("attach").inc()
        for ifindex, att in current.items():
            self.attached[ifindex] = (att.ingress_prog_id, att.egress_prog_id)

    async def _interfaces(self) -> None:
        """Attach new pod interfaces at once; forget vanished ones; host addresses."""
        if self._addresses_changed:
            self._addresses_changed = False
            addrs = self.hostnet.node_addresses()
            await self.worker.call(self.dp.set_host_addresses, _parse_ips(addrs))
        gone, self._gone_links = self._gone_links, set()
        gone = {i for i in gone if i not in self.hostnet.links}
        if gone:
            async with self.writing:
                await self.worker.call(self.programmer.remove, sorted(gone & self.records))
                self.records -= gone
            await self.gate.close(gone)
            for ifindex in gone:
                self.attached.pop(ifindex, None)
                self._forget_admitted(ifindex)
                ref = self.bound.pop(ifindex, None)
                st = self.status.get(ref) if ref is not None else None
                if st is not None and ref is not None:
                    st.ifindexes = tuple(i for i in st.ifindexes if i != ifindex)
                    st.inputs = None
                    self.cache.dirty.add(ref)  # its other interfaces (if any) stay its own
                    self.cache.changed.set()
        new, self._new_links = self._new_links, set()
        await self.arm(sorted(i for i in new if i in self.hostnet.links), strict=self.strict)

    async def arm(
        self, ifindexes: list[int], *, strict: bool, unclaimed_too: bool = False
    ) -> list[int]:
        """Give interfaces without a record the mode's default record (no pod identity)
        and attach the programs to all of them: from then on they enforce. With
        ``unclaimed_too``, interfaces whose record no pod's programming wrote get the
        default of this mode as well. The interfaces that got a record are returned."""
        async with self.writing:
            fresh = [
                i
                for i in ifindexes
                if i not in self.records or (unclaimed_too and i not in self.bound)
            ]
            if fresh:
                default = DENY_ALL if strict else ALLOW_ALL
                await self.worker.call(
                    self.dp.program_pods,
                    {i: PodPolicy(UNKNOWN_POD, default, default) for i in fresh},
                )
                self.records.update(fresh)
                log.info(
                    "enforcer.interfaces_attached",
                    ifindexes=fresh,
                    default="deny" if strict else "allow",
                )
            await self._attach_all(i for i in ifindexes if i in self.records)
            await self.gate.open(self._judged(ifindexes))
        return fresh

    def _judged(self, ifindexes: Iterable[int]) -> list[int]:
        """Those with a record and this run's programs attached: the datapath judges
        their traffic (the strict-mode gate may let it through)."""
        mine = ours(self.dp)
        return [i for i in ifindexes if i in self.records and self.attached.get(i) == mine]

    async def _release_unclaimed(self) -> None:
        """After the first full reconcile: interfaces no local pod claims keep (or get)
        the mode's default, with no pod identity."""
        async with self.writing:
            # (an interface the CNI announced keeps the default of the mode it asked for)
            unclaimed = sorted(
                i for i in self.records if i not in self.bound and i not in self.admitted
            )
            if unclaimed:
                default = DENY_ALL if self.strict else ALLOW_ALL
                await self.worker.call(
                    self.dp.program_pods,
                    {i: PodPolicy(UNKNOWN_POD, default, default) for i in unclaimed},
                )

    # ---- reconcile ----------------------------------------------------------------------
    async def _reconcile(self, refs: set[PodRef]) -> None:
        assert self._nl is not None
        plans = [p for ref in sorted(refs) if (p := await self._plan(ref)) is not None]
        if plans:
            await self._run(plans)

    async def _plan(self, ref: PodRef) -> Plan | None:
        """What programming the pod needs now; None if nothing (or not yet)."""
        pod = self.cache.pods.get(ref)
        if pod is None or pod.host_network:
            if pod is None:
                self.released.pop(ref, None)
                if ref in self.status:
                    self._unbind(ref)
            return None
        if self.released.get(ref) == pod.uid:
            return None  # torn down by the CNI; the object is going
        self.released.pop(ref, None)
        st = self.status.setdefault(ref, PodStatus(pod.namespace, pod.name, pod.uid))
        st.uid = pod.uid
        ifindexes = await self._interfaces_for(pod)
        if not ifindexes:
            return None
        self._claim(ref, st, ifindexes)
        waiting = self.cache.incomplete(ref)
        if waiting:
            # a policy selecting it is not all here yet (being fetched): keep the
            # record in force rather than program a partial policy
            log.debug(
                "enforcer.pod_waits_for_objects",
                pod=f"{ref[0]}/{ref[1]}",
                objects=[f"{k[0]}/{k[1]}" for k in waiting[:4]],
            )
            return None
        endpoints = tuple(self.cache.endpoints_for(ref))
        plan = Plan(
            ref, pod.uid, ifindexes, endpoints, weight(endpoints), strict=self.strict_for(ref)
        )
        return None if st.inputs == self._inputs(plan) else plan

    def strict_for(self, ref: PodRef) -> bool:
        """The pod's mode: what the CNI asked for it, else the node's."""
        return self.modes.get(ref, self.strict)

    def _inputs(self, plan: Plan) -> Inputs:
        """Everything a pod's record is compiled from: unchanged, nothing to do."""
        return Inputs(plan.strict, plan.ifindexes, plan.uid, plan.endpoints)

    def _claim(self, ref: PodRef, st: PodStatus, ifindexes: tuple[int, ...]) -> None:
        """The interfaces are the pod's now (a re-created pod may take another's)."""
        for ifindex in ifindexes:
            owner = self.bound.get(ifindex)
            if owner is not None and owner != ref:
                log.warning(
                    "enforcer.interface_reassigned",
                    ifindex=ifindex,
                    old=f"{owner[0]}/{owner[1]}",
                    new=f"{ref[0]}/{ref[1]}",
                )
                self._unbind(owner)
        for old in set(st.ifindexes) - set(ifindexes):
            if self.bound.get(old) == ref:
                del self.bound[old]

    async def _run(self, plans: list[Plan]) -> None:
        """Pods whose CNI call waits first, on their own (the answer waits for them, not
        for other pods' changes); then light pods, together; heavy ones each on its own,
        and only while no other change waits (the rest stay dirty for the next pass)."""
        waiting = [p for p in plans if p.ref in self.awaited]
        self.awaited.clear()
        if waiting and len(waiting) < len(plans):
            await self._apply(waiting)
            plans = [p for p in plans if p not in waiting]
        plans.sort(key=lambda p: p.weight)
        light = [p for p in plans if p.weight < HEAVY_RULES]
        heavy = [p for p in plans if p.weight >= HEAVY_RULES]
        if light:
            await self._apply(light)
        for i, plan in enumerate(heavy):
            if self.cache.dirty and (light or i):
                self.cache.dirty.update(p.ref for p in heavy[i:])
                self.cache.changed.set()
                log.info(
                    "enforcer.heavy_deferred", pods=len(heavy) - i, reason="other changes wait"
                )
                break
            await self._apply([plan])

    async def _apply(self, plans: list[Plan]) -> None:
        started = time.monotonic()
        try:
            async with self.writing:
                results = await self.worker.call(self.programmer.program, plans)
                # the records are in place: no default may be written over them
                for plan, out in zip(plans, results, strict=True):
                    if out.written:
                        self.records.update(plan.ifindexes)
        except (BpfError, OSError) as exc:
            self.metrics.errors.labels("program").inc()
            log.error("enforcer.program_failed", pods=len(plans), error=str(exc))
            for plan in plans:  # retried at the next wake-up
                self.cache.dirty.add(plan.ref)
            await asyncio.sleep(0.5)
            self.cache.changed.set()
            return
        self.metrics.reconciles.inc()
        self._last_programmed = time.monotonic()
        elapsed_ms = (time.monotonic() - started) * 1000
        for plan, out in zip(plans, results, strict=True):
            await self._record(plan, out, elapsed_ms)
        log.info(
            "enforcer.programmed",
            pods=len(plans),
            # records in force confirmed by their inputs digest, not compiled again
            confirmed=sum(1 for out in results if out.confirmed),
            ms=round(elapsed_ms, 2),
        )

    async def _record(self, plan: Plan, out: Outcome, elapsed_ms: float) -> None:
        """What one pod's programming did, in its status and the metrics."""
        st = self.status[plan.ref]
        st.error, st.reason = out.error, out.reason
        if out.error:
            self.metrics.failures.labels(out.reason).inc()
        if not out.written:
            # the record in force stays (strict: the default deny); tried again
            st.inputs = None
            self._retry.add(plan.ref)
            return
        self._retry.discard(plan.ref)
        await self._attach_all(plan.ifindexes)
        for ifindex in plan.ifindexes:
            self.bound[ifindex] = plan.ref
        await self.gate.open(self._judged(plan.ifindexes))
        st.ifindexes, st.pod_id = plan.ifindexes, out.pod_id
        st.ingress, st.egress = out.ingress, out.egress
        await self._steer(plan.ref, out.domains)
        st.inputs = self._inputs(plan)
        previous = st.programmed
        st.programmed = {f"{e.namespace}/{e.name}": e.generation for e in plan.endpoints}
        st.programmed_at = now = time.time()
        for e in plan.endpoints:
            key = f"{e.namespace}/{e.name}"
            if previous.get(key) != e.generation:
                self.metrics.observe_setup(namespace=e.namespace, name=e.name, ms=elapsed_ms)
                if e.trigger_time:
                    latency = (
                        self.metrics.cluster_programming_latency
                        if e.cluster
                        else self.metrics.programming_latency
                    )
                    latency.observe(max(0.0, now - e.trigger_time))
        for key in set(previous) - set(st.programmed):
            ns, name = key.split("/", 1)
            self.metrics.observe_teardown(namespace=ns, name=name, ms=elapsed_ms)

    async def _interfaces_for(self, pod: LocalPod) -> tuple[int, ...]:
        """The pod's host interfaces: those the VPC CNI named after it, and those its
        addresses are routed over (main table, or any table a rule looks up)."""
        assert self._nl is not None
        found = set(self.hostnet.named_interfaces(pod.namespace, pod.name))
        for ip in pod.ips:
            found |= await self.hostnet.interfaces_of(self._nl, ip)
        return tuple(sorted(found))

    async def _collect_garbage(self) -> bool:
        """Free retired tries and port sets: when programming has been quiet, or when
        enough are waiting or the oldest has waited long enough (see GC_QUIET), even
        while changes keep coming. True if retired tries still wait."""
        retired = self.dp.counts()["retired_tries"]
        if retired == 0:
            self._retired_since = None
            return False
        now = time.monotonic()
        if self._retired_since is None:
            self._retired_since = now
        quiet = not self.cache.dirty and now - self._last_programmed >= GC_QUIET
        overdue = retired >= GC_MAX_RETIRED or now - self._retired_since >= GC_MAX_DELAY
        if not (quiet or overdue):
            return True
        self._retired_since = None
        tries, portsets = await self.worker.call(self.dp.collect_garbage)
        log.debug("enforcer.garbage_collected", tries=tries, portsets=portsets)
        return False

    async def keep_tries(self) -> None:
        """The "tries" task. The tries adopted at start are read (what they reference:
        bpf.store.RuleStore.adopt), READ_BATCH at a time on a thread of their own, once the
        first reconcile is done: reading 250k entries holds the GIL for a second, which
        the initial lists and the confirmation of every pod need more (nothing waits for
        the read: until it is done, port sets and names are not collected). The empty
        tries of the store's pool are kept topped up, so that a change fills one instead
        of waiting for the outer map's RCU grace period: the insert (and its grace period)
        runs on a thread too, never on the datapath worker. Woken whenever the pool is
        short after a reconcile."""
        await self.started.wait()
        store = self.dp.store
        if store.unread:
            await self._top_up_pool()
            await self.synced.wait()
            while store.unread:
                ids = await self.worker.call(store.unread_ids, READ_BATCH)
                read = await asyncio.to_thread(store.read_tries, ids)
                await self.worker.call(store.apply_read, read, ids)
        while True:
            self.pool_short.clear()
            if not await self._top_up_pool():
                continue  # tried again after a pause
            await self.pool_short.wait()

    async def _top_up_pool(self) -> bool:
        """Fill the pool of empty tries up to POOL_SIZE; False (after a pause of one
        lifecycle period) if that failed, e.g. with np_rules full."""
        store = self.dp.store
        if store.pooled >= POOL_SIZE:
            return True
        try:
            ids = await self.worker.call(store.reserve_pool_ids)
            made = await asyncio.to_thread(store.make_pooled, ids)
            await self.worker.call(store.add_pooled, made)
        except (BpfError, OSError) as exc:
            self.metrics.errors.labels("trie-pool").inc()
            log.warning("enforcer.trie_pool_failed", error=str(exc))
            await asyncio.sleep(self.lifecycle_period)
            return False
        log.debug("enforcer.trie_pool_refilled", added=len(made))
        return True

    async def _lifecycle(self) -> None:
        """Every LIFECYCLE_PERIOD: pod ids of UIDs no longer here retire, names past
        their grace are freed, lost pins are restored, failed pods are tried again, and
        metric series of PolicyEndpoints that are gone end."""
        now = time.monotonic()
        if now - self._last_lifecycle < self.lifecycle_period:
            return
        self._last_lifecycle = now
        live = {
            p.uid for p in self.cache.pods.values() if p.uid and self.released.get(p.key) != p.uid
        }
        try:
            await self.worker.call(self.programmer.end_ids, live)
            expired, evicted, left = await self.worker.call(
                self.programmer.expire, time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            )
            self.metrics.fqdn_expired.inc(expired)
            self.metrics.fqdn_evicted.inc(evicted)
            self.metrics.fqdn_entries.set(left)
        except (BpfError, OSError) as exc:
            self.metrics.errors.labels("lifecycle").inc()
            log.error("enforcer.lifecycle_failed", error=str(exc))
        if self._retry:
            retry = {r for r in self._retry if r in self.cache.pods}
            self._retry = set()
            if retry:
                self.cache.dirty.update(retry)
                self.cache.changed.set()
        self.metrics.prune(self.cache.generations)

    async def _steer(self, ref: PodRef, domains: bool) -> None:
        """Keep the pod's DNS steered to the proxy exactly while it has domain rules."""
        pod = self.cache.pods.get(ref)
        for ip in (pod.ips if pod is not None else ()) + self.domain_pods.get(ref, ()):
            self._fresh.pop(ip, None)  # programmed: what it learned may be decided anew
        want = tuple(pod.ips) if pod is not None and domains else ()
        if self.domain_pods.get(ref, ()) == want:
            return
        if want:
            self.domain_pods[ref] = want
        else:
            self.domain_pods.pop(ref, None)
        self._steering_stale = True
        await self._sync_steering()

    async def _sync_steering(self) -> None:
        """The steered pods are exactly those with domain rules now."""
        if not self._steering_stale:
            return
        self._steering_stale = False
        if self.steering is not None:
            await self.steering.set_pods(
                ipaddress.ip_address(ip) for ips in self.domain_pods.values() for ip in ips
            )

    async def learn(self, pod_ip: str, name: str, addresses: list[tuple[lay.Address, int]]) -> bool:
        """The DNS proxy's answer for a pod, learned before it is released: True if an
        entry was written (see Programmer.learn)."""
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        asked = name.rstrip(".").lower()
        keys = [(asked, str(a)) for a, _ in addresses]
        fresh = self._fresh.get(pod_ip, {})
        if all(
            fresh.get(k, 0) >= now + int((ttl + self.fqdn_ttl_grace) * 1e9) - REFRESH_NS
            for k, (_, ttl) in zip(keys, addresses, strict=True)
        ):
            return True  # written less than REFRESH ago, for as long: still in force
        ref = next((r for r, ips in self.domain_pods.items() if pod_ip in ips), None)
        st = self.status.get(ref) if ref is not None else None
        if st is None or not st.ifindexes:
            return False
        written = await self.worker.call(
            self.programmer.learn,
            st.ifindexes,
            name,
            addresses,
            grace=self.fqdn_ttl_grace,
            now_ns=now,
        )
        self.metrics.fqdn_learned.inc(written)
        if written:
            mine = self._fresh.setdefault(pod_ip, {})
            if len(mine) > FRESH_MAX:
                mine.clear()
            for k, (_, ttl) in zip(keys, addresses, strict=True):
                mine[k] = now + int((ttl + self.fqdn_ttl_grace) * 1e9)
        return written > 0

    def _unbind(self, ref: PodRef) -> None:
        for ip in self.domain_pods.get(ref, ()):
            self._fresh.pop(ip, None)
        if self.domain_pods.pop(ref, None) is not None:
            self._steering_stale = True  # synced at the next pass (see _sync_steering)
        st = self.status.pop(ref, None)
        if st is None:
            return
        for ifindex in st.ifindexes:
            if self.bound.get(ifindex) == ref:
                del self.bound[ifindex]
            self._new_links.add(ifindex)  # back to the mode's default if it stays
            self.records.discard(ifindex)
        self._wake.set()

    def _export_counts(self) -> None:
        programmed = sum(1 for st in self.status.values() if st.ifindex and not st.error)
        failed = sum(1 for st in self.status.values() if st.error)
        self.metrics.pods.labels("programmed").set(programmed)
        self.metrics.pods.labels("failed").set(failed)
        self.metrics.pods.labels("pending").set(len(self.cache.pods) - programmed - failed)
        for table, (entries, capacity) in self.dp.occupancy().items():
            self.metrics.table_entries.labels(table).set(entries)
            self.metrics.table_capacity.labels(table).set(capacity)

    # ---- the CNI's calls (agent.cni) ------------------------------------------------------
    async def admit(self, ref: PodRef, ifindexes: list[int], *, strict: bool) -> list[int]:
        """A pod the CNI has just wired: its mode is kept, its interfaces enforce the
        mode's default from now on, and the pod is reconciled at once (programmed, if
        its Pod object and policies are known). The interfaces given a default record
        are returned."""
        self.modes[ref] = strict
        self.admitted.update((i, ref) for i in ifindexes)
        self.released.pop(ref, None)
        fresh = await self.arm(ifindexes, strict=strict, unclaimed_too=True)
        self.awaited.add(ref)
        self.cache.dirty.add(ref)
        self.cache.changed.set()
        return fresh

    def _forget_admitted(self, ifindex: int) -> None:
        ref = self.admitted.pop(ifindex, None)
        if ref is not None and ref not in self.admitted.values():
            self.modes.pop(ref, None)

    def programmed_on(self, ref: PodRef, ifindexes: Iterable[int]) -> bool:
        """The pod is programmed (see :meth:`is_programmed`), on these interfaces too."""
        st = self.status.get(ref)
        pod = self.cache.pods.get(ref)
        return (
            st is not None
            and pod is not None
            and st.uid == pod.uid
            and set(ifindexes) <= set(st.ifindexes)
            and self.is_programmed(ref)
        )

    async def settled(self, ref: PodRef, ifindexes: Iterable[int], timeout: float) -> bool:
        """Wait until the pod is programmed on ``ifindexes``, at most ``timeout``
        seconds; whether it is."""
        wanted = list(ifindexes)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self.progress:
            while not self.programmed_on(ref, wanted):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                try:
                    await asyncio.wait_for(self.progress.wait(), remaining)
                except TimeoutError:
                    return self.programmed_on(ref, wanted)
        return True

    def release(self, ref: PodRef) -> tuple[int, ...]:
        """The CNI tore the pod down (DeletePodNp): its mode and status end, its ids are
        released at the next lifecycle pass, and it is not programmed again while its
        Pod object remains. Its interfaces, while they last, keep the node mode's
        default with no identity. Returns the interfaces it had."""
        self.modes.pop(ref, None)
        for ifindex in [i for i, r in self.admitted.items() if r == ref]:
            del self.admitted[ifindex]
        pod = self.cache.pods.get(ref)
        if pod is not None:
            self.released[ref] = pod.uid
        st = self.status.get(ref)
        had = st.ifindexes if st is not None else ()
        self._unbind(ref)
        self._retry.discard(ref)
        self._last_lifecycle = 0.0  # release the ids now, not in up to 5 s
        self._wake.set()
        return had

    # ---- queries ------------------------------------------------------------------------
    def programmed_endpoints(self, ref: PodRef) -> tuple[Endpoints, ...]:
        """The objects the pod's record in force was compiled from."""
        st = self.status.get(ref)
        if st is None or st.inputs is None or st.error:
            return ()
        endpoints = st.inputs.endpoints
        assert isinstance(endpoints, tuple)
        return endpoints

    def is_programmed(self, ref: PodRef) -> bool:
        """The pod's current PolicyEndpoint generations are all in force."""
        st = self.status.get(ref)
        if st is None or not st.ifindex or st.error or self.cache.incomplete(ref):
            return False
        want = {f"{e.namespace}/{e.name}": e.generation for e in self.cache.endpoints_for(ref)}
        return st.programmed == want


def _parse_ips(addrs: set[str]) -> list[lay.Address]:
    out: list[lay.Address] = []
    for a in sorted(addrs):
        try:
            out.append(ipaddress.ip_address(a))
        except ValueError:
            continue
    return out
