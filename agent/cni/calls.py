"""The VPC CNI's calls: EnforceNpToPod for every pod it sets up, DeletePodNp for every
pod it tears down.

EnforceNpToPod comes after the CNI has wired the pod's host veths and before the pod's
containers start, so the answer is the last moment to put enforcement in place:

1. the pod's host interfaces are found by the names the CNI gives them (the pod has no
   address yet, in the API or anywhere the agent could see);
2. they get the mode's default record (strict: deny, standard: allow) and the programs
   attach, before anything else: the pod never sends a packet unjudged;
3. the pod is reconciled at once: if the agent knows its Pod object and the policies
   that select it (listed, or matching its labels), they are programmed;
4. the answer waits for that programming, at most ``--cni-answer-timeout``; in strict
   mode it also waits for the Pod object to arrive. A pod answered before its policies
   are in force keeps the default (strict: deny), and the log says so.

``NETWORK_POLICY_MODE`` from the call is the pod's mode, over the node's. A bad request
(empty names, an unknown mode, an impossible interface count, bytes that are no
message) is an error answer, never a crash; a failure for one pod is that pod's alone.
Calls for one pod are served one at a time; calls for different pods run together.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import structlog

from agent.cni import rpc_pb2 as pb
from agent.cni.service import np_backend_handler, serving
from agent.endpoints import PodRef
from agent.enforcer import Enforcer
from agent.hostnet import MAX_POD_INTERFACES, HostNet
from agent.metrics import AgentMetrics
from common.netlink import Netlink, NetlinkOpError

log = structlog.get_logger("agent.cni")

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
# the enforcer adopts what a previous run left within this long of the agent's start
STARTUP_WAIT = 10.0

Context = grpc.aio.ServicerContext


class CallError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _pod_ref(namespace: str, name: str) -> PodRef:
    for field, value in (("K8S_POD_NAMESPACE", namespace), ("K8S_POD_NAME", name)):
        if not _NAME.match(value):
            raise CallError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{field} {value[:64]!r} is not a Kubernetes object name",
            )
    return (namespace, name)


def _strict(mode: str, *, default: bool) -> bool:
    value = mode.strip().lower()
    if value == "":
        return default
    if value not in ("strict", "standard"):
        raise CallError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"NETWORK_POLICY_MODE {mode[:32]!r} is neither strict nor standard",
        )
    return value == "strict"


class CniCalls:
    """Serves the CNI's calls (an agent.cni.service.NpBackend)."""

    def __init__(
        self,
        *,
        enforcer: Enforcer | None,
        hostnet: HostNet | None,
        metrics: AgentMetrics,
        answer_timeout: float,
        multi_nic: bool = False,
    ) -> None:
        """``enforcer`` None: network policy is off, every call succeeds (the CNI calls
        whenever ipamd has a mode set)."""
        self.enforcer = enforcer
        self.hostnet = hostnet
        self.metrics = metrics
        self.answer_timeout = answer_timeout
        self.multi_nic = multi_nic
        self._locks: dict[PodRef, tuple[asyncio.Lock, int]] = {}
        self._nl: Netlink | None = None
        self.serving = asyncio.Event()

    async def serve(self, socket_path: str) -> None:
        """Serve the calls on ``socket_path`` until cancelled (a task of the agent's)."""
        async with (
            Netlink(netns=self.hostnet.netns if self.hostnet else None) as nl,
            serving(socket_path, [np_backend_handler(self)]),
        ):
            self._nl = nl
            self.serving.set()
            log.info("cni.serving", socket=socket_path, enforcing=self.enforcer is not None)
            try:
                await asyncio.Event().wait()
            finally:
                self._nl = None
                self.serving.clear()

    @asynccontextmanager
    async def _one_at_a_time(self, ref: PodRef) -> AsyncIterator[None]:
        lock, users = self._locks.get(ref, (asyncio.Lock(), 0))
        self._locks[ref] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[ref]
            if users <= 1:
                del self._locks[ref]
            else:
                self._locks[ref] = (lock, users - 1)

    async def _serve(
        self,
        method: str,
        context: Context[Any, Any],
        pod: str,
        work: Callable[[], Awaitable[str]],
    ) -> None:
        """Run one call's ``work`` (its outcome for the metric); a refusal is an error
        status with its reason, logged."""
        started = time.monotonic()
        outcome = "error"
        try:
            outcome = await work()
        except CallError as exc:
            outcome = "refused"
            log.error("cni.refused", method=method, pod=pod, code=exc.code.name, error=exc.message)
            await context.abort(exc.code, exc.message)
        finally:
            self.metrics.cni_calls.labels(method, outcome).inc()
            self.metrics.cni_latency.labels(method).observe(time.monotonic() - started)

    # ---- EnforceNpToPod ----------------------------------------------------------------
    async def enforce(
        self,
        request: pb.EnforceNpRequest,
        context: Context[pb.EnforceNpRequest, pb.EnforceNpReply],
    ) -> pb.EnforceNpReply:
        async def work() -> str:
            ref = _pod_ref(request.K8S_POD_NAMESPACE, request.K8S_POD_NAME)
            if self.enforcer is None:
                return "disabled"
            strict = _strict(request.NETWORK_POLICY_MODE, default=self.enforcer.strict)
            count = request.InterfaceCount
            if not 0 <= count <= MAX_POD_INTERFACES:
                raise CallError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"InterfaceCount {count} is not from 0 to {MAX_POD_INTERFACES}",
                )
            async with self._one_at_a_time(ref):
                return await self._enforce(ref, strict=strict, count=count)

        await self._serve("EnforceNpToPod", context, _where(request), work)
        return pb.EnforceNpReply(Success=True)

    async def _enforce(self, ref: PodRef, *, strict: bool, count: int) -> str:
        enforcer, hostnet = self.enforcer, self.hostnet
        assert enforcer is not None
        assert hostnet is not None
        try:  # (the enforcer starts once the node's network is read)
            await asyncio.wait_for(enforcer.started.wait(), STARTUP_WAIT)
        except TimeoutError:
            raise CallError(grpc.StatusCode.UNAVAILABLE, "the agent is starting") from None
        if self._nl is None:
            raise CallError(grpc.StatusCode.UNAVAILABLE, "the agent is starting")
        wanted = count or (MAX_POD_INTERFACES if self.multi_nic else 1)
        try:
            found = await hostnet.find_named(self._nl, ref[0], ref[1], wanted)
        except NetlinkOpError as exc:
            raise CallError(grpc.StatusCode.UNAVAILABLE, f"netlink: {exc}") from None
        if not found or (count and len(found) < count):
            raise CallError(
                grpc.StatusCode.NOT_FOUND,
                f"{count or 1} host interface(s) of pod {ref[0]}/{ref[1]} expected, "
                f"{len(found)} found (names as the VPC CNI gives them, prefixes "
                f"{','.join(hostnet.prefixes)}: see --pod-interface-prefixes)",
            )
        fresh = await enforcer.admit(ref, found, strict=strict)
        known = ref in enforcer.cache.pods
        mode = "strict" if strict else "standard"
        if not (known or strict):
            log.info(
                "cni.pod_admitted",
                pod=f"{ref[0]}/{ref[1]}",
                mode=mode,
                ifindexes=found,
                programmed=False,
                reason="pod not known yet: the mode's default is in force",
            )
            return "default"
        programmed = await enforcer.settled(ref, found, self.answer_timeout)
        if programmed:
            log.info(
                "cni.pod_admitted",
                pod=f"{ref[0]}/{ref[1]}",
                mode=mode,
                ifindexes=found,
                programmed=True,
                new_records=len(fresh),
            )
            return "programmed"
        reason = (
            "the Pod object has not arrived"
            if ref not in enforcer.cache.pods
            else "its policies are not all here yet, or programming failed"
        )
        log.warning(
            "cni.answered_before_programmed",
            pod=f"{ref[0]}/{ref[1]}",
            mode=mode,
            waited_s=self.answer_timeout,
            reason=reason,
            enforcing="default deny" if strict else "default allow",
        )
        return "timeout"

    # ---- DeletePodNp ---------------------------------------------------------------------
    async def delete(
        self,
        request: pb.DeleteNpRequest,
        context: Context[pb.DeleteNpRequest, pb.DeleteNpReply],
    ) -> pb.DeleteNpReply:
        async def work() -> str:
            ref = _pod_ref(request.K8S_POD_NAMESPACE, request.K8S_POD_NAME)
            if self.enforcer is None:
                return "disabled"
            async with self._one_at_a_time(ref):
                had = self.enforcer.release(ref)
            log.info("cni.pod_released", pod=f"{ref[0]}/{ref[1]}", ifindexes=list(had))
            return "released" if had else "unknown"

        await self._serve("DeletePodNp", context, _where(request), work)
        return pb.DeleteNpReply(Success=True)


def _where(request: pb.EnforceNpRequest | pb.DeleteNpRequest) -> str:
    return f"{request.K8S_POD_NAMESPACE[:63]}/{request.K8S_POD_NAME[:253]}"
