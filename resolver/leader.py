"""Leader election over a ``coordination.k8s.io/v1`` Lease, as controller-runtime does it.

Several np-resolver replicas may run; only the holder of the Lease writes. The holder
renews it every retry period; a standby takes it once the record has not changed for a
whole lease duration *as measured on its own clock* (never trusting another node's
``renewTime``, as client-go does not). A leader that cannot renew within the renew
deadline (shorter than the lease duration) stops: the process exits, so it never writes
after another replica may have started. On SIGTERM the leader releases the Lease
(empty holder), so a standby takes over at its next attempt instead of a lease duration
later. Every write is conditional on the Lease's resourceVersion: two replicas can never
both believe they acquired it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from common.kube import LEASES, KubeClient, KubeError

log = structlog.get_logger("resolver.leader")


class LeadershipLost(Exception):  # noqa: N818 (an event, not a programming error)
    """The Lease could not be renewed within the renew deadline: stop writing."""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        kube: KubeClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float,
        renew_deadline: float,
        retry_period: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.clock = clock
        self.is_leader = asyncio.Event()
        self.holder = ""
        self.transitions = 0
        self._observed: tuple[object, ...] | None = None
        self._observed_at = 0.0

    async def run(self) -> None:
        """Acquire, then hold until cancelled (the Lease is released) or lost
        (LeadershipLost is raised)."""
        while True:
            if await self._try():
                break
            await asyncio.sleep(self.retry_period)
        self.is_leader.set()
        log.info(
            "leader.acquired",
            lease=f"{self.namespace}/{self.name}",
            identity=self.identity,
            transitions=self.transitions,
        )
        renewed = self.clock()
        try:
            while True:
                await asyncio.sleep(self.retry_period)
                if await self._try():
                    renewed = self.clock()
                elif self.clock() - renewed > self.renew_deadline:
                    log.error(
                        "leader.lost",
                        lease=f"{self.namespace}/{self.name}",
                        identity=self.identity,
                        holder=self.holder,
                        reason=f"not renewed for {self.renew_deadline}s",
                    )
                    raise LeadershipLost(
                        f"lease {self.namespace}/{self.name} not renewed "
                        f"within {self.renew_deadline}s"
                    )
        except asyncio.CancelledError:
            await asyncio.shield(self._release())
            raise

    async def _try(self) -> bool:
        """Acquire or renew once: True if this replica holds the Lease now."""
        try:
            return await self._try_once()
        except (KubeError, OSError, TimeoutError) as exc:
            log.warning("leader.attempt_failed", error=str(exc)[:200])
            return False

    async def _try_once(self) -> bool:
        now = self.clock()
        try:
            lease = await self.kube.get(LEASES, self.namespace, self.name)
        except KubeError as exc:
            if exc.status != 404:
                raise
            return await self._create()
        spec: dict[str, Any] = dict(lease.get("spec") or {})
        holder = str(spec.get("holderIdentity") or "")
        record = (
            holder,
            spec.get("renewTime"),
            spec.get("leaseDurationSeconds"),
            (lease.get("metadata") or {}).get("resourceVersion"),
        )
        if record != self._observed:
            self._observed, self._observed_at = record, now
        self.holder = holder
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        if holder and holder != self.identity and now < self._observed_at + duration:
            return False  # another replica holds an unexpired lease
        stamp = _now()
        if holder != self.identity:
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
            spec["acquireTime"] = stamp
        spec.update(
            holderIdentity=self.identity,
            renewTime=stamp,
            leaseDurationSeconds=math.ceil(self.lease_duration),
        )
        body = dict(lease, spec=spec)
        try:
            updated = await self.kube.replace(LEASES, self.namespace, self.name, body)
        except KubeError as exc:
            if exc.status == 409:
                return False  # someone else wrote it first
            raise
        self._remember(updated)
        return True

    async def _create(self) -> bool:
        stamp = _now()
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "acquireTime": stamp,
                "renewTime": stamp,
                "leaseTransitions": 0,
                "leaseDurationSeconds": math.ceil(self.lease_duration),
            },
        }
        try:
            created = await self.kube.create(LEASES, self.namespace, body)
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise
        self._remember(created)
        return True

    def _remember(self, lease: dict[str, Any]) -> None:
        spec = lease.get("spec") or {}
        self.holder = self.identity
        self.transitions = int(spec.get("leaseTransitions") or 0)
        self._observed = (
            self.identity,
            spec.get("renewTime"),
            spec.get("leaseDurationSeconds"),
            (lease.get("metadata") or {}).get("resourceVersion"),
        )
        self._observed_at = self.clock()

    async def _release(self) -> None:
        """Give the Lease up at once (empty holder), if this replica holds it."""
        if not self.is_leader.is_set():
            return
        with contextlib.suppress(KubeError, OSError, TimeoutError):
            lease = await asyncio.wait_for(self.kube.get(LEASES, self.namespace, self.name), 2)
            spec = dict(lease.get("spec") or {})
            if spec.get("holderIdentity") != self.identity:
                return
            spec.update(holderIdentity="", leaseDurationSeconds=1, renewTime=_now())
            await asyncio.wait_for(
                self.kube.replace(LEASES, self.namespace, self.name, dict(lease, spec=spec)), 2
            )
            log.info(
                "leader.released", lease=f"{self.namespace}/{self.name}", identity=self.identity
            )
