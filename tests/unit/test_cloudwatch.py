"""CloudWatch shipping against a local moto server over HTTP (no patched client)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session

from flowlogs.cloudwatch import CloudWatchShipper, make_batches
from flowlogs.sink import RotatingFile
from simnode.cloudwatch import LocalCloudWatch

GROUP, STREAM = "/aws/k8s-cluster/cluster", "aws-network-policy-agent-audit-node-1"


Moto = LocalCloudWatch


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch) -> Iterator[Moto]:
    m = Moto()
    m.start()
    for name, value in m.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    try:
        yield m
    finally:
        m.stop()


async def all_events() -> list[dict[str, Any]]:
    session = get_session()
    out: list[dict[str, Any]] = []
    async with session.create_client("logs") as client:
        token = None
        while True:
            kw = {"logGroupName": GROUP, "logStreamName": STREAM, "startFromHead": True}
            if token:
                kw["nextToken"] = token
            resp = await client.get_log_events(**kw)
            out += resp["events"]
            if resp.get("nextForwardToken") in (None, token):
                return out
            token = resp["nextForwardToken"]
            if not resp["events"]:
                return out


def spill_file(tmp_path: Path, backups: int = 2) -> RotatingFile:
    return RotatingFile(
        str(tmp_path / "flows.log.cloudwatch-spill"), max_bytes=1 << 20, backups=backups
    )


def spilled_lines(spill: RotatingFile) -> list[str]:
    return Path(spill.path).read_text().splitlines() if os.path.exists(spill.path) else []


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, **kw: Any
) -> AsyncIterator[tuple[CloudWatchShipper, RotatingFile]]:
    """A shipper (queue of 1,000, fast retries) on a spill file, running until the block
    ends (cancelled, as SIGTERM does)."""
    spill = spill_file(tmp_path)
    s = CloudWatchShipper(
        group=GROUP,
        stream=STREAM,
        capacity=1000,
        spill=spill,
        flush_interval=0.1,
        backoff_max=0.5,
        **kw,
    )
    task = asyncio.create_task(s.run(), name="cloudwatch")
    try:
        yield s, spill
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        spill.close()


@pytest.fixture
async def shipper(tmp_path: Path) -> AsyncIterator[tuple[CloudWatchShipper, RotatingFile]]:
    spill = spill_file(tmp_path)
    s = CloudWatchShipper(
        group=GROUP,
        stream=STREAM,
        capacity=30_000,
        spill=spill,
        flush_interval=0.1,
        backoff_max=0.5,
    )
    task = asyncio.create_task(s.run(), name="cloudwatch")
    try:
        yield s, spill
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        spill.close()


async def wait_shipped(s: CloudWatchShipper, n: int, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while s.stats.shipped < n:
        assert asyncio.get_running_loop().time() < deadline, s.stats
        await asyncio.sleep(0.05)


async def test_group_stream_and_batches(
    moto: Moto, shipper: tuple[CloudWatchShipper, RotatingFile]
) -> None:
    s, _ = shipper
    now = int(time.time() * 1000)
    events = [
        (now + i // 10, f"Node: n;SIP: 10.0.0.{i % 250};PolicyVerdict: DENY #{i}")
        for i in range(25_000)
    ]
    for ts, msg in events:
        s.submit(ts, msg)
    await wait_shipped(s, 25_000)
    assert s.stats.batches >= len(make_batches(events)) == 3
    got = await all_events()
    assert len(got) == 25_000
    assert {e["message"] for e in got} == {m for _, m in events}
    session = get_session()
    async with session.create_client("logs") as client:
        groups = await client.describe_log_groups(logGroupNamePrefix=GROUP)
        assert [g["logGroupName"] for g in groups["logGroups"]] == [GROUP]
        streams = await client.describe_log_streams(logGroupName=GROUP)
        assert [x["logStreamName"] for x in streams["logStreams"]] == [STREAM]


async def test_large_messages_respect_the_byte_limit(
    moto: Moto, shipper: tuple[CloudWatchShipper, RotatingFile]
) -> None:
    s, _ = shipper
    now = int(time.time() * 1000)
    for i in range(600):
        s.submit(now + i, f"{i:04d}" + "x" * 4000)
    await wait_shipped(s, 600)
    assert s.stats.batches >= 3, "2.4 MB cannot go in one call"
    assert len(await all_events()) == 600


async def test_outage_then_recovery_loses_nothing(moto: Moto, tmp_path: Path) -> None:
    async with running(tmp_path) as (s, spill):
        now = int(time.time() * 1000)
        for i in range(100):
            s.submit(now + i, f"before outage {i}")
        await wait_shipped(s, 100)
        moto.stop()  # CloudWatch unreachable
        for i in range(1200):
            s.submit(now + 1000 + i, f"during outage {i}")
        for _ in range(100):
            if s.stats.retries >= 2:
                break
            await asyncio.sleep(0.05)
        assert s.stats.retries >= 2, "failures are retried, with backoff, and counted"
        assert s.stats.last_error
        assert s.stats.overflow == 200, "beyond the queue bound: spilled, and counted"
        spilled = spilled_lines(spill)
        assert len(spilled) == 200
        assert spilled[0].split(" ", 1)[1].startswith("during outage 1000")
        moto.start()  # back (a fresh server: group and stream are created again)
        # the queue is shipped, then the spilled events are read back and shipped too
        await wait_shipped(s, 1200)
        got = {e["message"] for e in await all_events()}
        assert {f"during outage {i}" for i in range(1200)} <= got
        assert s.stats.reshipped == 200
        assert s.stats.rejected == 0
        assert s.stats.last_error == "", "cleared once CloudWatch accepts again"
        assert not [n for n in os.listdir(tmp_path) if "reship" in n]


async def test_stop_spills_what_is_held_and_the_next_process_ships_it(
    moto: Moto, tmp_path: Path
) -> None:
    now = int(time.time() * 1000)
    moto.stop()
    async with running(tmp_path, shutdown_flush=0.5) as (s, spill):
        for i in range(500):
            s.submit(now + i, f"held {i}")
        for _ in range(100):
            if s.stats.retries >= 1:
                break
            await asyncio.sleep(0.05)
    # the block's end cancelled the task, as the supervisor does at SIGTERM
    assert s.stats.shutdown_spilled == 500
    assert len(spilled_lines(spill)) == 500
    # the next process ships them once CloudWatch is back
    moto.start()
    async with running(tmp_path) as (s2, _):
        s2.submit(now + 1000, "fresh")
        await wait_shipped(s2, 501)
        got = {e["message"] for e in await all_events()}
        assert {f"held {i}" for i in range(500)} | {"fresh"} <= got
        assert s2.stats.lost_in_crash == 0

    assert os.environ["AWS_ENDPOINT_URL_CLOUDWATCH_LOGS"] == moto.url


async def test_a_batch_refused_for_good_is_counted_spilled_and_the_queue_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint that refuses every request with a non-retryable error (as CloudWatch
    does without permission): the batch is not retried forever."""
    from aiohttp import web

    async def refuse(_: web.Request) -> web.Response:
        return web.json_response(
            {"__type": "AccessDeniedException", "message": "not authorized"}, status=400
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    monkeypatch.setenv("AWS_ENDPOINT_URL_CLOUDWATCH_LOGS", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    try:
        async with running(tmp_path) as (s, spill):
            now = int(time.time() * 1000)
            for i in range(10):
                s.submit(now + i, f"refused {i}")
            for _ in range(100):
                if s.stats.errors >= 1 and s.held == 0:
                    break
                await asyncio.sleep(0.05)
            assert s.stats.errors >= 1
            assert s.held == 0, "the queue went on"
            assert "AccessDeniedException" in s.stats.last_error
            assert len(spilled_lines(spill)) == 10, (s.stats, os.listdir(tmp_path))
            assert s.stats.retries == 0
    finally:
        await runner.cleanup()
