"""Open and load BPF objects, reusing pinned maps; programs by fd, pin or id.

libbpf's own messages (including the verifier log of a failed load) are routed to
structlog, and the messages of a failed load are attached to the raised error.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import structlog

from bpf import _libbpf as lb
from bpf.errors import BpfError
from bpf.maps import Map

log = structlog.get_logger("bpf.libbpf")

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.vsnprintf.restype = ctypes.c_int
_LIBC.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]

_LEVELS = {0: "warning", 1: "info", 2: "debug"}  # enum libbpf_print_level
_capture = threading.local()


def _on_libbpf_print(level: int, fmt: bytes | None, args: int | None) -> int:
    buf = ctypes.create_string_buffer(4096)
    _LIBC.vsnprintf(buf, len(buf), fmt, args)
    text = buf.value.decode(errors="replace").rstrip("\n")
    lines: list[str] | None = getattr(_capture, "lines", None)
    if lines is not None:
        lines.append(text)
    if level == 0:
        log.warning("libbpf", message=text)
    return 0


_PRINT_CB = lb.PRINT_FN(_on_libbpf_print)  # kept referenced for the process lifetime
lb.lib.libbpf_set_print(_PRINT_CB)


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    tag: str
    map_ids: tuple[int, ...]
    verified_insns: int = 0  # instructions the verifier processed at load (0: unknown)
    run_time_ns: int = 0  # time spent running, while run-time statistics are on
    run_cnt: int = 0  # runs counted while they are on


def prog_info(fd: int, what: str = "program") -> ProgInfo:
    info = lb.BpfProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    lb.check(
        lb.lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
        f"{what}: get info",
    )
    ids = (ctypes.c_uint32 * info.nr_map_ids)()
    if info.nr_map_ids:
        again = lb.BpfProgInfo(nr_map_ids=info.nr_map_ids, map_ids=ctypes.addressof(ids))
        size = ctypes.c_uint32(ctypes.sizeof(again))
        lb.check(
            lb.lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(again), ctypes.byref(size)),
            f"{what}: get map ids",
        )
    return ProgInfo(
        id=info.id,
        type=info.type,
        name=info.name.decode(errors="replace"),
        tag=bytes(info.tag).hex(),
        map_ids=tuple(ids),
        verified_insns=info.verified_insns,
        run_time_ns=info.run_time_ns,
        run_cnt=info.run_cnt,
    )


class Program:
    """A loaded program held by file descriptor."""

    def __init__(self, fd: int, *, name: str | None = None) -> None:
        self.fd = fd
        self.info = prog_info(fd, f"program fd {fd}")
        self.name = name or self.info.name
        self.id = self.info.id

    @classmethod
    def from_pin(cls, path: str) -> Program:
        fd = lb.check(lb.lib.bpf_obj_get(path.encode()), f"open pinned program {path}")
        return cls(fd)

    @classmethod
    def from_id(cls, prog_id: int) -> Program:
        fd = lb.check(lb.lib.bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}")
        return cls(fd)

    def pin(self, path: str) -> None:
        """Pin at ``path``, atomically replacing whatever is pinned there."""
        tmp = f"{path}_new"  # bpffs rejects names containing a dot
        if os.path.exists(tmp):
            os.unlink(tmp)
        lb.check(lb.lib.bpf_obj_pin(self.fd, tmp.encode()), f"pin program {self.name} at {tmp}")
        os.replace(tmp, path)

    def test_run(self, data: bytes, *, ifindex: int = 0, repeat: int = 1) -> TestRun:
        """Run the program on one packet (``BPF_PROG_TEST_RUN``), as if it arrived on
        ``ifindex`` (0: loopback). Map side effects happen as with real traffic."""
        ctx = _SkbCtx(ifindex=ifindex)
        out = ctypes.create_string_buffer(len(data) + 256)
        inp = ctypes.create_string_buffer(data, len(data))
        opts = lb.BpfTestRunOpts(
            sz=ctypes.sizeof(lb.BpfTestRunOpts),
            data_in=ctypes.addressof(inp),
            data_size_in=len(data),
            data_out=ctypes.addressof(out),
            data_size_out=len(out),
            ctx_in=ctypes.addressof(ctx),
            ctx_size_in=ctypes.sizeof(ctx),
            repeat=repeat,
        )
        lb.check(
            lb.lib.bpf_prog_test_run_opts(self.fd, ctypes.byref(opts)),
            f"program {self.name}: test run",
        )
        return TestRun(
            retval=opts.retval, duration_ns=opts.duration, data=out.raw[: opts.data_size_out]
        )

    def run_syscall(self, ctx: ctypes.Array[ctypes.c_char]) -> int:
        """Run a ``syscall`` program once with ``ctx`` as its context; the kernel writes
        the context back (the program's results). Returns the program's return value."""
        opts = lb.BpfTestRunOpts(
            sz=ctypes.sizeof(lb.BpfTestRunOpts),
            ctx_in=ctypes.addressof(ctx),
            ctx_size_in=len(ctx),
        )
        lb.check(
            lb.lib.bpf_prog_test_run_opts(self.fd, ctypes.byref(opts)),
            f"program {self.name}: run",
        )
        return int(opts.retval)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"<Program {self.name} id={self.id} fd={self.fd}>"


_BPF_STATS_RUN_TIME = 0  # enum bpf_stats_type


@contextmanager
def run_time_statistics() -> Iterator[None]:
    """The kernel counts every program's runs and their time (``ProgInfo.run_cnt``,
    ``run_time_ns``) while this is held; it costs each run two clock reads."""
    fd = lb.check(lb.lib.bpf_enable_stats(_BPF_STATS_RUN_TIME), "enable run-time statistics")
    try:
        yield
    finally:
        os.close(fd)


class _SkbCtx(ctypes.Structure):
    """Prefix of ``struct __sk_buff`` up to ``ifindex``: the kernel accepts a shorter
    context for test runs as long as the fields it does not allow to be set are zero."""

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class TestRun:
    retval: int
    duration_ns: int
    data: bytes


def object_names(path: str) -> tuple[list[str], list[str]]:
    """Map and program names of an object file, read without loading it into the kernel."""
    opts = lb.BpfObjectOpenOpts(sz=ctypes.sizeof(lb.BpfObjectOpenOpts))
    obj = lb.check_ptr(
        lb.lib.bpf_object__open_file(path.encode(), ctypes.byref(opts)), f"open BPF object {path}"
    )
    try:
        maps: list[str] = []
        m = lb.lib.bpf_object__next_map(obj, None)
        while m:
            maps.append(lb.lib.bpf_map__name(m).decode())
            m = lb.lib.bpf_object__next_map(obj, m)
        progs: list[str] = []
        p = lb.lib.bpf_object__next_program(obj, None)
        while p:
            progs.append(lb.lib.bpf_program__name(p).decode())
            p = lb.lib.bpf_object__next_program(obj, p)
        return maps, progs
    finally:
        lb.lib.bpf_object__close(obj)


class BpfObject:
    """A loaded object file: its maps and programs by name.

    Maps declared with ``LIBBPF_PIN_BY_NAME`` are pinned under ``map_pin_dir``; when a
    pin already exists libbpf reuses that map (it must match type, sizes and flags, or
    the load fails naming the map). File descriptors are duplicated out of libbpf, so the
    object can be closed while the maps and programs stay usable.
    """

    def __init__(self, path: str, maps: dict[str, Map], programs: dict[str, Program]) -> None:
        self.path = path
        self.maps = maps
        self.programs = programs

    @classmethod
    def load(
        cls,
        path: str,
        *,
        map_pin_dir: str | None = None,
        max_entries: Mapping[str, int] | None = None,
    ) -> BpfObject:
        if not os.path.exists(path):
            raise BpfError(2, f"open BPF object {path}")
        if map_pin_dir is not None:
            os.makedirs(map_pin_dir, mode=0o700, exist_ok=True)
        opts = lb.BpfObjectOpenOpts(
            sz=ctypes.sizeof(lb.BpfObjectOpenOpts),
            pin_root_path=map_pin_dir.encode() if map_pin_dir else None,
        )
        _capture.lines = []
        try:
            obj = lb.check_ptr(
                lb.lib.bpf_object__open_file(path.encode(), ctypes.byref(opts)),
                f"open BPF object {path}",
            )
            try:
                return cls._load_open(path, obj, dict(max_entries or {}))
            finally:
                lb.lib.bpf_object__close(obj)
        except BpfError as exc:
            detail = "\n".join(_capture.lines[-40:])
            raise BpfError(exc.errno or 1, exc.what, detail) from None
        finally:
            _capture.lines = None

    @classmethod
    def _load_open(cls, path: str, obj: int, sizes: dict[str, int]) -> BpfObject:
        handles: dict[str, int] = {}
        m = lb.lib.bpf_object__next_map(obj, None)
        while m:
            handles[lb.lib.bpf_map__name(m).decode()] = m
            m = lb.lib.bpf_object__next_map(obj, m)
        for name, size in sizes.items():
            if name not in handles:
                raise BpfError(2, f"{path}: no map named {name}")
            lb.check(
                lb.lib.bpf_map__set_max_entries(handles[name], size),
                f"map {name}: set max_entries {size}",
            )
        lb.check(lb.lib.bpf_object__load(obj), f"load BPF object {path}")

        maps: dict[str, Map] = {}
        for name, handle in handles.items():
            if name.startswith("."):  # .rodata/.bss style internal maps
                continue
            fd = lb.check(lb.lib.bpf_map__fd(handle), f"map {name}: fd")
            maps[name] = Map(os.dup(fd), name=name)
        programs: dict[str, Program] = {}
        p = lb.lib.bpf_object__next_program(obj, None)
        while p:
            name = lb.lib.bpf_program__name(p).decode()
            fd = lb.check(lb.lib.bpf_program__fd(p), f"program {name}: fd")
            programs[name] = Program(os.dup(fd), name=name)
            p = lb.lib.bpf_object__next_program(obj, p)
        return cls(path, maps, programs)

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        for p in self.programs.values():
            p.close()

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
