"""Consume a BPF ring buffer: from a thread of its own (:meth:`RingBuffer.poll`), or
from asyncio without blocking the loop (:meth:`RingBuffer.attach`).

libbpf's ``ring_buffer`` exposes an epoll fd that becomes readable when records are
available; the loop watches it with ``add_reader`` and drains with the non-blocking
``ring_buffer__consume``. Records are copied out of the ring (the kernel reuses the
space once the callback returns) and handed to ``on_records`` as one batch per wake-up.
"""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Callable

from bpf import _libbpf as lb
from bpf.maps import Map


class RingBuffer:
    def __init__(self, ring: Map, on_records: Callable[[list[bytes]], None]) -> None:
        self._ring = ring
        self._on_records = on_records
        self._batch: list[bytes] = []
        self._cb = lb.RING_SAMPLE_FN(self._sample)  # referenced for the object's lifetime
        self._rb = lb.check_ptr(
            lb.lib.ring_buffer__new(ring.fd, self._cb, None, None),
            f"ring buffer {ring.name}: open",
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self.consumed = 0

    def _sample(self, ctx: int | None, data: int | None, size: int) -> int:
        self._batch.append(ctypes.string_at(data or 0, size))
        return 0

    @property
    def epoll_fd(self) -> int:
        return int(lb.lib.ring_buffer__epoll_fd(self._rb))

    def consume(self) -> int:
        """Drain every available record now (non-blocking); returns how many."""
        n = lb.lib.ring_buffer__consume(self._rb)
        batch, self._batch = self._batch, []
        if n < 0:
            lb.check(n, f"ring buffer {self._ring.name}: consume")
        if batch:
            self.consumed += len(batch)
            self._on_records(batch)
        return len(batch)

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for records (the GIL is released while waiting),
        then drain them; returns how many. For a thread of its own."""
        n = lb.lib.ring_buffer__poll(self._rb, timeout_ms)
        batch, self._batch = self._batch, []
        if n < 0 and n != -4:  # -EINTR: a signal, not an error
            lb.check(n, f"ring buffer {self._ring.name}: poll")
        if batch:
            self.consumed += len(batch)
            self._on_records(batch)
        return len(batch)

    def attach(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Drain whenever records arrive, from the running (or given) loop."""
        self._loop = loop or asyncio.get_running_loop()
        self._loop.add_reader(self.epoll_fd, self.consume)

    def detach(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.epoll_fd)
            self._loop = None

    def close(self) -> None:
        self.detach()
        if self._rb:
            lb.lib.ring_buffer__free(self._rb)
            self._rb = 0
