"""ctypes declarations for the system libbpf (``libbpf.so.1``).

This is the only module in the project that loads libbpf. Everything else goes through the
typed wrappers in :mod:`bpf.maps`, :mod:`bpf.objects`, :mod:`bpf.ringbuf` and :mod:`bpf.btf`.

libbpf >= 1.0 reports failures as a negative errno return value (or NULL for pointers) *and*
sets ``errno``; :func:`check` turns both forms into :class:`bpf.errors.BpfError`.

The ``*_opts`` structures below mirror libbpf 1.1's public headers. libbpf accepts any ``sz``
up to the size it knows, so passing these from a newer libbpf is forward compatible.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

from bpf.errors import BpfError, LibbpfMissingError

LIBBPF_SONAME = "libbpf.so.1"


def _load() -> ctypes.CDLL:
    try:
        return ctypes.CDLL(LIBBPF_SONAME, use_errno=True)
    except OSError as exc:
        raise LibbpfMissingError(
            f"cannot load {LIBBPF_SONAME}: {exc}; install the libbpf1 package"
        ) from exc


lib = _load()

c_int = ctypes.c_int
c_uint = ctypes.c_uint32
c_u64 = ctypes.c_uint64
c_size = ctypes.c_size_t
c_ptr = ctypes.c_void_p
c_str = ctypes.c_char_p


class BpfObjectOpenOpts(ctypes.Structure):
    _fields_ = [
        ("sz", c_size),
        ("object_name", c_str),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", c_str),
        ("_attach_prog_fd", c_uint),
        ("kconfig", c_str),
        ("btf_custom_path", c_str),
        ("kernel_log_buf", c_ptr),
        ("kernel_log_size", c_size),
        ("kernel_log_level", c_uint),
    ]


class BpfMapCreateOpts(ctypes.Structure):
    _fields_ = [
        ("sz", c_size),
        ("btf_fd", c_uint),
        ("btf_key_type_id", c_uint),
        ("btf_value_type_id", c_uint),
        ("btf_vmlinux_value_type_id", c_uint),
        ("inner_map_fd", c_uint),
        ("map_flags", c_uint),
        ("map_extra", c_u64),
        ("numa_node", c_uint),
        ("map_ifindex", c_uint),
    ]


class BpfMapBatchOpts(ctypes.Structure):
    _fields_ = [("sz", c_size), ("elem_flags", c_u64), ("flags", c_u64)]


class BpfTestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", c_size),
        ("data_in", c_ptr),
        ("data_out", c_ptr),
        ("data_size_in", c_uint),
        ("data_size_out", c_uint),
        ("ctx_in", c_ptr),
        ("ctx_out", c_ptr),
        ("ctx_size_in", c_uint),
        ("ctx_size_out", c_uint),
        ("retval", c_uint),
        ("repeat", c_int),
        ("duration", c_uint),
        ("flags", c_uint),
        ("cpu", c_uint),
        ("batch_size", c_uint),
    ]


class BpfMapInfo(ctypes.Structure):
    """Prefix of the kernel's ``struct bpf_map_info`` (uapi); the kernel fills what fits."""

    _fields_ = [
        ("type", c_uint),
        ("id", c_uint),
        ("key_size", c_uint),
        ("value_size", c_uint),
        ("max_entries", c_uint),
        ("map_flags", c_uint),
        ("name", ctypes.c_char * 16),
        ("ifindex", c_uint),
        ("btf_vmlinux_value_type_id", c_uint),
        ("netns_dev", c_u64),
        ("netns_ino", c_u64),
        ("btf_id", c_uint),
        ("btf_key_type_id", c_uint),
        ("btf_value_type_id", c_uint),
        ("_pad", c_uint),
        ("map_extra", c_u64),
    ]


class BpfProgInfo(ctypes.Structure):
    """Prefix of the kernel's ``struct bpf_prog_info`` (uapi) up to ``verified_insns``
    (Linux 5.16; older kernels leave it 0)."""

    _fields_ = [
        ("type", c_uint),
        ("id", c_uint),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", c_uint),
        ("xlated_prog_len", c_uint),
        ("jited_prog_insns", c_u64),
        ("xlated_prog_insns", c_u64),
        ("load_time", c_u64),
        ("created_by_uid", c_uint),
        ("nr_map_ids", c_uint),
        ("map_ids", c_u64),
        ("name", ctypes.c_char * 16),
        ("ifindex", c_uint),
        ("gpl_compatible", c_uint),
        ("netns_dev", c_u64),
        ("netns_ino", c_u64),
        ("nr_jited_ksyms", c_uint),
        ("nr_jited_func_lens", c_uint),
        ("jited_ksyms", c_u64),
        ("jited_func_lens", c_u64),
        ("btf_id", c_uint),
        ("func_info_rec_size", c_uint),
        ("func_info", c_u64),
        ("nr_func_info", c_uint),
        ("nr_line_info", c_uint),
        ("line_info", c_u64),
        ("jited_line_info", c_u64),
        ("nr_jited_line_info", c_uint),
        ("line_info_rec_size", c_uint),
        ("jited_line_info_rec_size", c_uint),
        ("nr_prog_tags", c_uint),
        ("prog_tags", c_u64),
        ("run_time_ns", c_u64),
        ("run_cnt", c_u64),
        ("recursion_misses", c_u64),
        ("verified_insns", c_uint),
        ("attach_btf_obj_id", c_uint),
        ("attach_btf_id", c_uint),
    ]


PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_str, c_ptr)
RING_SAMPLE_FN = ctypes.CFUNCTYPE(c_int, c_ptr, c_ptr, c_size)


def _proto(name: str, restype: Any, *argtypes: Any) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


_proto("libbpf_set_print", c_ptr, PRINT_FN)
_proto("libbpf_num_possible_cpus", c_int)
_proto("bpf_object__open_file", c_ptr, c_str, ctypes.POINTER(BpfObjectOpenOpts))
_proto("bpf_object__load", c_int, c_ptr)
_proto("bpf_object__close", None, c_ptr)
_proto("bpf_object__next_map", c_ptr, c_ptr, c_ptr)
_proto("bpf_object__next_program", c_ptr, c_ptr, c_ptr)
_proto("bpf_map__name", c_str, c_ptr)
_proto("bpf_map__fd", c_int, c_ptr)
_proto("bpf_map__set_max_entries", c_int, c_ptr, c_uint)
_proto("bpf_map__max_entries", c_uint, c_ptr)
_proto("bpf_map__set_pin_path", c_int, c_ptr, c_str)
_proto("bpf_map__pin_path", c_str, c_ptr)
_proto("bpf_program__name", c_str, c_ptr)
_proto("bpf_program__fd", c_int, c_ptr)

_proto("bpf_obj_pin", c_int, c_int, c_str)
_proto("bpf_obj_get", c_int, c_str)
_proto("bpf_obj_get_info_by_fd", c_int, c_int, c_ptr, ctypes.POINTER(c_uint))
_proto("bpf_map_get_fd_by_id", c_int, c_uint)
_proto("bpf_prog_get_fd_by_id", c_int, c_uint)
_proto("bpf_enable_stats", c_int, c_int)  # enum bpf_stats_type; the fd holds it on
_proto("bpf_map_get_next_id", c_int, c_uint, ctypes.POINTER(c_uint))
_proto("bpf_prog_get_next_id", c_int, c_uint, ctypes.POINTER(c_uint))
_proto(
    "bpf_map_create",
    c_int,
    c_int,
    c_str,
    c_uint,
    c_uint,
    c_uint,
    ctypes.POINTER(BpfMapCreateOpts),
)
_proto("bpf_map_lookup_elem", c_int, c_int, c_ptr, c_ptr)
_proto("bpf_map_update_elem", c_int, c_int, c_ptr, c_ptr, c_u64)
_proto("bpf_map_delete_elem", c_int, c_int, c_ptr)
_proto("bpf_map_lookup_and_delete_elem", c_int, c_int, c_ptr, c_ptr)
_proto("bpf_map_get_next_key", c_int, c_int, c_ptr, c_ptr)
_BATCH_ARGS = (c_int, c_ptr, c_ptr, c_ptr, c_ptr, ctypes.POINTER(c_uint))
_proto("bpf_map_lookup_batch", c_int, *_BATCH_ARGS, ctypes.POINTER(BpfMapBatchOpts))
_proto("bpf_map_lookup_and_delete_batch", c_int, *_BATCH_ARGS, ctypes.POINTER(BpfMapBatchOpts))
_proto(
    "bpf_map_update_batch",
    c_int,
    c_int,
    c_ptr,
    c_ptr,
    ctypes.POINTER(c_uint),
    ctypes.POINTER(BpfMapBatchOpts),
)
_proto(
    "bpf_map_delete_batch",
    c_int,
    c_int,
    c_ptr,
    ctypes.POINTER(c_uint),
    ctypes.POINTER(BpfMapBatchOpts),
)
_proto("bpf_prog_test_run_opts", c_int, c_int, ctypes.POINTER(BpfTestRunOpts))

_proto("ring_buffer__new", c_ptr, c_int, RING_SAMPLE_FN, c_ptr, c_ptr)
_proto("ring_buffer__free", None, c_ptr)
_proto("ring_buffer__consume", c_int, c_ptr)
_proto("ring_buffer__poll", c_int, c_ptr, c_int)
_proto("ring_buffer__epoll_fd", c_int, c_ptr)

_proto("btf__parse_elf", c_ptr, c_str, c_ptr)
_proto("btf__free", None, c_ptr)
_proto("btf__type_cnt", c_uint, c_ptr)
_proto("btf__type_by_id", c_ptr, c_ptr, c_uint)
_proto("btf__name_by_offset", c_str, c_ptr, c_uint)
_proto("btf__resolve_size", ctypes.c_int64, c_ptr, c_uint)
_proto("btf__find_by_name_kind", ctypes.c_int32, c_ptr, c_str, c_uint)


def last_errno(ret: int | None = None) -> int:
    """The errno of the last libbpf failure (from a negative return or from ``errno``)."""
    if ret is not None and ret < 0:
        return -ret
    return ctypes.get_errno() or 1


def check(ret: int, what: str) -> int:
    """Raise :class:`BpfError` naming ``what`` if a libbpf int return signals failure."""
    if ret < 0:
        raise BpfError(last_errno(ret), what)
    return ret


def check_ptr(ptr: int | None, what: str) -> int:
    """Raise :class:`BpfError` naming ``what`` if a libbpf pointer return is NULL."""
    if not ptr:
        raise BpfError(last_errno(), what)
    return ptr
