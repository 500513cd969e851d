"""The patch types kubectl sends, applied as the API server applies them, for the fields of
the kinds served here:

- JSON merge patch (RFC 7386; ``kubectl apply`` and ``label`` on custom resources) is
  the store's own (:meth:`fakekube.store.Store.patch`);
- strategic merge patch (the same on built-in kinds): a merge patch where lists with a
  merge key (containers by ``name``, ports by ``containerPort`` or ``port``, ...) merge
  element by element, with the ``$patch``, ``$retainKeys``, ``$deleteFromPrimitiveList``
  and ``$setElementOrder`` directives;
- JSON patch (RFC 6902; ``kubectl patch --type=json``);
- server-side apply (``kubectl apply --server-side``): the applied configuration merged
  in, and the fields the same manager applied last time but no longer applies removed.
  Each manager's fields are kept in ``metadata.managedFields`` (``FieldsV1``); conflicts
  between managers are not detected (as with ``--force-conflicts``).
"""

from __future__ import annotations

import copy
from typing import Any

from fakekube.store import ApiError

Obj = dict[str, Any]

# list field -> the key its elements merge by (the built-in types' patchMergeKey)
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "imagePullSecrets": "name",
    "volumeMounts": "mountPath",
    "ports": ("containerPort", "port"),
}


def _invalid(message: str) -> ApiError:
    return ApiError(422, "Invalid", message)


def _merge_key(field: str, items: list[Any]) -> str | None:
    keys = MERGE_KEYS.get(field)
    if keys is None:
        return None
    for key in (keys,) if isinstance(keys, str) else keys:
        if any(isinstance(i, dict) and key in i for i in items):
            return key
    return None


def strategic_merge(target: Any, patch: Any) -> Any:
    """Strategic merge patch of ``target`` (a copy is returned)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    patch = dict(patch)
    directive = patch.pop("$patch", None)
    if directive == "replace":
        return strategic_merge(None, patch)
    if directive == "delete":
        return None
    retain = patch.pop("$retainKeys", None)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if k.startswith("$setElementOrder/"):
            continue  # an order only: the merged lists keep the patch's order anyway
        if k.startswith("$deleteFromPrimitiveList/"):
            field = k.split("/", 1)[1]
            if isinstance(out.get(field), list) and isinstance(v, list):
                out[field] = [x for x in out[field] if x not in v]
            continue
        if v is None:
            out.pop(k, None)
        elif isinstance(v, list) and isinstance(out.get(k), list):
            out[k] = _merge_list(k, out[k], v)
        else:
            merged = strategic_merge(out.get(k), v)
            if merged is None:
                out.pop(k, None)
            else:
                out[k] = merged
    if isinstance(retain, list):
        out = {k: v for k, v in out.items() if k in retain}
    return out


def _merge_list(field: str, current: list[Any], patch: list[Any]) -> list[Any]:
    key = _merge_key(field, [*current, *patch])
    if key is None:
        return [strategic_merge(None, x) if isinstance(x, dict) else x for x in patch]
    out = [copy.deepcopy(x) for x in current]
    for item in patch:
        if not isinstance(item, dict):
            continue
        at = next(
            (i for i, x in enumerate(out) if isinstance(x, dict) and x.get(key) == item.get(key)),
            None,
        )
        if item.get("$patch") == "delete":
            if at is not None:
                del out[at]
        elif at is None:
            out.append(strategic_merge(None, item))
        else:
            out[at] = strategic_merge(out[at], item)
    return out


def json_patch(target: Obj, ops: Any) -> Obj:
    """JSON patch (RFC 6902): add, remove, replace, test, copy and move."""
    if not isinstance(ops, list):
        raise ApiError(400, "BadRequest", "a JSON patch is a list of operations")
    doc: Any = copy.deepcopy(target)
    for op in ops:
        if not isinstance(op, dict) or not isinstance(op.get("path"), str):
            raise ApiError(400, "BadRequest", f"invalid JSON patch operation: {op!r}")
        kind, path = op.get("op"), op["path"]
        if kind in ("copy", "move"):
            value = _pointer_get(doc, str(op.get("from", "")))
            if kind == "move":
                doc = _pointer_set(doc, str(op.get("from", "")), None, remove=True)
            doc = _pointer_set(doc, path, copy.deepcopy(value), insert=True)
        elif kind == "test":
            if _pointer_get(doc, path) != op.get("value"):
                raise _invalid(f"the test of {path} failed")
        elif kind in ("add", "replace", "remove"):
            if kind != "add":
                _pointer_get(doc, path)  # must exist
            doc = _pointer_set(
                doc, path, op.get("value"), remove=kind == "remove", insert=kind == "add"
            )
        else:
            raise ApiError(400, "BadRequest", f"unknown JSON patch operation {kind!r}")
    if not isinstance(doc, dict):
        raise _invalid("the patched object is not an object")
    return doc


def _tokens(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(400, "BadRequest", f"invalid JSON pointer {path!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _pointer_get(doc: Any, path: str) -> Any:
    return _walk(doc, _tokens(path), path)


def _walk(doc: Any, tokens: list[str], path: str) -> Any:
    at = doc
    for t in tokens:
        if isinstance(at, dict) and t in at:
            at = at[t]
        elif isinstance(at, list) and t.isdigit() and int(t) < len(at):
            at = at[int(t)]
        else:
            raise _invalid(f"{path}: no such path in the object")
    return at


def _pointer_set(
    doc: Any, path: str, value: Any, *, remove: bool = False, insert: bool = False
) -> Any:
    tokens = _tokens(path)
    if not tokens:
        return value
    parent = _walk(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict):
        if remove:
            parent.pop(last, None)
        else:
            parent[last] = copy.deepcopy(value)
    elif isinstance(parent, list):
        index = len(parent) if last == "-" else int(last) if last.isdigit() else -1
        if not 0 <= index <= len(parent) or (not insert and index == len(parent)):
            raise _invalid(f"{path}: index out of range")
        if remove:
            del parent[index]
        elif insert:
            parent.insert(index, copy.deepcopy(value))
        else:
            parent[index] = copy.deepcopy(value)
    else:
        raise _invalid(f"{path}: the parent is not an object or a list")
    return doc


# ---- server-side apply -------------------------------------------------------------------
def field_set(obj: Any) -> Obj:
    """The fields of an applied configuration in FieldsV1 form (``{"f:spec": {...}}``);
    a list or a scalar is one field."""
    if not isinstance(obj, dict):
        return {}
    return {f"f:{k}": field_set(v) for k, v in obj.items() if k not in ("apiVersion", "kind")}


def _drop(obj: Obj, gone: Obj, keep: Obj) -> None:
    """Remove from ``obj`` the fields in ``gone`` that are not in ``keep``."""
    for fk, sub in gone.items():
        key = fk[2:]
        if key not in obj:
            continue
        if fk not in keep:
            del obj[key]
        elif sub and isinstance(obj[key], dict):
            _drop(obj[key], sub, keep[fk])


def server_side_apply(current: Obj | None, applied: Obj, manager: str) -> Obj:
    """The object after ``manager`` applies ``applied`` to ``current`` (None: absent)."""
    if not isinstance(applied, dict):
        raise ApiError(400, "BadRequest", "an applied configuration is an object")
    fields = field_set({k: v for k, v in applied.items() if k != "status"})
    meta_fields = fields.get("f:metadata", {})
    for skip in ("f:resourceVersion", "f:managedFields", "f:uid", "f:creationTimestamp"):
        meta_fields.pop(skip, None)
    out = copy.deepcopy(current) if current is not None else {}
    managed = [
        m for m in ((out.get("metadata") or {}).get("managedFields") or []) if isinstance(m, dict)
    ]
    previous = next(
        (m for m in managed if m.get("manager") == manager and m.get("operation") == "Apply"),
        None,
    )
    out = dict(strategic_merge(out, {k: v for k, v in applied.items() if k != "status"}))
    if previous is not None:
        _drop(out, previous.get("fieldsV1") or {}, fields)
    entry = {
        "manager": manager,
        "operation": "Apply",
        "apiVersion": applied.get("apiVersion", ""),
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    }
    others = [m for m in managed if m is not previous]
    out.setdefault("metadata", {})["managedFields"] = [*others, entry]
    return out
