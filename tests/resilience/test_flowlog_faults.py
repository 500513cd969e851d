"""Flow records are written or counted, whatever happens to their file: deleted while
the shipper runs, a full disk, SIGHUP from logrotate. The real np-flowlogs process, real
denied packets from a pod, a real (tiny) tmpfs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpf.datapath import DENY_ALL
from common.apimodels import ProcessStats
from common.localapi import FLOWLOGS_SOCKET, LocalClient, Unavailable, socket_path
from simnode.netns import socket_in
from simnode.node import SimPod
from tests.privileged.agentrig import eventually
from tests.privileged.podnet import PodNet
from tests.privileged.test_flowlogs import start, stop


@pytest.fixture
def pods(podnet: PodNet) -> PodNet:
    podnet.dp.set_event_flags(emit_deny=True, emit_allow=False)
    return podnet


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KB tmpfs, unmounted afterwards."""
    mnt = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        assert not os.path.ismount(mnt)


async def deny(client: SimPod, server: SimPod, count: int) -> None:
    """``count`` UDP datagrams the server's policy denies (one DENY event each: a
    new source port for each, so none is a tracked flow)."""

    def send() -> None:
        for i in range(count):
            s = socket_in(client.netns, socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.sendto(b"x", (str(server.ipv4), 80))
            finally:
                s.close()
            if i % 200 == 199:
                time.sleep(0.01)  # let the shipper drain (the ring holds 1 MB)

    await asyncio.to_thread(send)


async def stats(tmp_path: Path) -> dict[str, float | int | str]:
    api = LocalClient(socket_path(str(tmp_path / "run"), FLOWLOGS_SOCKET))
    return (await api.get("/v1/stats", ProcessStats)).stats


async def settled(tmp_path: Path, read: int) -> dict[str, float | int | str]:
    """Stats once the shipper has read ``read`` events."""
    last: dict[str, float | int | str] = {}

    async def done() -> bool:
        nonlocal last
        try:
            last = await stats(tmp_path)
        except Unavailable:
            return False
        return int(last["events_read"]) >= read

    await eventually(done, timeout=15, what=lambda: f"events read: {last}")
    return last


async def draining(tmp_path: Path) -> None:
    """The shipper is up and drains the ring buffer."""
    await settled(tmp_path, 0)
    await asyncio.sleep(0.2)


async def two_pods(pods: PodNet) -> tuple[SimPod, SimPod]:
    client, server = await pods.add_pod("client"), await pods.add_pod("server")
    pods.program(server, ingress=DENY_ALL)
    return client, server


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_a_deleted_file_is_opened_again(pods: PodNet, pin_root: str, tmp_path: Path) -> None:
    client, server = await two_pods(pods)
    proc = await start(pin_root, tmp_path, "--log-level=info")
    log = tmp_path / "flows.log"
    try:
        await draining(tmp_path)
        await deny(client, server, 50)
        await settled(tmp_path, 50)
        assert len(await asyncio.to_thread(_lines, log)) == 50
        await asyncio.to_thread(log.unlink)  # an operator (or a cleanup job) deletes it
        await deny(client, server, 60)
        st = await settled(tmp_path, 110)
        lines = await asyncio.to_thread(_lines, log)
        assert len(lines) == 60, "written to the path, not into the unlinked file"
        assert st["events_written"] == 110
        assert st["file_reopened"] == 1
        # logrotate's way: move it away, then SIGHUP
        await asyncio.to_thread(os.replace, log, tmp_path / "flows.log.rotated")
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGHUP)
        await deny(client, server, 30)
        await settled(tmp_path, 140)
        assert len(await asyncio.to_thread(_lines, log)) == 30
        assert len(await asyncio.to_thread(_lines, tmp_path / "flows.log.rotated")) == 60
        mode = stat.S_IMODE((await asyncio.to_thread(os.stat, log)).st_mode)
        assert mode == 0o600, oct(mode)
    finally:
        await stop(proc)


async def test_a_full_disk_is_counted_and_writing_resumes(
    pods: PodNet, pin_root: str, tmp_path: Path, tiny_disk: Path
) -> None:
    client, server = await two_pods(pods)
    log = tiny_disk / "flows.log"
    proc = await start(
        pin_root, tmp_path, "--log-level=info", f"--log-file={log}", "--flow-log-max-bytes=10000000"
    )
    filler = tiny_disk / "filler"
    try:
        await draining(tmp_path)
        # fill the disk but for a few KB, then deny far more than fits
        with contextlib.suppress(OSError):
            await asyncio.to_thread(filler.write_bytes, b"\0" * (256 * 1024 - 8 * 1024))
        total = 1500
        await deny(client, server, total)
        st = await settled(tmp_path, total)
        written, lost = int(st["events_written"]), int(st["file_lost_disk_full"])
        assert lost > 0
        assert written + lost == total, st  # every record written or counted
        lines = await asyncio.to_thread(_lines, log)
        whole = [ln for ln in lines if ln.endswith(" Policy -")]
        assert len(whole) == written
        # space returns: writing resumes, on a new line
        await asyncio.to_thread(filler.unlink)
        await deny(client, server, 40)
        st = await settled(tmp_path, total + 40)
        assert int(st["events_written"]) == written + 40
        assert st["file_last_error"] == ""
        lines = await asyncio.to_thread(_lines, log)
        assert all(ln.endswith(" Policy -") for ln in lines[-40:])
        api = LocalClient(socket_path(str(tmp_path / "run"), FLOWLOGS_SOCKET))
        metrics = await api.text("/metrics")
        assert f'awsnodeagent_flowlogs_dropped{{reason="file_disk_full"}} {float(lost)}' in metrics
    finally:
        proc.terminate()
        _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    text = err.decode()
    # one line when writes start failing and one when they resume, not one per batch
    assert text.count("flowlogs.file_unwritable") == 1, text[-3000:]
    assert text.count("flowlogs.file_writable_again") == 1
    assert "Traceback" not in text


async def test_cloudwatch_events_survive_sigterm_and_are_counted_after_kill_9(
    pods: PodNet, pin_root: str, tmp_path: Path
) -> None:
    """CloudWatch unreachable: SIGTERM spills what is held and the next process ships
    it; kill -9 loses what was held, and the next process counts it."""
    import json

    from simnode.cloudwatch import LocalCloudWatch

    client, server = await two_pods(pods)
    moto = LocalCloudWatch()
    moto.start()
    env = {**moto.environment()}
    moto.stop()  # unreachable from now on
    cw = ("--enable-cloudwatch-logs=true", "--log-level=info", "--cluster-name=t")
    state = tmp_path / "flows.log.cloudwatch-spill.state"

    async def run_flowlogs() -> asyncio.subprocess.Process:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return await start(pin_root, tmp_path, *cw)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def held() -> int:
        try:
            return int(json.loads(state.read_text())["held"])
        except (OSError, ValueError, KeyError):
            return -1

    # 1. SIGTERM while unreachable: the 80 held events are spilled
    proc = await run_flowlogs()
    try:
        await draining(tmp_path)
        await deny(client, server, 80)
        await settled(tmp_path, 80)
    finally:
        proc.terminate()
        _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "cloudwatch.spilled_at_stop" in err.decode()
    spill = tmp_path / "flows.log.cloudwatch-spill"
    assert len(await asyncio.to_thread(_lines, spill)) == 80
    assert await asyncio.to_thread(held) == 0

    # 2. kill -9 while unreachable: the 50 held events are lost, and counted next time
    proc = await run_flowlogs()
    try:
        await draining(tmp_path)
        await deny(client, server, 50)
        await settled(tmp_path, 50)

        async def saved() -> bool:
            return await asyncio.to_thread(held) == 50

        await eventually(saved, timeout=5, what="the held count in the state file")
    finally:
        proc.kill()
        await proc.wait()

    # 3. CloudWatch is back: the next process counts the 50, ships the 80 spilled
    moto = LocalCloudWatch()
    moto.start()
    env.update(moto.environment())
    try:
        proc = await run_flowlogs()
        try:
            last: dict[str, float | int | str] = {}

            async def shipped() -> bool:
                nonlocal last
                try:
                    last = await stats(tmp_path)
                except Unavailable:
                    return False
                return (
                    int(last.get("cloudwatch_reshipped", 0)) == 80
                    and int(last.get("cloudwatch_shipped", 0)) >= 80
                )

            await eventually(shipped, timeout=30, what=lambda: f"stats {last}")
            assert last["cloudwatch_lost_in_crash"] == 50
            assert last["cloudwatch_last_error"] == ""
        finally:
            await stop(proc)
    finally:
        moto.stop()
