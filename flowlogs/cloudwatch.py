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
- Spilled events are shipped later: when nothing is held (100 events, a probe) or
  CloudWatch accepts batches and the queue is at most half full (a batch's worth), the
  spill files are read back oldest first (a file being read back is renamed
  ``<spill>.reship-<n>``, and its read offset kept in the state file, so a restart goes
  on where it was).
- On SIGTERM, after one bounded attempt to ship, whatever is still held is spilled. The
  number held is kept in ``<spill>.state`` (at most a second old): a process killed
  with -9 leaves it, and the next one counts those events as lost (``lost_in_crash``,
  logged), since they were in its memory only.
- Credentials, region and endpoint come from the standard AWS chain (environment,
  config files, IMDS; ``AWS_ENDPOINT_URL_CLOUDWATCH_LOGS`` for a local endpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from flowlogs.sink import RotatingFile

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
PROBE_EVENTS = 100  # read back while CloudWatch's state is unknown
REFUSED_PAUSE = 300.0  # seconds without read-back after a batch was refused for good
RETRYABLE = {
    "ThrottlingException",
    "ServiceUnavailableException",
    "ServiceUnavailable",
    "InternalFailure",
    "RequestLimitExceeded",
    "Throttling",
}


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
        if cur and (
            len(cur) >= MAX_BATCH_EVENTS
            or size + raw + EVENT_OVERHEAD > MAX_BATCH_BYTES
            or body + raw + BODY_OVERHEAD > MAX_BODY_BYTES
            or ev[0] - cur[0][0] > MAX_SPAN_MS
        ):
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
    overflow: int = 0  # spilled to the local file: queue full
    rejected: int = 0  # refused by CloudWatch (too old / too new)
    errors: int = 0
    last_error: str = ""  # cleared when a batch is accepted again
    backlog: int = 0
    reshipped: int = 0  # read back from the spill files and queued again
    spilled_waiting: int = 0  # spill files' bytes not read back yet
    shutdown_spilled: int = 0  # held at SIGTERM, spilled
    lost_in_crash: int = 0  # held by a process that was killed (read from the state)


@dataclass
class CloudWatchShipper:
    group: str
    stream: str
    capacity: int
    spill: RotatingFile
    flush_interval: float = 1.0
    backoff_max: float = 30.0
    shutdown_flush: float = 5.0
    stats: ShipperStats = field(default_factory=ShipperStats)
    queue: deque[Event] = field(default_factory=deque)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _ready: bool = False
    _healthy: bool = False  # the last request to CloudWatch succeeded
    _inflight: list[Event] = field(default_factory=list)  # taken, not accepted yet
    _reship: str = ""  # the spill file being read back
    _reship_offset: int = 0
    _saved_state: tuple[int, str, int] | None = None
    _refused_at: float = -REFUSED_PAUSE  # a batch refused for good: read-back pauses

    @property
    def held(self) -> int:
        """Events held in memory (queued or being shipped): at most ``capacity``."""
        return len(self.queue) + len(self._inflight)

    @property
    def state_path(self) -> str:
        return self.spill.path + ".state"

    def submit(self, timestamp_ms: int, message: str) -> None:
        if self.held >= self.capacity:
            self.stats.overflow += 1
            self.spill.write_lines([f"{timestamp_ms} {message}\n"])
            return
        self.queue.append((timestamp_ms, message))
        self.stats.queued += 1
        self.stats.backlog = len(self.queue)
        if len(self.queue) >= MAX_BATCH_EVENTS:
            self._wake.set()

    async def run(self) -> None:
        await asyncio.to_thread(self._recover)
        session = get_session()
        # our own backoff keeps the batch and counts every failure: no hidden retries
        config = AioConfig(
            retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=30
        )
        async with session.create_client("logs", config=config) as client:
            try:
                while True:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.flush_interval)
                    self._wake.clear()
                    if self.queue:
                        await self._drain(client)
                    if self.held == 0 or (self._healthy and self.held <= self.capacity // 2):
                        await self._read_back()
                    await self._save_state()
            except asyncio.CancelledError:
                # stopping: one bounded attempt to ship what is held, then spill the rest
                if self.queue or self._inflight:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._drain(client), self.shutdown_flush)
                self._spill_held()
                raise

    # ---- what outlives the process ---------------------------------------------------
    def _recover(self) -> None:
        """Thread: the previous process's state. Events it held and did not spill (it
        was killed) are counted as lost; a read-back in progress goes on."""
        try:
            with open(self.state_path) as f:
                state = json.load(f)
        except (OSError, ValueError):
            state = {}
        held = state.get("held") if isinstance(state, dict) else None
        if isinstance(held, int) and held > 0:
            self.stats.lost_in_crash += held
            log.error(
                "cloudwatch.lost_in_crash",
                events=held,
                reason="the previous process stopped without spilling what it held",
            )
        reship = state.get("reship") if isinstance(state, dict) else None
        offset = state.get("offset") if isinstance(state, dict) else None
        if isinstance(reship, str) and os.path.exists(reship) and isinstance(offset, int):
            self._reship, self._reship_offset = reship, offset
        self._write_state(0)
        self.stats.spilled_waiting = self._spilled_bytes()

    def _write_state(self, held: int) -> None:
        state = (held, self._reship, self._reship_offset)
        if state == self._saved_state:
            return
        tmp = self.state_path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"held": held, "reship": self._reship, "offset": self._reship_offset}, f)
            os.replace(tmp, self.state_path)
            self._saved_state = state
        except OSError as exc:
            log.warning("cloudwatch.state_unwritable", file=self.state_path, error=str(exc))

    async def _save_state(self) -> None:
        if (self.held, self._reship, self._reship_offset) != self._saved_state:
            await asyncio.to_thread(self._write_state, self.held)

    def _spill_held(self) -> None:
        """At SIGTERM: what was not shipped goes to the spill file (read back later)."""
        held = sorted([*self._inflight, *self.queue])
        self.queue.clear()
        self._inflight = []
        if held:
            written = self.spill.write_lines([f"{ts} {msg}\n" for ts, msg in held])
            self.stats.shutdown_spilled += written
            log.info(
                "cloudwatch.spilled_at_stop",
                events=written,
                lost=len(held) - written,
                file=self.spill.path,
            )
        self._write_state(0)

    def _spill_files(self) -> list[str]:
        """Spill files waiting to be read back, oldest first."""
        pending = sorted(
            glob.glob(glob.escape(self.spill.path) + ".reship-*"),
            key=lambda p: int(p.rsplit("-", 1)[1]) if p.rsplit("-", 1)[1].isdigit() else 0,
        )
        backups = [f"{self.spill.path}.{i}" for i in range(self.spill.backups, 0, -1)]
        return [
            *pending,
            *(p for p in backups if os.path.exists(p)),
            *([self.spill.path] if _size(self.spill.path) else []),
        ]

    def _spilled_bytes(self) -> int:
        return sum(_size(p) for p in self._spill_files()) - self._reship_offset

    def _claim(self) -> None:
        """Loop thread (where the spill file is written): take the oldest spill file for
        reading back, renamed so that the writer starts a new one."""
        if self._reship:
            return
        files = self._spill_files()
        if not files:
            return
        oldest = files[0]
        if ".reship-" not in oldest:
            claimed = f"{self.spill.path}.reship-{time.time_ns()}"
            os.replace(oldest, claimed)  # the spill writer follows its path: a new file
            oldest = claimed
        self._reship, self._reship_offset = oldest, 0

    def _next_events(self, room: int) -> list[Event]:
        """Thread: up to ``room`` events from the claimed spill file, oldest first; the
        file is removed once read to its end."""
        out: list[Event] = []
        with open(self._reship, "rb") as f:
            f.seek(self._reship_offset)
            while len(out) < room:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break  # the end (or a line torn by a full disk: never completed)
                self._reship_offset += len(line)
                ts, _, msg = line.decode(errors="replace").rstrip("\n").partition(" ")
                if ts.isdigit() and msg:
                    out.append((int(ts), msg))
            else:
                return out
        os.unlink(self._reship)
        self._reship, self._reship_offset = "", 0
        return out

    async def _read_back(self) -> None:
        if time.monotonic() - self._refused_at < REFUSED_PAUSE:
            return  # what was refused would be refused again: not in a loop
        # healthy: a batch's worth; else (nothing sent yet, or failing) a small probe
        room = min(
            self.capacity // 2 - self.held, MAX_BATCH_EVENTS if self._healthy else PROBE_EVENTS
        )
        if room <= 0:
            return
        try:
            self._claim()
            if not self._reship:
                return
            events = await asyncio.to_thread(self._next_events, room)
            self.stats.spilled_waiting = max(0, await asyncio.to_thread(self._spilled_bytes))
        except OSError as exc:
            log.warning("cloudwatch.read_back_failed", error=str(exc)[:300])
            self._reship, self._reship_offset = "", 0
            return
        if events:
            self.queue.extend(events)
            self.stats.reshipped += len(events)
            self.stats.backlog = len(self.queue)
            log.info(
                "cloudwatch.reshipping",
                events=len(events),
                waiting_bytes=self.stats.spilled_waiting,
            )
            self._wake.set()

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

    async def _put(self, client: Any, batch: list[Event]) -> Any:
        """PutLogEvents for one batch, retried with backoff while the failure may pass
        (throttling, outages, a deleted group or stream). A failure that will not pass
        (a non-retryable error code: the request or the permissions are wrong) is
        counted, the batch spilled, and None returned: the queue goes on."""
        delay = 0.2
        while True:
            try:
                await self._ensure(client)
                resp = await client.put_log_events(
                    logGroupName=self.group,
                    logStreamName=self.stream,
                    logEvents=[{"timestamp": ts, "message": msg} for ts, msg in batch],
                )
            except (ClientError, BotoCoreError, OSError, TimeoutError) as exc:
                self._healthy = False
                code = _code(exc) if isinstance(exc, ClientError) else type(exc).__name__
                self.stats.last_error = f"{code}: {exc}"[:300]
                if isinstance(exc, ClientError) and code == "ResourceNotFoundException":
                    self._ready = False  # group or stream deleted: create again
                elif isinstance(exc, ClientError) and code not in RETRYABLE:
                    self.stats.errors += 1
                    written = self.spill.write_lines([f"{ts} {msg}\n" for ts, msg in batch])
                    self.stats.overflow += written
                    self._refused_at = time.monotonic()
                    log.error(
                        "cloudwatch.batch_refused",
                        error=self.stats.last_error,
                        events=len(batch),
                        spilled=written,
                        file=self.spill.path,
                    )
                    return None
                self.stats.retries += 1
                wait = delay * random.uniform(0.5, 1.5)
                log.warning(
                    "cloudwatch.retry",
                    error=self.stats.last_error,
                    retry_in=round(wait, 2),
                    backlog=self.held,
                )
                self.stats.backlog = self.held
                await self._save_state()
                await asyncio.sleep(wait)
                delay = min(delay * 2, self.backoff_max)
                continue
            if not self._healthy and self.stats.last_error:
                log.info("cloudwatch.recovered", after=self.stats.last_error[:120])
            self._healthy = True
            self.stats.last_error = ""
            return resp

    async def _drain(self, client: Any) -> None:
        """Ship what is queued now; retry (keeping the batch) until it is accepted."""
        pending = sorted([*self._inflight, *self.queue])
        self.queue.clear()
        now_ms = int(time.time() * 1000)
        fresh = [e for e in pending if now_ms - MAX_AGE_MS < e[0] < now_ms + MAX_FUTURE_MS]
        self.stats.rejected += len(pending) - len(fresh)
        self._inflight = fresh
        for batch in make_batches(fresh):
            resp = await self._put(client, batch)
            if resp is None:  # refused for good: spilled (read back later), go on
                del self._inflight[: len(batch)]
                continue
            rejected = resp.get("rejectedLogEventsInfo") or {}
            refused = _rejected_count(rejected, len(batch)) if rejected else 0
            self.stats.rejected += refused
            self.stats.shipped += len(batch) - refused
            self.stats.batches += 1
            del self._inflight[: len(batch)]
        self.stats.backlog = len(self.queue)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


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
