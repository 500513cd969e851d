"""Network namespace helpers: run ``ip`` inside a namespace, create sockets inside one.

Python 3.11 has no ``os.setns``; ``setns(2)`` is called through libc. A socket belongs to
the namespace its creating thread was in at creation time, so :func:`socket_in` switches
the calling thread in, creates the socket and switches back (synchronously: no other
code of this thread runs meanwhile), after which the socket can be used from anywhere.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"


class CommandError(RuntimeError):
    pass


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def inside(netns: str) -> Iterator[None]:
    """Run the body with the calling thread inside ``netns`` (no awaiting inside!)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def socket_in(netns: str | None, family: int, kind: int) -> socket.socket:
    if netns is None:
        sock = socket.socket(family, kind)
    else:
        with inside(netns):
            sock = socket.socket(family, kind)
    sock.setblocking(False)
    return sock


def run(script: str, *, netns: str | None = None) -> str:
    """Run a shell script (optionally inside a namespace); raise with its stderr."""
    argv = ["sh", "-ec", script]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CommandError(
            f"{' '.join(argv[:4])}...: exit {proc.returncode}: "
            f"{proc.stderr.strip()}\n--- script ---\n{script}"
        )
    return proc.stdout


async def arun(script: str, *, netns: str | None = None) -> str:
    """:func:`run` without blocking the event loop."""
    argv = ["sh", "-ec", script]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise CommandError(
            f"{' '.join(argv[:4])}...: exit {proc.returncode}: "
            f"{err.decode().strip()}\n--- script ---\n{script}"
        )
    return out.decode()


def exists(netns: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, netns))


def delete(netns: str) -> None:
    if exists(netns):
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True, check=False)
