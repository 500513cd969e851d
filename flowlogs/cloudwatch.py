"""Ship decision logs to CloudWatch Logs in batches (aiobotocore).

- Group ``/aws/eks/<cluster>/cluster`` (EKS) or ``/aws/k8s-cluster/cluster``, stream
  ``aws-network-policy-agent-audit-<node>``, as the reference agent uses; created when
  missing (DescribeLogGroups, CreateLogGroup, CreateLogStream: the reference's IAM
  actions, plus PutLogEvents).
- Batches obey PutLogEvents' limits: at most 10,000 events and 1 MiB (each event's
  message bytes plus 26), in chronological order, spanning less than 24 hours; and the
  JSON request stays under 1 MB, so that sending it never blocks the event loop.
- Throttling and outages are retried with exponential backoff and jitter; the batch is
  kept, not dropped. Events wait in a bounded queue: when it is full, further events
  spill to a local file instead of growing memory, and are counted. Nothing is dropped
  without a count.
- Credentials, region and endpoint come from the standard AWS chain (environment,
  config files, IMDS; ``AWS_ENDPOINT_URL_CLOUDWATCH_LOGS`` for a local endpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

log = structlog.get_logger("flowlogs.cloudwatch")

MAX_BATCH_EVENTS = 10_000
MAX_BATCH_BYTES = 1_048_576
EVENT_OVERHEAD = 26
# The request body (JSON) must also stay below aiohttp's 1 MiB threshold for raw bodies,
# past which it warns that sending may block the event loop: ~45 bytes of JSON per event.
MAX_BODY_BYTES = 1_000_000
BODY_OVERHEAD = 48
MAX_SPAN_MS = 24 * 3600 * 1000 - 1
MAX_AGE_MS = 14 * 24 * 3600 * 1000
MAX_FUTURE_MS = 2 * 3600 * 1000
RETRYABLE = {"ThrottlingException", "ServiceUnavailableException", "ServiceUnavailable",
             "InternalFailure", "RequestLimitExceeded", "Throttling"}


def group_name(cluster: str) -> str:
    return f"/aws/eks/{cluster}/cluster" if cluster else "/aws/k8s-cluster/cluster"


def stream_name(node: str) -> str:
    return f"aws-network-policy-agent-audit-{node}"


Event = tuple[int, str]  # (timestamp ms, message)


def make_batches(events: list[Event]) -> list[list[Event]]:
    """Split (already chronological) events into batches PutLogEvents accepts."""
    batches: list[list[Event]] = []
    cur: list[Event] = []
    size = body = 0
    for ev in events:
        raw = len(ev[1].encode("utf-8"))
        if cur and (len(cur) >= MAX_BATCH_EVENTS
                    or size + raw + EVENT_OVERHEAD > MAX_BATCH_BYTES
                    or body + raw + BODY_OVERHEAD > MAX_BODY_BYTES
                    or ev[0] - cur[0][0] > MAX_SPAN_MS):
            batches.append(cur)
            cur, size, body = [], 0, 0
        cur.append(ev)
        size += raw + EVENT_OVERHEAD
        body += raw + BODY_OVERHEAD
    if cur:
        batches.append(cur)
    return batches


@dataclass
class ShipperStats:
    queued: int = 0
    shipped: int = 0
    batches: int = 0
    retries: int = 0
    overflow: int = 0          # spilled to the local file: queue full
    rejected: int = 0          # refused by CloudWatch (too old / too new)
    errors: int = 0
    last_error: str = ""
    backlog: int = 0


@dataclass
class CloudWatchShipper:
    group: str
    stream: str
    capacity: int
    spill: Callable[[list[str]], None]
    flush_interval: float = 1.0
    backoff_max: float = 30.0
    shutdown_flush: float = 5.0
    stats: ShipperStats = field(default_factory=ShipperStats)
    queue: deque[Event] = field(default_factory=deque)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _ready: bool = False
    _inflight: int = 0  # taken from the queue, not yet accepted by CloudWatch

    @property
    def held(self) -> int:
        """Events held in memory (queued or being shipped): at most ``capacity``."""
        return len(self.queue) + self._inflight

    def submit(self, timestamp_ms: int, message: str) -> None:
        if self.held >= self.capacity:
            self.stats.overflow += 1
            self.spill([f"{timestamp_ms} {message}\n"])
            return
        self.queue.append((timestamp_ms, message))
        self.stats.queued += 1
        self.stats.backlog = len(self.queue)
        if len(self.queue) >= MAX_BATCH_EVENTS:
            self._wake.set()

    async def run(self) -> None:
        session = get_session()
        # our own backoff keeps the batch and counts every failure: no hidden retries
        config = AioConfig(retries={"max_attempts": 1, "mode": "standard"},
                           connect_timeout=5, read_timeout=30)
        async with session.create_client("logs", config=config) as client:
            try:
                while True:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.flush_interval)
                    self._wake.clear()
                    if self.queue:
                        await self._drain(client)
            except asyncio.CancelledError:
                # stopping: one bounded attempt to ship what is held (it is in the file)
                if self.queue:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._drain(client), self.shutdown_flush)
                raise

    async def _ensure(self, client: Any) -> None:
        if self._ready:
            return
        groups = await client.describe_log_groups(logGroupNamePrefix=self.group)
        if not any(g["logGroupName"] == self.group for g in groups.get("logGroups", [])):
            try:
                await client.create_log_group(logGroupName=self.group)
            except ClientError as exc:
                if _code(exc) != "ResourceAlreadyExistsException":
                    raise
        try:
            await client.create_log_stream(logGroupName=self.group, logStreamName=self.stream)
        except ClientError as exc:
            if _code(exc) != "ResourceAlreadyExistsException":
                raise
        self._ready = True
        log.info("cloudwatch.ready", group=self.group, stream=self.stream)

    async def _drain(self, client: Any) -> None:
        """Ship what is queued now; retry (keeping the batch) until it is accepted."""
        pending = sorted(self.queue)
        self.queue.clear()
        self._inflight = len(pending)
        now_ms = int(time.time() * 1000)
        fresh = [e for e in pending if now_ms - MAX_AGE_MS < e[0] < now_ms + MAX_FUTURE_MS]
        self.stats.rejected += len(pending) - len(fresh)
        self._inflight = len(fresh)
        delay = 0.2
        batches = make_batches(fresh)
        while batches:
            batch = batches[0]
            try:
                await self._ensure(client)
                resp = await client.put_log_events(
                    logGroupName=self.group, logStreamName=self.stream,
                    logEvents=[{"timestamp": ts, "message": msg} for ts, msg in batch])
            except (ClientError, BotoCoreError, OSError, TimeoutError) as exc:
                code = _code(exc) if isinstance(exc, ClientError) else type(exc).__name__
                if isinstance(exc, ClientError) and code == "ResourceNotFoundException":
                    self._ready = False  # group or stream deleted: create again
                elif isinstance(exc, ClientError) and code not in RETRYABLE:
                    self.stats.errors += 1
                self.stats.retries += 1
                self.stats.last_error = f"{code}: {exc}"[:300]
                wait = delay * random.uniform(0.5, 1.5)
                log.warning("cloudwatch.retry", error=self.stats.last_error,
                            retry_in=round(wait, 2), backlog=len(self.queue) + len(batch))
                await asyncio.sleep(wait)
                delay = min(delay * 2, self.backoff_max)
                self.stats.backlog = self.held
                continue
            rejected = resp.get("rejectedLogEventsInfo") or {}
            if rejected:
                self.stats.rejected += _rejected_count(rejected, len(batch))
            self.stats.shipped += len(batch) - (_rejected_count(rejected, len(batch))
                                                if rejected else 0)
            self.stats.batches += 1
            batches.pop(0)
            self._inflight -= len(batch)
            delay = 0.2
        self._inflight = 0
        self.stats.backlog = len(self.queue)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _rejected_count(info: dict[str, int], total: int) -> int:
    count = 0
    if "tooNewLogEventStartIndex" in info:
        count += total - info["tooNewLogEventStartIndex"]
    if "tooOldLogEventEndIndex" in info:
        count += info["tooOldLogEventEndIndex"] + 1
    if "expiredLogEventEndIndex" in info:
        count += info["expiredLogEventEndIndex"] + 1
    return min(count, total)
