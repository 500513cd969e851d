"""BPF maps by file descriptor: element and batch operations, info, pinning.

:class:`Map` works on raw bytes (fast, what batch operations need); :class:`TypedMap`
adds ctypes key/value types on top for readable call sites. Every failure raises
:class:`bpf.errors.BpfError` naming the map and the operation.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from bpf import _libbpf as lb
from bpf.errors import BpfError

# enum bpf_map_type (uapi), the subset the project uses
MAP_TYPE_PERCPU_HASH = 5
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_LRU_PERCPU_HASH = 10
MAP_TYPE_LPM_TRIE = 11
MAP_TYPE_ARRAY_OF_MAPS = 12
MAP_TYPE_HASH_OF_MAPS = 13

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_F_NO_PREALLOC = 1

_PERCPU_TYPES = {MAP_TYPE_PERCPU_HASH, MAP_TYPE_PERCPU_ARRAY, MAP_TYPE_LRU_PERCPU_HASH}
_MAP_OF_MAPS = {MAP_TYPE_ARRAY_OF_MAPS, MAP_TYPE_HASH_OF_MAPS}
# Kernels answer "batch not supported for this map type" with one of these.
_NO_BATCH = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, 524}  # 524: ENOTSUPP


def possible_cpus() -> int:
    return lb.check(lb.lib.libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    name: str
    key_size: int
    value_size: int
    max_entries: int
    flags: int


def map_info(fd: int, what: str = "map") -> MapInfo:
    info = lb.BpfMapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    lb.check(
        lb.lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
        f"{what}: get info",
    )
    return MapInfo(
        id=info.id,
        type=info.type,
        name=info.name.decode(errors="replace"),
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        flags=info.map_flags,
    )


class Map:
    """An open map. Owns its file descriptor; close it (or use ``with``) when done."""

    def __init__(self, fd: int, *, name: str | None = None) -> None:
        self.fd = fd
        info = map_info(fd, f"map fd {fd}")
        self.info = info
        self.name = name or info.name
        self.id = info.id
        self.type = info.type
        self.key_size = info.key_size
        self.raw_value_size = info.value_size  # as the kernel declares it (one CPU's)
        self.max_entries = info.max_entries
        self.percpu = info.type in _PERCPU_TYPES
        self.ncpus = possible_cpus() if self.percpu else 1
        # user space sees per-CPU values as one 8-byte-aligned slot per possible CPU
        self.value_size = (
            ((info.value_size + 7) // 8) * 8 * self.ncpus if self.percpu else info.value_size
        )
        self._batch_ok: bool | None = None

    # ---- construction ----------------------------------------------------------------
    @classmethod
    def from_pin(cls, path: str) -> Map:
        fd = lb.check(lb.lib.bpf_obj_get(path.encode()), f"open pinned map {path}")
        return cls(fd, name=os.path.basename(path))

    @classmethod
    def from_id(cls, map_id: int) -> Map:
        fd = lb.check(lb.lib.bpf_map_get_fd_by_id(map_id), f"open map id {map_id}")
        return cls(fd)

    @classmethod
    def create(
        cls,
        *,
        map_type: int,
        name: str,
        key_size: int,
        value_size: int,
        max_entries: int,
        flags: int = 0,
        inner_map_fd: int = 0,
    ) -> Map:
        opts = lb.BpfMapCreateOpts(
            sz=ctypes.sizeof(lb.BpfMapCreateOpts), map_flags=flags, inner_map_fd=inner_map_fd
        )
        fd = lb.lib.bpf_map_create(
            map_type, name.encode(), key_size, value_size, max_entries, ctypes.byref(opts)
        )
        lb.check(fd, f"create map {name}")
        return cls(fd, name=name)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Map {self.name} id={self.id} fd={self.fd}>"

    def pin(self, path: str) -> None:
        lb.check(lb.lib.bpf_obj_pin(self.fd, path.encode()), f"pin map {self.name} at {path}")

    # ---- single elements ---------------------------------------------------------------
    def _key(self, key: bytes) -> ctypes.Array[ctypes.c_char]:
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key is {len(key)} bytes, expected {self.key_size}")
        return ctypes.create_string_buffer(key, len(key))

    def lookup(self, key: bytes) -> bytes | None:
        kbuf = self._key(key)
        vbuf = ctypes.create_string_buffer(self.value_size)
        if lb.lib.bpf_map_lookup_elem(self.fd, kbuf, vbuf) < 0:
            err = ctypes.get_errno()
            if err == errno.ENOENT:
                return None
            raise BpfError(err, f"map {self.name}: lookup")
        return vbuf.raw

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if len(value) != self.value_size:
            raise ValueError(
                f"map {self.name}: value is {len(value)} bytes, expected {self.value_size}"
            )
        kbuf = self._key(key)
        vbuf = ctypes.create_string_buffer(value, len(value))
        lb.check(lb.lib.bpf_map_update_elem(self.fd, kbuf, vbuf, flags), f"map {self.name}: update")

    def delete(self, key: bytes) -> bool:
        """Delete one element; False if it was not there."""
        if lb.lib.bpf_map_delete_elem(self.fd, self._key(key)) < 0:
            err = ctypes.get_errno()
            if err == errno.ENOENT:
                return False
            raise BpfError(err, f"map {self.name}: delete")
        return True

    def __iter__(self) -> Iterator[bytes]:
        return self.keys()

    def delete_unless(self, keys: Iterable[bytes], keep: Callable[[bytes], bool]) -> int:
        """For each key: take its value out (one lookup-and-delete syscall) and, if
        ``keep(value)``, put it back unless the datapath has meanwhile created the key
        anew (BPF_NOEXIST). One syscall per removed entry instead of a lookup and a
        delete; a kept entry is absent for microseconds (a packet then is judged as a
        new flow). Returns how many were deleted; keys already gone are skipped."""
        kbuf = ctypes.create_string_buffer(self.key_size)
        vbuf = ctypes.create_string_buffer(self.value_size)
        take, put = lb.lib.bpf_map_lookup_and_delete_elem, lb.lib.bpf_map_update_elem
        deleted = 0
        for key in keys:
            ctypes.memmove(kbuf, key, self.key_size)
            if take(self.fd, kbuf, vbuf) < 0:
                err = ctypes.get_errno()
                if err == errno.ENOENT:
                    continue
                raise BpfError(err, f"map {self.name}: lookup and delete")
            if not keep(vbuf.raw):
                deleted += 1
            elif put(self.fd, kbuf, vbuf, BPF_NOEXIST) < 0:
                err = ctypes.get_errno()
                if err != errno.EEXIST:
                    raise BpfError(err, f"map {self.name}: put back")
        return deleted

    def keys(self) -> Iterator[bytes]:
        """Iterate keys with get_next_key (entries changing meanwhile may be missed)."""
        cur = ctypes.create_string_buffer(self.key_size)
        nxt = ctypes.create_string_buffer(self.key_size)
        prev: ctypes.Array[ctypes.c_char] | None = None
        while True:
            if lb.lib.bpf_map_get_next_key(self.fd, prev, nxt) < 0:
                err = ctypes.get_errno()
                if err == errno.ENOENT:
                    return
                raise BpfError(err, f"map {self.name}: get next key")
            yield nxt.raw
            ctypes.memmove(cur, nxt, self.key_size)
            prev = cur

    # ---- batches ----------------------------------------------------------------------
    def _batch_opts(self, elem_flags: int = 0) -> lb.BpfMapBatchOpts:
        return lb.BpfMapBatchOpts(sz=ctypes.sizeof(lb.BpfMapBatchOpts), elem_flags=elem_flags)

    def items(self, *, chunk: int = 4096) -> list[tuple[bytes, bytes]]:
        """Every (key, value), with batch lookups where the kernel supports them."""
        if self._batch_ok is not False and self.type not in _MAP_OF_MAPS:
            try:
                return list(self._items_batched(chunk))
            except BpfError as exc:
                if exc.errno not in _NO_BATCH:
                    raise
                self._batch_ok = False
        out = []
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                out.append((key, value))
        return out

    def batches(self, *, chunk: int = 8192) -> Iterator[tuple[bytes, bytes, int]]:
        """The map as (keys, values, count) blobs of up to ``chunk`` entries, straight from
        batch lookups (no per-entry objects: for callers that slice what they need)."""
        ks, vs = self.key_size, self.value_size
        keys = ctypes.create_string_buffer(ks * chunk)
        values = ctypes.create_string_buffer(vs * chunk)
        # hash maps use a bucket cursor of 4 bytes; other types use a key-sized cursor
        token_in = ctypes.create_string_buffer(max(ks, 8))
        token_out = ctypes.create_string_buffer(max(ks, 8))
        opts = self._batch_opts()
        first = True
        while True:
            count = ctypes.c_uint32(chunk)
            rc = lb.lib.bpf_map_lookup_batch(
                self.fd,
                None if first else token_in,
                token_out,
                keys,
                values,
                ctypes.byref(count),
                ctypes.byref(opts),
            )
            err = ctypes.get_errno() if rc < 0 else 0
            if rc < 0 and err != errno.ENOENT:
                raise BpfError(err, f"map {self.name}: lookup batch")
            if count.value:
                yield keys.raw[: count.value * ks], values.raw[: count.value * vs], count.value
            if rc < 0:  # ENOENT: that was the last batch
                return
            ctypes.memmove(token_in, token_out, len(token_in))
            first = False

    def _items_batched(self, chunk: int) -> Iterator[tuple[bytes, bytes]]:
        ks, vs = self.key_size, self.value_size
        for kraw, vraw, count in self.batches(chunk=chunk):
            for i in range(count):
                yield kraw[i * ks : (i + 1) * ks], vraw[i * vs : (i + 1) * vs]
        self._batch_ok = True

    def update_batch(self, keys: bytes, values: bytes, *, elem_flags: int = BPF_ANY) -> None:
        """Write many elements (keys and values concatenated) in as few syscalls as possible."""
        ks, vs = self.key_size, self.value_size
        if len(keys) % ks or len(values) % vs or len(keys) // ks != len(values) // vs:
            raise ValueError(f"map {self.name}: batch of {len(keys)}B keys / {len(values)}B values")
        total = len(keys) // ks
        if total == 0:
            return
        if self._batch_ok is not False:
            kbuf = ctypes.create_string_buffer(keys, len(keys))
            vbuf = ctypes.create_string_buffer(values, len(values))
            done = 0
            opts = self._batch_opts(elem_flags)
            while done < total:
                count = ctypes.c_uint32(total - done)
                rc = lb.lib.bpf_map_update_batch(
                    self.fd,
                    ctypes.byref(kbuf, done * ks),
                    ctypes.byref(vbuf, done * vs),
                    ctypes.byref(count),
                    ctypes.byref(opts),
                )
                if rc < 0:
                    err = ctypes.get_errno()
                    if done == 0 and count.value == 0 and err in _NO_BATCH and not self._batch_ok:
                        self._batch_ok = False
                        break
                    raise BpfError(
                        err, f"map {self.name}: update batch at element {done + count.value}"
                    )
                self._batch_ok = True
                done += count.value
            else:
                return
        for i in range(total):
            self.update(keys[i * ks : (i + 1) * ks], values[i * vs : (i + 1) * vs], elem_flags)

    def delete_batch(self, keys: bytes) -> None:
        """Delete many elements; every key must exist."""
        ks = self.key_size
        if len(keys) % ks:
            raise ValueError(f"map {self.name}: batch of {len(keys)}B keys")
        total = len(keys) // ks
        if total == 0:
            return
        kbuf = ctypes.create_string_buffer(keys, len(keys))
        count = ctypes.c_uint32(total)
        rc = lb.lib.bpf_map_delete_batch(
            self.fd, kbuf, ctypes.byref(count), ctypes.byref(self._batch_opts())
        )
        if rc < 0:
            err = ctypes.get_errno()
            if err in _NO_BATCH and count.value == 0:
                for i in range(total):
                    self.delete(keys[i * ks : (i + 1) * ks])
                return
            raise BpfError(err, f"map {self.name}: delete batch at element {count.value}")


K = TypeVar("K", bound=ctypes._SimpleCData | ctypes.Structure)  # type: ignore[type-arg]
V = TypeVar("V", bound=ctypes._SimpleCData | ctypes.Structure)  # type: ignore[type-arg]


class TypedMap(Generic[K, V]):
    """A :class:`Map` whose keys and values are ctypes types (mirrors from bpf.layout)."""

    def __init__(self, raw: Map, key_type: type[K], value_type: type[V]) -> None:
        if ctypes.sizeof(key_type) != raw.key_size:
            raise ValueError(
                f"map {raw.name}: key {key_type.__name__} is {ctypes.sizeof(key_type)}B, "
                f"map key is {raw.key_size}B"
            )
        if ctypes.sizeof(value_type) != raw.info.value_size:
            raise ValueError(
                f"map {raw.name}: value {value_type.__name__} is {ctypes.sizeof(value_type)}B, "
                f"map value is {raw.info.value_size}B"
            )
        self.raw = raw
        self.key_type = key_type
        self.value_type = value_type

    @property
    def name(self) -> str:
        return self.raw.name

    def lookup(self, key: K) -> V | None:
        data = self.raw.lookup(bytes(key))
        return None if data is None else self._value(data)

    def _key_of(self, data: bytes) -> K:
        return cast(K, self.key_type.from_buffer_copy(data))

    def _value(self, data: bytes, offset: int = 0) -> V:
        return cast(V, self.value_type.from_buffer_copy(data, offset))

    def lookup_percpu(self, key: K) -> list[V]:
        """Per-CPU maps: one value per possible CPU."""
        data = self.raw.lookup(bytes(key))
        if data is None:
            return []
        stride = self.raw.value_size // self.raw.ncpus
        return [self._value(data, i * stride) for i in range(self.raw.ncpus)]

    def update(self, key: K, value: V, flags: int = BPF_ANY) -> None:
        self.raw.update(bytes(key), bytes(value), flags)

    def delete(self, key: K) -> bool:
        return self.raw.delete(bytes(key))

    def items(self) -> list[tuple[K, V]]:
        return [(self._key_of(k), self._value(v)) for k, v in self.raw.items()]

    def __iter__(self) -> Iterator[K]:
        return self.keys()

    def keys(self) -> Iterator[K]:
        for key in self.raw:
            yield self._key_of(key)

    def update_many(self, pairs: Iterable[tuple[K, V]]) -> None:
        keys = bytearray()
        values = bytearray()
        for k, v in pairs:
            keys += bytes(k)
            values += bytes(v)
        self.raw.update_batch(bytes(keys), bytes(values))
