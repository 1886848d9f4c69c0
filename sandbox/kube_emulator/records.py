"""What the emulator tells a test afterwards: the client's writes and the controllers'
transitions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WriteRecord:
    """One mutating request (POST/PUT/PATCH/DELETE) a client made, and how it was answered."""

    at: float  # time.time() when the request arrived
    method: str
    path: str  # without the query string
    kind: str  # "Deployment"; "" when the path named no known resource
    namespace: str | None
    name: str | None
    subresource: str | None  # "scale", "status", ...
    body: Any  # the parsed JSON body, or None
    status: int  # the HTTP status answered
    dry_run: bool = False  # `?dryRun=All`: answered, nothing stored


@dataclass(frozen=True)
class HistoryEvent:
    """A controller transition, stamped with the time it was written."""

    at: float
    kind: str
    namespace: str | None
    name: str
    what: str  # "RolloutComplete", "ProgressDeadlineExceeded", "JobComplete", ...


@dataclass(frozen=True)
class AccessRecord:
    """One request as Kubernetes RBAC sees it (its request attributes), for checking a
    Role against what clients really asked for. Kept for the emulator's whole life."""

    group: str | None  # "" for the core API; None for a non-resource URL (discovery)
    resource: str  # "deployments"; the URL path for a non-resource URL ("/apis")
    subresource: str  # "scale", "status", "log"; "" when none
    verb: str  # get, list, watch, create, update, patch, delete, deletecollection
    namespace: str | None  # None: cluster-scoped (or all namespaces)
    user_agent: str = ""  # who asked: the runbooks' client says `complianceagent-runbooks/…`


def rbac_verb(method: str, named: bool, watch: bool) -> str:
    """The RBAC verb of an HTTP request on a resource (Kubernetes' request info)."""
    if method == "GET":
        return "watch" if watch else ("get" if named else "list")
    if method == "DELETE":
        return "delete" if named else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())
