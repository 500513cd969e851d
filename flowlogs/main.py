"""np-flowlogs: every policy decision from the datapath's ring buffer, recorded and shipped.

With --enable-policy-event-logs: drains the pinned ring buffer (woken by its epoll fd,
never blocking the loop), writes each DENY (and, at --log-level=debug, each ACCEPT) to
--log-file (rotated by size), and with --enable-cloudwatch-logs ships them to CloudWatch
Logs in batches. Always: serves stats (``flowlogs.sock``: /v1/stats, /v1/flows, /metrics)
including the datapath's drop counters and ring-buffer overruns.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from pydantic import RootModel

from bpf import layout as lay
from bpf import preflight
from bpf.codec import sum_stats
from bpf.maps import Map, TypedMap
from bpf.pins import PinPaths
from bpf.ringbuf import RingBuffer
from common import logs
from common.apimodels import LearnedView, ProcessStats
from common.flags import Settings, parse_settings
from common.localapi import (
    AGENT_SOCKET,
    FLOWLOGS_SOCKET,
    ApiError,
    LocalClient,
    Unavailable,
    make_app,
    serve_unix,
    socket_path,
)
from common.supervisor import StartupError, run_process, supervise
from flowlogs.cloudwatch import CloudWatchShipper, group_name, stream_name
from flowlogs.names import Names
from flowlogs.records import FlowRecord, Formatter
from flowlogs.sink import RotatingFile

log = structlog.get_logger("flowlogs")
RECENT = 1000
READ_POLL_MS = 200  # the reader thread's wait for records, between checks for a stop


class DropCounters(Collector):
    """The reference's drop metrics, as Prometheus counters: the datapath's per-CPU
    totals, which only grow (read at each scrape by ``export``)."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[int, int]] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        packets = CounterMetricFamily(
            "network_policy_drop_count", "Packets dropped by policy", labels=["direction"]
        )
        octets = CounterMetricFamily(
            "network_policy_drop_bytes", "Bytes dropped by policy", labels=["direction"]
        )
        for direction, (count, size) in sorted(self.values.items()):
            packets.add_metric([direction], count)
            octets.add_metric([direction], size)
        yield packets
        yield octets


class PodDropCounters(Collector):
    """What policy denied each pod (np_pod_drops), by direction, as counters labelled
    namespace, pod and direction. A pod's series end with its id: the agent deletes the
    entry, and the next scrape no longer has it."""

    def __init__(self) -> None:
        # (namespace, pod, direction, packets, bytes), replaced whole by each export
        self.values: list[tuple[str, str, str, int, int]] = []

    def collect(self) -> Iterator[CounterMetricFamily]:
        labels = ["namespace", "pod", "direction"]
        packets = CounterMetricFamily(
            "awsnodeagent_pod_denied_packets", "Packets policy denied, by pod", labels=labels
        )
        octets = CounterMetricFamily(
            "awsnodeagent_pod_denied_bytes", "Bytes policy denied, by pod", labels=labels
        )
        for namespace, pod, direction, count, size in self.values:
            packets.add_metric([namespace, pod, direction], count)
            octets.add_metric([namespace, pod, direction], size)
        yield packets
        yield octets


LEARNED_REFRESH = 2.0  # seconds between reads of the agent's learned names


class _Learned(RootModel[list[LearnedView]]):
    pass


class FlowLogs:
    def __init__(
        self,
        settings: Settings,
        *,
        stats_map: TypedMap[ctypes.c_uint32, lay.NpStats],
        names: Names | None,
        pod_drops: TypedMap[ctypes.c_uint32, lay.NpPodDrops] | None = None,
    ) -> None:
        self.settings = settings
        self.stats_map = stats_map
        self.names = names
        self.pod_drops = pod_drops
        self.debug = settings.log_level == "debug"
        self.enabled = settings.enable_policy_event_logs
        self.recent: deque[FlowRecord] = deque(maxlen=RECENT)
        self.counts = {"read": 0, "written": 0, "filtered": 0}
        # one reader thread drains the ring buffer and writes (file, names): the event
        # loop only serves the API and CloudWatch
        self._stop_reading = threading.Event()
        self._reader: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.sink: RotatingFile | None = None
        self.spill: RotatingFile | None = None
        self.cloudwatch: CloudWatchShipper | None = None
        self.formatter: Formatter | None = None
        # (pod, address) -> the name the pod learned it under (from the agent, refreshed)
        self.learned: dict[tuple[str, str], str] = {}
        if self.enabled and names is not None:
            self.formatter = Formatter(
                node=settings.node_name or os.uname().nodename,
                pod_name=names.pod,
                policy_name=names.policy,
                learned_name=lambda pod, address: self.learned.get((pod, address), ""),
            )
            self.sink = RotatingFile(
                settings.log_file,
                max_bytes=settings.flow_log_max_bytes,
                backups=settings.flow_log_backups,
                mode=settings.flow_log_file_mode,
            )
            if settings.enable_cloudwatch_logs:
                self.spill = RotatingFile(
                    settings.log_file + ".cloudwatch-spill",
                    max_bytes=settings.flow_log_max_bytes,
                    backups=settings.flow_log_backups,
                    mode=settings.flow_log_file_mode,
                    name="CloudWatch spill",
                )
                self.cloudwatch = CloudWatchShipper(
                    group=group_name(settings.cluster_name),
                    stream=stream_name(settings.node_name or os.uname().nodename),
                    capacity=settings.cloudwatch_queue_size,
                    spill=self.spill,
                )
        self.registry = CollectorRegistry()
        r = self.registry
        events = Counter(
            "awsnodeagent_flowlogs_events_total",
            "Decision events by outcome",
            ["outcome"],
            registry=r,
        )
        self.m_read, self.m_written, self.m_filtered = (
            events.labels("read"),
            events.labels("written"),
            events.labels("filtered"),
        )
        self.m_dropped = Gauge(
            "awsnodeagent_flowlogs_dropped",
            "Decisions not recorded or not shipped, by reason (never silent)",
            ["reason"],
            registry=r,
        )
        self.drops = DropCounters()
        r.register(self.drops)
        self.pod_denials = PodDropCounters()
        r.register(self.pod_denials)
        self.m_cloudwatch_backlog = Gauge(
            "awsnodeagent_flowlogs_cloudwatch_backlog",
            "Flow-log events waiting to be shipped to CloudWatch (0 without CloudWatch)",
            registry=r,
        )

    # ---- the hot path -------------------------------------------------------------------
    def on_records(self, batch: list[bytes]) -> None:
        """The reader thread's callback: write the batch (see :meth:`_write`)."""
        try:
            self._write(batch)
        except Exception:  # one bad batch must not end the reader
            log.exception("flowlogs.write_failed", events=len(batch))

    def _write(self, batch: list[bytes]) -> None:
        """Writer thread: format, name (pinned maps), write the file, queue for
        CloudWatch (handed to the loop)."""
        fmt, sink = self.formatter, self.sink
        assert fmt is not None
        assert sink is not None
        render = fmt.json if self.settings.flow_log_format == "json" else fmt.text
        lines = []
        shipped: list[tuple[int, str]] = []
        filtered = 0
        for raw in batch:
            if not self.debug and not fmt.is_deny(raw):
                filtered += 1
                continue
            record = fmt.record(raw)
            lines.append(render(record))
            self.recent.append(record)
            if self.cloudwatch is not None:
                shipped.append((record.timestamp_ns // 1_000_000, fmt.cloudwatch(record)))
        written = sink.write_lines(lines)  # what is not written is counted by the sink
        if shipped and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing: counted below
                self._loop.call_soon_threadsafe(self._ship, shipped)
        self.counts["read"] += len(batch)
        self.counts["written"] += written
        self.counts["filtered"] += filtered
        self.m_read.inc(len(batch))
        self.m_written.inc(written)
        self.m_filtered.inc(filtered)

    def _ship(self, events: list[tuple[int, str]]) -> None:
        cw = self.cloudwatch
        assert cw is not None
        for ts, message in events:
            cw.submit(ts, message)

    def _read_loop(self, ring: RingBuffer) -> None:
        """Reader thread: wait on the ring buffer (the GIL is released meanwhile), then
        format, name, write: none of it on the event loop."""
        while not self._stop_reading.is_set():
            ring.poll(READ_POLL_MS)
        ring.consume()  # what arrived before the stop

    def start_reader(self, ring: RingBuffer) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_reading.clear()
        self._reader = threading.Thread(
            target=self._read_loop, args=(ring,), name="flowlogs-reader", daemon=True
        )
        self._reader.start()

    def stop_reader(self) -> None:
        """Blocking: the reader drains what arrived and ends."""
        self._stop_reading.set()
        if self._reader is not None:
            self._reader.join()
            self._reader = None

    # ---- tasks ----------------------------------------------------------------------------
    async def learned_names(self) -> None:
        """Keep the names pods learned addresses under (the agent's /v1/fqdn), so that
        allowed flows to them carry the name. Best effort: the agent may be down."""
        client = LocalClient(socket_path(self.settings.runtime_dir, AGENT_SOCKET), process="agent")
        while True:
            try:
                views = await client.get("/v1/fqdn", _Learned, timeout=5)
                self.learned = {
                    (v.pod, v.address): v.name.rstrip(".") for v in views.root if v.name
                }
            except (Unavailable, ApiError):
                pass
            await asyncio.sleep(LEARNED_REFRESH)

    async def drain(self, ring: RingBuffer, stop: asyncio.Event) -> None:
        self.start_reader(ring)
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 60)
                if self.formatter is not None:
                    self.formatter.resync_clock()
        finally:
            await asyncio.to_thread(self.stop_reader)

    def datapath_stats(self) -> dict[str, int]:
        return sum_stats(self.stats_map)

    def stats(self) -> ProcessStats:
        dp = self.datapath_stats()
        stats: dict[str, float | int | str] = {
            "enabled": int(self.enabled),
            "events_read": self.counts["read"],
            "events_written": self.counts["written"],
            "events_filtered": self.counts["filtered"],
            "ring_overruns": dp["events_lost"],
            "file": self.settings.log_file,
            "file_rotations": self.sink.rotations if self.sink else 0,
            "file_reopened": self.sink.stats.reopened if self.sink else 0,
            "file_lost_disk_full": self.sink.stats.lost["disk_full"] if self.sink else 0,
            "file_lost_error": self.sink.stats.lost["file_error"] if self.sink else 0,
            "file_last_error": self.sink.stats.last_error if self.sink else "",
            "ingress_denied_packets": dp["ingress_denied_packets"],
            "egress_denied_packets": dp["egress_denied_packets"],
        }
        if self.cloudwatch is not None:
            cw = self.cloudwatch.stats
            stats.update(
                {
                    "cloudwatch_group": self.cloudwatch.group,
                    "cloudwatch_shipped": cw.shipped,
                    "cloudwatch_batches": cw.batches,
                    "cloudwatch_backlog": self.cloudwatch.held,
                    "cloudwatch_overflow": cw.overflow,
                    "cloudwatch_rejected": cw.rejected,
                    "cloudwatch_retries": cw.retries,
                    "cloudwatch_last_error": cw.last_error,
                    "cloudwatch_spilled_waiting": cw.spilled_waiting,
                    "cloudwatch_reshipped": cw.reshipped,
                    "cloudwatch_lost_in_crash": cw.lost_in_crash,
                }
            )
        return ProcessStats(running=True, stats=stats)

    def export(self) -> None:
        dp = self.datapath_stats()
        self.drops.values = {
            d: (dp[f"{d}_denied_packets"], dp[f"{d}_denied_bytes"]) for d in ("ingress", "egress")
        }
        self.m_dropped.labels("ring_overrun").set(dp["events_lost"])
        self.pod_denials.values = self._pod_denials()
        self.m_cloudwatch_backlog.set(self.cloudwatch.held if self.cloudwatch else 0)
        if self.sink is not None:
            self.m_dropped.labels("file_disk_full").set(self.sink.stats.lost["disk_full"])
            self.m_dropped.labels("file_error").set(self.sink.stats.lost["file_error"])
        if self.cloudwatch is not None:
            self.m_dropped.labels("cloudwatch_queue_full").set(self.cloudwatch.stats.overflow)
            self.m_dropped.labels("cloudwatch_rejected").set(self.cloudwatch.stats.rejected)
            self.m_dropped.labels("cloudwatch_lost_in_crash").set(
                self.cloudwatch.stats.lost_in_crash
            )

    def _pod_denials(self) -> list[tuple[str, str, str, int, int]]:
        if self.pod_drops is None or self.names is None:
            return []
        rows = []
        for key, v in self.pod_drops.items():
            namespace, _, pod = self.names.pod(key.value).partition("/")
            if not pod:
                continue  # not named (yet): the next scrape has it
            rows.append((namespace, pod, "ingress", v.ingress_packets, v.ingress_bytes))
            rows.append((namespace, pod, "egress", v.egress_packets, v.egress_bytes))
        return rows

    def app(self) -> web.Application:
        async def stats(_: web.Request) -> web.Response:
            return web.json_response(self.stats().model_dump())

        async def flows(request: web.Request) -> web.Response:
            try:
                limit = max(1, min(int(request.query.get("limit", "20")), RECENT))
            except ValueError:
                raise web.HTTPBadRequest(reason="limit must be a number") from None
            items = list(self.recent)[-limit:]
            return web.json_response(
                [
                    {
                        "time": r.timestamp_ns / 1e9,
                        "line": r.line(),
                        "verdict": r.verdict,
                        "pod": r.pod,
                        "policy": r.policy,
                        "src": f"{r.src_ip}:{r.src_port}",
                        "dst": f"{r.dst_ip}:{r.dst_port}",
                        "protocol": r.protocol,
                        "direction": r.direction,
                        "reason": r.reason,
                    }
                    for r in items
                ]
            )

        async def metrics(_: web.Request) -> web.Response:
            await asyncio.to_thread(self.export)  # reads maps: not on the event loop
            return web.Response(body=generate_latest(self.registry), content_type="text/plain")

        app = make_app()
        app.router.add_get("/v1/stats", stats)
        app.router.add_get("/v1/flows", flows)
        app.router.add_get("/metrics", metrics)
        return app

    def reopen(self) -> None:
        """SIGHUP: open the files again by name before their next write."""
        log.info("flowlogs.reopen_requested")
        for f in (self.sink, self.spill):
            if f is not None:
                f.reopen()

    def close(self) -> None:
        for f in (self.sink, self.spill):
            if f is not None:
                f.close()


def _open_pod_drops(pins: PinPaths) -> TypedMap[ctypes.c_uint32, lay.NpPodDrops] | None:
    """np_pod_drops, or None under pins from before the map existed (the agent's next
    start adds it)."""
    path = pins.map(lay.MAP_POD_DROPS)
    if not os.path.exists(path):
        return None
    return TypedMap(Map.from_pin(path), ctypes.c_uint32, lay.NpPodDrops)


async def run(settings: Settings, *, stop: asyncio.Event) -> None:
    problems = preflight.problems(settings.bpf_pin_root)
    if problems:
        raise StartupError("; ".join(problems))
    pins = PinPaths(settings.bpf_pin_root)
    if not await preflight.wait_for_pin(
        pins.map(lay.MAP_EVENTS), stop, event="flowlogs.waiting_for_maps"
    ):
        return
    stats_map = TypedMap(Map.from_pin(pins.map(lay.MAP_STATS)), ctypes.c_uint32, lay.NpStats)
    names = Names(settings.bpf_pin_root)  # flow records and the per-pod denial counters
    pod_drops = await asyncio.to_thread(_open_pod_drops, pins)
    flows = FlowLogs(settings, stats_map=stats_map, names=names, pod_drops=pod_drops)
    ring_map: Map | None = None
    ring: RingBuffer | None = None
    try:
        tasks = {"api": serve_unix(flows.app(), socket_path(settings.runtime_dir, FLOWLOGS_SOCKET))}
        if flows.enabled:
            ring_map = Map.from_pin(pins.map(lay.MAP_EVENTS))
            ring = RingBuffer(ring_map, flows.on_records)
            tasks["drain"] = flows.drain(ring, stop)
            tasks["learned-names"] = flows.learned_names()
            if flows.cloudwatch is not None:
                tasks["cloudwatch"] = flows.cloudwatch.run()
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, flows.reopen)
            log.info(
                "flowlogs.starting",
                file=settings.log_file,
                format=settings.flow_log_format,
                cloudwatch=flows.cloudwatch.group if flows.cloudwatch else None,
                accept_logged=flows.debug,
            )
        else:
            log.info("flowlogs.disabled", reason="--enable-policy-event-logs is false")
        await supervise(tasks, stop=stop, grace=settings.shutdown_timeout)
    finally:
        if ring is not None:
            ring.close()
        if ring_map is not None:
            ring_map.close()
        flows.close()
        names.close()
        if pod_drops is not None:
            pod_drops.raw.close()
        stats_map.raw.close()
        log.info("flowlogs.stopped", **flows.counts, at=time.time())


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings("np-flowlogs", __doc__.splitlines()[0], argv)
    logs.configure(settings.log_level, process="flowlogs", json=not sys.stderr.isatty())
    run_process("np-flowlogs", lambda stop: run(settings, stop=stop))


if __name__ == "__main__":
    main()
