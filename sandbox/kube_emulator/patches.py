"""The three PATCH flavours the API server speaks: strategic merge, JSON merge (RFC 7386)
and JSON patch (RFC 6902). Each returns a new document and never changes its inputs."""

from __future__ import annotations

import copy
from typing import Any

# Strategic merge merges these lists item by item on a key, as the Kubernetes types'
# `patchMergeKey` tags say; every other list is replaced whole.
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",  # the real key: two mounts may share a volume name
    "imagePullSecrets": "name",
    "conditions": "type",
    "hostAliases": "ip",
    "ownerReferences": "uid",
}
# Lists of scalars that strategic merge unions instead of replacing.
PRIMITIVE_MERGE_LISTS = {"finalizers"}


class PatchError(ValueError):
    """The patch cannot be applied (a failed `test`, a missing path, a malformed body)."""


def _strip_directives(value: Any) -> Any:
    """A patch fragment as plain data: no `$patch`-style keys, no nulls inside new maps."""
    if isinstance(value, dict):
        return {
            k: _strip_directives(v)
            for k, v in value.items()
            if not k.startswith("$") and v is not None
        }
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def _merge_key(field: str, items: list[Any]) -> str | None:
    if field == "ports":  # container ports merge on containerPort, service ports on port
        keys = {k for item in items if isinstance(item, dict) for k in item}
        return "containerPort" if "containerPort" in keys else "port"
    return MERGE_KEYS.get(field)


def _merge_list(field: str, original: Any, patch: list[Any]) -> list[Any]:
    if any(isinstance(i, dict) and i.get("$patch") == "replace" for i in patch):
        return [
            _strip_directives(i)
            for i in patch
            if not (isinstance(i, dict) and i.get("$patch") == "replace")
        ]
    original = original if isinstance(original, list) else []
    if field in PRIMITIVE_MERGE_LISTS:
        return copy.deepcopy(original) + [v for v in patch if v not in original]
    key = _merge_key(field, patch)
    if key is None:
        return _strip_directives(patch)
    result = copy.deepcopy(original)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            result.append(_strip_directives(item))
            continue
        index = next(
            (i for i, o in enumerate(result) if isinstance(o, dict) and o.get(key) == item[key]),
            None,
        )
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
        elif index is None:
            result.append(_strip_directives(item))
        else:
            result[index] = strategic_merge(result[index], item)
    return result


def strategic_merge(original: Any, patch: Any) -> Any:
    """Apply a strategic merge patch: maps merge, keyed lists merge item by item, `null`
    deletes, `$patch: delete|replace` and `$deleteFromPrimitiveList/` are honoured."""
    if not isinstance(patch, dict):
        return _strip_directives(patch)
    if patch.get("$patch") == "replace":
        return _strip_directives(patch)
    result = copy.deepcopy(original) if isinstance(original, dict) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [v for v in result.get(field) or [] if v not in (value or [])]
        elif key.startswith("$"):
            continue  # $setElementOrder/..., $retainKeys: ordering hints we can ignore
        elif value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            if value.get("$patch") == "delete":
                result.pop(key, None)
            else:
                result[key] = strategic_merge(result.get(key), value)
        elif isinstance(value, list):
            result[key] = _merge_list(key, result.get(key), value)
        else:
            result[key] = value
    return result


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: maps merge recursively, `null` deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _parent(doc: Any, tokens: list[str], path: str) -> Any:
    node = doc
    for token in tokens[:-1]:
        try:
            node = node[int(token)] if isinstance(node, list) else node[token]
        except (KeyError, IndexError, ValueError, TypeError):
            raise PatchError(f"path {path!r} does not exist") from None
    return node


def _index(container: list[Any], token: str, path: str, *, insert: bool) -> int:
    if insert and token == "-":
        return len(container)
    try:
        index = int(token)
    except ValueError:
        raise PatchError(f"invalid list index in {path!r}") from None
    if not 0 <= index <= len(container) - (0 if insert else 1):
        raise PatchError(f"list index out of range in {path!r}")
    return index


def _get(doc: Any, path: str) -> Any:
    tokens = _pointer(path)
    if not tokens:
        return doc
    container, last = _parent(doc, tokens, path), tokens[-1]
    if isinstance(container, list):
        return container[_index(container, last, path, insert=False)]
    if not isinstance(container, dict) or last not in container:
        raise PatchError(f"path {path!r} does not exist")
    return container[last]


def _remove(doc: Any, path: str) -> Any:
    tokens = _pointer(path)
    if not tokens:
        raise PatchError("cannot remove the whole document")
    container, last = _parent(doc, tokens, path), tokens[-1]
    if isinstance(container, list):
        return container.pop(_index(container, last, path, insert=False))
    if not isinstance(container, dict) or last not in container:
        raise PatchError(f"path {path!r} does not exist")
    return container.pop(last)


def _add(doc: Any, path: str, value: Any, *, replace: bool = False) -> Any:
    tokens = _pointer(path)
    if not tokens:
        return value
    container, last = _parent(doc, tokens, path), tokens[-1]
    if isinstance(container, list):
        if replace:
            container[_index(container, last, path, insert=False)] = value
        else:
            container.insert(_index(container, last, path, insert=True), value)
    elif isinstance(container, dict):
        if replace and last not in container:
            raise PatchError(f"path {path!r} does not exist")
        container[last] = value
    else:
        raise PatchError(f"path {path!r} does not exist")
    return doc


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902: add, remove, replace, move, copy and test, applied in order."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations")
    result = copy.deepcopy(doc)
    for op in operations:
        if not isinstance(op, dict) or "path" not in op:
            raise PatchError(f"malformed operation {op!r}")
        kind, path = op.get("op"), op["path"]
        if kind in ("add", "replace", "test") and "value" not in op:
            raise PatchError(f"operation {kind} on {path!r} needs a value")
        if kind == "add":
            result = _add(result, path, copy.deepcopy(op["value"]))
        elif kind == "replace":
            result = _add(result, path, copy.deepcopy(op["value"]), replace=True)
        elif kind == "remove":
            _remove(result, path)
        elif kind == "move":
            result = _add(result, path, _remove(result, op["from"]))
        elif kind == "copy":
            result = _add(result, path, copy.deepcopy(_get(result, op["from"])))
        elif kind == "test":
            if _get(result, path) != op["value"]:
                raise PatchError(f"test failed: {path!r} is not {op['value']!r}")
        else:
            raise PatchError(f"unknown operation {kind!r}")
    return result
