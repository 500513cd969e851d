"""The few protobuf bodies kubectl sends: its built-in generators (``kubectl create
namespace``) write Kubernetes' protobuf encoding (``application/vnd.kubernetes.protobuf``)
where ``-f`` files go as JSON.

The encoding: the magic ``k8s\\0``, then a ``runtime.Unknown`` message (typeMeta, raw
bytes of the object's own message). Decoded here: Namespace, with the ObjectMeta fields
a client sets (name, generateName, labels, annotations). Any other kind is refused with
a message saying how to send it instead.
"""

from __future__ import annotations

from typing import Any

from fakekube.store import ApiError

Obj = dict[str, Any]
MAGIC = b"k8s\x00"


def _unsupported(what: str) -> ApiError:
    return ApiError(
        415,
        "UnsupportedMediaType",
        f"this API server reads protobuf bodies of Namespaces only, not {what}: "
        "write the object in a file and use kubectl create -f or kubectl apply -f",
    )


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ApiError(400, "BadRequest", "truncated protobuf body")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """A message's (field number, value): varints as int, length-delimited as bytes."""
    out: list[tuple[int, int | bytes]] = []
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
            out.append((number, value))
        elif wire == 2:
            length, at = _varint(data, at)
            if at + length > len(data):
                raise ApiError(400, "BadRequest", "truncated protobuf body")
            out.append((number, data[at : at + length]))
            at += length
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
        else:
            raise ApiError(400, "BadRequest", f"unsupported protobuf wire type {wire}")
    return out


def _text(value: int | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _string_map(entries: list[int | bytes]) -> dict[str, str]:
    out = {}
    for entry in entries:
        if isinstance(entry, bytes):
            kv = dict(fields(entry))
            out[_text(kv.get(1, b""))] = _text(kv.get(2, b""))
    return out


def object_meta(data: bytes) -> Obj:
    meta: Obj = {}
    parsed = fields(data)
    for number, key in ((1, "name"), (2, "generateName"), (3, "namespace")):
        for n, value in parsed:
            if n == number and value:
                meta[key] = _text(value)
    for number, key in ((11, "labels"), (12, "annotations")):
        entries = [v for n, v in parsed if n == number]
        if entries:
            meta[key] = _string_map(entries)
    return meta


def decode(body: bytes) -> Obj:
    """The JSON form of a protobuf-encoded object (ApiError 415 for a kind not read)."""
    if not body.startswith(MAGIC):
        raise ApiError(400, "BadRequest", "a protobuf body starts with k8s\\0")
    unknown = dict(fields(body[len(MAGIC) :]))
    head = unknown.get(1)
    type_meta = dict(fields(head)) if isinstance(head, bytes) else {}
    api_version, kind = _text(type_meta.get(1, b"")), _text(type_meta.get(2, b""))
    raw = unknown.get(2, b"")
    if (api_version, kind) != ("v1", "Namespace") or not isinstance(raw, bytes):
        raise _unsupported(f"{kind or 'this kind'} ({api_version or 'no apiVersion'})")
    obj: Obj = {"apiVersion": "v1", "kind": "Namespace", "metadata": {}}
    for number, value in fields(raw):
        if number == 1 and isinstance(value, bytes):
            obj["metadata"] = object_meta(value)
    return obj
