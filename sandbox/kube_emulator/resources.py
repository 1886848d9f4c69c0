"""The resource registry and the small pieces every layer shares: API errors, timestamps,
Go durations and selectors."""

from __future__ import annotations

import datetime as dt
import http
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

JSON = dict[str, Any]


@dataclass(frozen=True)
class ResourceType:
    """One REST resource: where it lives in the URL space and what it supports."""

    group: str  # "" for the core API
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    subresources: frozenset[str] = frozenset()
    custom: bool = False  # a CRD: no strategic merge patch, like the real API server

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """`deployments.apps`: the name the API server uses in its messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources


def _rt(group: str, version: str, plural: str, kind: str, *subs: str, **kw: Any) -> ResourceType:
    return ResourceType(group, version, plural, kind, subresources=frozenset(subs), **kw)


NAMESPACES = _rt("", "v1", "namespaces", "Namespace", "status", namespaced=False)
PODS = _rt("", "v1", "pods", "Pod", "status", "log")
SECRETS = _rt("", "v1", "secrets", "Secret")
CONFIGMAPS = _rt("", "v1", "configmaps", "ConfigMap")
SERVICES = _rt("", "v1", "services", "Service", "status")
DEPLOYMENTS = _rt("apps", "v1", "deployments", "Deployment", "status", "scale")
REPLICASETS = _rt("apps", "v1", "replicasets", "ReplicaSet", "status", "scale")
STATEFULSETS = _rt("apps", "v1", "statefulsets", "StatefulSet", "status", "scale")
JOBS = _rt("batch", "v1", "jobs", "Job", "status")
HPAS = _rt("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", "status")
CERT_MANAGER = "cert-manager.io"
CERTIFICATES = _rt(CERT_MANAGER, "v1", "certificates", "Certificate", "status", custom=True)
CERTIFICATE_REQUESTS = _rt(
    CERT_MANAGER, "v1", "certificaterequests", "CertificateRequest", "status", custom=True
)

REGISTRY: tuple[ResourceType, ...] = (
    NAMESPACES,
    PODS,
    SECRETS,
    CONFIGMAPS,
    SERVICES,
    _rt("", "v1", "serviceaccounts", "ServiceAccount"),
    _rt("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", "status"),
    _rt("", "v1", "events", "Event"),
    _rt("", "v1", "nodes", "Node", "status", namespaced=False),
    DEPLOYMENTS,
    REPLICASETS,
    STATEFULSETS,
    _rt("apps", "v1", "daemonsets", "DaemonSet", "status"),
    JOBS,
    _rt("batch", "v1", "cronjobs", "CronJob", "status"),
    HPAS,
    _rt("networking.k8s.io", "v1", "ingresses", "Ingress", "status"),
    CERTIFICATES,
    CERTIFICATE_REQUESTS,
    _rt(CERT_MANAGER, "v1", "issuers", "Issuer", "status", custom=True),
    _rt(CERT_MANAGER, "v1", "clusterissuers", "ClusterIssuer", namespaced=False, custom=True),
)


def find_type(api_version: str, kind_or_plural: str) -> ResourceType | None:
    """Look a type up by apiVersion and Kind (or plural, for convenience)."""
    for rt in REGISTRY:
        if rt.api_version == api_version and kind_or_plural in (rt.kind, rt.plural):
            return rt
    return None


def group_versions() -> dict[str, list[ResourceType]]:
    """Types by group/version, in registry order: what discovery serves."""
    result: dict[str, list[ResourceType]] = {}
    for rt in REGISTRY:
        result.setdefault(rt.api_version, []).append(rt)
    return result


# --- errors: the API server's `Status` answers --------------------------------------------


class ApiError(Exception):
    """An error answer; `status_body()` is the JSON `Status` the API server would send."""

    def __init__(self, code: int, reason: str, message: str, details: JSON | None = None) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status_body(self) -> JSON:
        body: JSON = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _details(rt: ResourceType, name: str) -> JSON:
    return {"name": name, "group": rt.group, "kind": rt.plural}


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rt.key} "{name}" not found', _details(rt, name))


def already_exists(rt: ResourceType, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f'{rt.key} "{name}" already exists', _details(rt, name))


def conflict(rt: ResourceType, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {rt.key} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        _details(rt, name),
    )


def invalid(rt: ResourceType, name: str, message: str) -> ApiError:
    return ApiError(422, "Invalid", f'{rt.kind} "{name}" is invalid: {message}', _details(rt, name))


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def error_for_status(code: int, message: str = "") -> ApiError:
    """A plausible `Status` for an arbitrary code (used by fault injection)."""
    reasons = {
        400: "BadRequest",
        401: "Unauthorized",
        403: "Forbidden",
        404: "NotFound",
        409: "Conflict",
        410: "Expired",
        422: "Invalid",
        429: "TooManyRequests",
        500: "InternalError",
        503: "ServiceUnavailable",
        504: "Timeout",
    }
    try:
        phrase = http.HTTPStatus(code).phrase
    except ValueError:
        phrase = "Error"
    return ApiError(code, reasons.get(code, phrase.replace(" ", "")), message or phrase)


# --- time -----------------------------------------------------------------------------------


def rfc3339(at: float | None = None) -> str:
    """Seconds-precision UTC with a Z, as the API server writes timestamps."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if at is None else at))


def parse_rfc3339(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string such as `2160h` or `1h30m0s`."""
    parts = _GO_DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise ValueError(f"not a Go duration: {text!r}")
    return sum(float(n) * _GO_UNITS[u] for n, u in parts)


# --- selectors -------------------------------------------------------------------------------

Matcher = Callable[[JSON], bool]

_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_EXISTS = re.compile(rf"^(!?)\s*({_KEY})$")
_EQUALITY = re.compile(rf"^({_KEY})\s*(==|=|!=)\s*([-A-Za-z0-9_.]*)$")
_SET = re.compile(rf"^({_KEY})\s+(in|notin)\s*\(([^)]*)\)$")


def _split_requirements(text: str) -> list[str]:
    """Split on the commas that separate requirements, not those inside `in (a,b)`."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _label_requirement(text: str) -> Callable[[dict[str, str]], bool]:
    if m := _SET.match(text):
        key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if m := _EQUALITY.match(text):
        key, op, value = m.groups()
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if m := _EXISTS.match(text):
        negated, key = m.groups()
        return (lambda labels: key not in labels) if negated else (lambda labels: key in labels)
    raise bad_request(f"unable to parse requirement: {text!r}")


def label_matcher(selector: str | None) -> Matcher:
    """`a=b,c!=d,e in (x,y),f,!g` as a predicate over objects."""
    requirements = [_label_requirement(r) for r in _split_requirements(selector or "")]

    def matches(obj: JSON) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(req(labels) for req in requirements)

    return matches


def _field_value(obj: JSON, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def field_matcher(selector: str | None) -> Matcher:
    """`metadata.name=x,status.phase!=Running`: any dotted path, compared as text."""
    checks: list[tuple[str, bool, str]] = []
    for requirement in _split_requirements(selector or ""):
        m = re.match(r"^([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*)$", requirement)
        if not m:
            raise bad_request(f"invalid field selector: {requirement!r}")
        checks.append((m.group(1), m.group(2) != "!=", m.group(3).strip()))

    def matches(obj: JSON) -> bool:
        return all((_field_value(obj, path) == value) == equal for path, equal, value in checks)

    return matches


def selector_string(selector: JSON | None) -> str:
    """A `LabelSelector` object rendered as the text form (for `Scale.status.selector`)."""
    selector = selector or {}
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op in ("In", "NotIn"):
            parts.append(f"{key} {op.lower()} ({','.join(values)})")
        elif op == "Exists":
            parts.append(key)
        else:
            parts.append(f"!{key}")
    return ",".join(parts)
