"""`GET …/pods/{name}/log` as the kubelet answers it: plain text, one line per log line,
with `container`, `tailLines`, `sinceSeconds` and `timestamps` (each line prefixed with
its RFC 3339 time in nanoseconds and a space). Not emulated: `follow` (the log so far is
returned), `previous`, `sinceTime`, `limitBytes`.

A pod's lines come from a *log source* — `(namespace, pod, container) -> [(unix ns, line)]`
or None when the source does not know the pod — such as the backend stand-in's request
logs; else from the fixed text a controller left (a Job's output), timed at the pod's start.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from .resources import JSON, ApiError, bad_request, parse_rfc3339

LogEntry = tuple[int, str]  # (unix time in nanoseconds, the line without its newline)
LogSource = Callable[[str, str, str], Sequence[LogEntry] | None]

_TRUE = frozenset({"1", "t", "true"})  # Go's strconv.ParseBool, as the API server reads it


def rfc3339_nano(unix_ns: int) -> str:
    """Go's RFC3339Nano: UTC, the fraction without trailing zeros."""
    seconds, nanos = divmod(unix_ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    fraction = f"{nanos:09d}".rstrip("0")
    return f"{stamp}{'.' + fraction if fraction else ''}Z"


def _int_option(query: dict[str, str], name: str) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise bad_request(f'strconv.ParseInt: parsing "{raw}": invalid syntax') from None


def container_of(pod: JSON, query: dict[str, str]) -> str:
    """The container asked for, or the pod's only one; the API server's refusals otherwise."""
    name = pod["metadata"]["name"]
    names = [c["name"] for c in (pod.get("spec") or {}).get("containers") or []]
    wanted = query.get("container") or ""
    if not wanted:
        if len(names) == 1:
            return names[0]
        raise bad_request(
            f"a container name must be specified for pod {name}, choose one of: [{' '.join(names)}]"
        )
    if wanted not in names:
        raise bad_request(f"container {wanted} is not valid for pod {name}")
    return wanted


def render_log(
    pod: JSON,
    query: dict[str, str],
    sources: Sequence[LogSource],
    fixed_text: str | None,
    now_ns: int | None = None,
) -> str:
    """The body of the log request for `pod`, with the query's options applied."""
    name = pod["metadata"]["name"]
    tail, since = _int_option(query, "tailLines"), _int_option(query, "sinceSeconds")
    if tail is not None and tail < 0:
        raise invalid_log(name, f"tailLines: Invalid value: {tail}: must be >= 0")
    if since is not None and since < 1:
        raise invalid_log(name, f"sinceSeconds: Invalid value: {since}: must be greater than 0")
    container = container_of(pod, query)
    entries = _entries(pod, container, sources, fixed_text)
    if since is not None:
        cutoff = (now_ns if now_ns is not None else time.time_ns()) - since * 1_000_000_000
        entries = [e for e in entries if e[0] >= cutoff]
    if tail is not None:
        entries = entries[len(entries) - tail :] if tail else []
    stamped = query.get("timestamps", "").lower() in _TRUE
    return "".join(
        f"{rfc3339_nano(at)} {line}\n" if stamped else f"{line}\n" for at, line in entries
    )


def invalid_log(name: str, message: str) -> ApiError:
    """What the API server answers to log options that fail validation (422)."""
    details = {"name": name, "group": "", "kind": "PodLogOptions"}
    return ApiError(422, "Invalid", f'PodLogOptions "{name}" is invalid: {message}', details)


def _entries(
    pod: JSON, container: str, sources: Sequence[LogSource], fixed_text: str | None
) -> list[LogEntry]:
    ns, name = pod["metadata"].get("namespace", ""), pod["metadata"]["name"]
    for source in sources:
        found = source(ns, name, container)
        if found is not None:
            return list(found)
    if not fixed_text:
        return []
    status = pod.get("status") or {}
    started = status.get("startTime") or pod["metadata"].get("creationTimestamp")
    at = int(parse_rfc3339(started) * 1_000_000_000) if started else time.time_ns()
    return [(at, line) for line in fixed_text.splitlines()]
