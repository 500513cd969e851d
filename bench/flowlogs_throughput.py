"""Flow-log throughput: decision events from the ring buffer to the log file.

A producer process runs the real datapath program (BPF_PROG_TEST_RUN on a denied packet)
at a fixed rate, so every run emits one real DENY event into the pinned ring buffer; this
process drains it with the shipper's own code (its reader thread: ring buffer poll, decode,
format, rotating file). For each rate: events written, ring-buffer overruns (the kernel-side
counter), and this process's CPU time per event. Target: 100,000 events/s with zero loss
at no more than 10 us of CPU per event.

Then CloudWatch: the shipper's own client ships a backlog of events to a local moto
server over HTTP (PutLogEvents batches within the API's limits): batches/s and events/s.
moto is slower than the real service, so this measures our batching and overhead, not
CloudWatch.

    python -m bench.flowlogs_throughput [--rates 50000,100000,200000] [--seconds 5]
                                        [--cloudwatch-events 300000] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid

from bench.common import prepare
from bpf import layout as lay
from bpf.datapath import DENY_ALL, Datapath, PodPolicy
from bpf.maps import Map
from bpf.ringbuf import RingBuffer
from common.flags import Settings
from flowlogs.cloudwatch import CloudWatchShipper
from flowlogs.main import FlowLogs
from flowlogs.names import Names
from flowlogs.sink import RotatingFile
from simnode import packets as pk
from simnode.cloudwatch import LocalCloudWatch

PRODUCER = """
import sys, time
from bpf.objects import Program
prog = Program.from_pin(sys.argv[1])
frame = bytes.fromhex(sys.argv[2])
rate, seconds = int(sys.argv[3]), float(sys.argv[4])
tick = 0.005
per_tick = max(1, int(rate * tick))
start = time.monotonic()
sent = 0
while time.monotonic() - start < seconds:
    prog.test_run(frame, ifindex=1, repeat=per_tick)
    sent += per_tick
    ahead = sent / rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
print(sent)
"""


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def measure(
    flows: FlowLogs, ring: RingBuffer, dp: Datapath, pin_root: str, rate: int, seconds: float
) -> dict[str, float]:
    frame = pk.packet(
        src=ipaddress.ip_address("10.0.0.2"),
        dst=ipaddress.ip_address("10.0.0.1"),
        protocol=pk.TCP,
        dport=80,
    )
    lost0 = dp.stats()["events_lost"]
    written0 = flows.counts["written"]
    c0 = cpu()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PRODUCER,
        os.path.join(pin_root, "programs", lay.PROG_INGRESS),
        frame.hex(),
        str(rate),
        str(seconds),
        stdout=asyncio.subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    out, _ = await proc.communicate()
    sent = int(out.decode().strip() or 0)
    await asyncio.sleep(0.2)
    # the reader thread drains what is left: wait until the counts stop moving
    last = -1
    while flows.counts["read"] != last:
        last = flows.counts["read"]
        await asyncio.sleep(0.3)
    c1 = cpu()
    written = flows.counts["written"] - written0
    lost = dp.stats()["events_lost"] - lost0
    return {
        "rate_asked": rate,
        "events_sent": sent,
        "events_written": written,
        "ring_overruns": lost,
        "events_per_second": round(min(written, sent) / seconds),
        "cpu_us_per_event": round((c1 - c0) / max(written, 1) * 1e6, 2),
        "zero_loss": lost == 0 and written == sent,
    }


async def amain(rates: list[int], seconds: float) -> list[dict[str, float]]:
    pin_root = f"/sys/fs/bpf/npbench-{uuid.uuid4().hex[:6]}"
    tmp = tempfile.mkdtemp(prefix="np-flowbench-")
    dp = Datapath.open(pin_root, ct_entries=32768)
    results = []
    try:
        dp.program_pods(
            {
                1: PodPolicy(
                    dp.register_pod(namespace="bench", name="web", uid="u"), DENY_ALL, DENY_ALL
                )
            }
        )
        dp.set_event_flags(emit_deny=True, emit_allow=False)
        settings = Settings(
            enable_policy_event_logs=True,
            log_level="info",
            log_file=os.path.join(tmp, "flows.log"),
            bpf_pin_root=pin_root,
            node_name="bench",
        )
        names = Names(pin_root)
        flows = FlowLogs(settings, stats_map=dp.stats_map, names=names)
        ring_map = Map.from_pin(os.path.join(pin_root, "maps", lay.MAP_EVENTS))
        ring = RingBuffer(ring_map, flows.on_records)
        flows.start_reader(ring)
        try:
            for rate in rates:
                results.append(await measure(flows, ring, dp, pin_root, rate, seconds))
        finally:
            await asyncio.to_thread(flows.stop_reader)
            ring.close()
            ring_map.close()
            flows.close()
            names.close()
    finally:
        dp.close()
        Datapath.unpin(pin_root)
        shutil.rmtree(tmp, ignore_errors=True)
    return results


async def cloudwatch(events: int) -> dict[str, float]:
    """Ship ``events`` queued events to a local moto server; batches/s and events/s."""
    server = LocalCloudWatch()
    server.start()
    saved = {k: os.environ.get(k) for k in server.environment()}
    os.environ.update(server.environment())
    try:
        spill_dir = tempfile.mkdtemp(prefix="np-bench-spill-")
        spill = RotatingFile(os.path.join(spill_dir, "spill"), max_bytes=1 << 30, backups=0)
        shipper = CloudWatchShipper(
            group="/aws/k8s-cluster/cluster",
            stream="aws-network-policy-agent-audit-bench",
            capacity=events + 1,
            spill=spill,
            flush_interval=0.05,
        )
        task = asyncio.create_task(shipper.run(), name="bench-cloudwatch")
        now = int(time.time() * 1000)
        # a warm-up event creates the group and stream, outside the measurement
        shipper.submit(now, "warm-up")
        while shipper.stats.shipped < 1:  # noqa: ASYNC110 (polling a counter)
            await asyncio.sleep(0.01)
        c0, started = cpu(), time.monotonic()
        for i in range(events):
            shipper.submit(
                now + i // 100,
                f"Node: bench;SIP: 10.0.{i // 256 % 256}."
                f"{i % 256};SPORT: {1024 + i % 60000};DIP: 10.66.0.1;DPORT: 80;"
                "PROTOCOL: TCP;PolicyVerdict: DENY",
            )
        while shipper.stats.shipped < events + 1:  # noqa: ASYNC110 (polling a counter)
            await asyncio.sleep(0.01)
        took = time.monotonic() - started
        cpu_s = cpu() - c0
        batches = shipper.stats.batches - 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        spill.close()
        shutil.rmtree(spill_dir, ignore_errors=True)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {
        "events": events,
        "seconds": round(took, 2),
        "batches": batches,
        "batches_per_second": round(batches / took, 1),
        "events_per_second": round(events / took),
        "cpu_us_per_event": round(cpu_s / events * 1e6, 2),
        "retries": shipper.stats.retries,
        "spilled": shipper.stats.overflow,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="50000,100000,150000,200000")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--cloudwatch-events", type=int, default=300_000)
    p.add_argument("--quick", action="store_true", help="100k/s for 2 s; 50k to CloudWatch")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    prepare()
    rates = [100_000] if args.quick else [int(r) for r in args.rates.split(",")]
    seconds = 2.0 if args.quick else args.seconds
    results = asyncio.run(amain(rates, seconds))
    print(f"{'rate asked':>12} {'written/s':>12} {'overruns':>9} {'CPU us/event':>13}  zero loss")
    for r in results:
        print(
            f"{r['rate_asked']:>12,} {r['events_per_second']:>12,} {r['ring_overruns']:>9} "
            f"{r['cpu_us_per_event']:>13}  {'yes' if r['zero_loss'] else 'NO'}"
        )
    best = max(
        (r for r in results if r["zero_loss"]), key=lambda r: r["events_per_second"], default=None
    )
    summary = {
        "results": results,
        "target_events_per_second": 100_000,
        "target_cpu_us_per_event": 10.0,
        "max_zero_loss_events_per_second": best["events_per_second"] if best else 0,
    }
    print(
        f"sustained with zero loss: {summary['max_zero_loss_events_per_second']:,} events/s "
        "(target 100,000 at <= 10 us CPU/event)"
    )
    cw = asyncio.run(cloudwatch(50_000 if args.quick else args.cloudwatch_events))
    summary["cloudwatch"] = cw
    print(
        f"CloudWatch (local moto server): {cw['events']:,} events in {cw['batches']} "
        f"batches, {cw['seconds']} s: {cw['batches_per_second']} batches/s, "
        f"{cw['events_per_second']:,} events/s, {cw['cpu_us_per_event']} us CPU/event, "
        f"{cw['retries']} retries"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
