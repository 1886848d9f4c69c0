"""The REST layer: URL routing, verbs, subresources, watches, fault injection and the write
log. It knows HTTP only as (method, path, content type, body) in and `Response` out, so
`server.py` stays a thin socket wrapper."""

from __future__ import annotations

import copy
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .cluster import Cluster
from .controllers import Controllers
from .patches import PatchError, json_patch, merge_patch, strategic_merge
from .pod_logs import render_log
from .records import AccessRecord, WriteRecord, rbac_verb
from .resources import (
    JOBS,
    JSON,
    PODS,
    ApiError,
    ResourceType,
    bad_request,
    conflict,
    error_for_status,
    field_matcher,
    group_versions,
    invalid,
    label_matcher,
    selector_string,
)

logger = logging.getLogger(__name__)

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_WATCH_SECONDS = 1800.0


@dataclass
class Response:
    status: int
    body: Any  # JSON-able, or text for `text/plain`
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    def payload(self) -> bytes:
        if self.content_type.startswith("text/"):
            return str(self.body).encode()
        return json.dumps(self.body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class WatchPlan:
    """A watch to stream: which objects, from which resourceVersion, for how long."""

    rt: ResourceType
    namespace: str | None
    label_selector: str | None
    field_selector: str | None
    since: int | None  # None: first an ADDED event for each object that exists now
    timeout: float


@dataclass(frozen=True)
class Route:
    rt: ResourceType | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None
    discovery: JSON | None = None  # set for the discovery endpoints


@dataclass
class Fault:
    method: str
    pattern: re.Pattern[str]
    status: int
    remaining: int
    retry_after: int | None


def _not_routed() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource")


def _discovery(parts: list[str]) -> JSON | None:
    """The discovery documents: enough for clients that look before they call."""
    groups = group_versions()
    if parts == ["version"]:
        return {
            "major": "1",
            "minor": "31",
            "gitVersion": "v1.31.0-emulated",
            "gitCommit": "emulated",
            "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "go1.22.0",
            "compiler": "gc",
            "platform": "linux/amd64",
        }
    if parts == ["api"]:
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
        }

    def group_doc(name: str) -> JSON:
        versions = [
            {"groupVersion": gv, "version": gv.split("/")[1]}
            for gv in groups
            if gv.split("/")[0] == name and "/" in gv
        ]
        return {"name": name, "versions": versions, "preferredVersion": versions[0]}

    names = sorted({gv.split("/")[0] for gv in groups if "/" in gv})
    if parts == ["apis"]:
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group_doc(n) for n in names]}
    if len(parts) == 2 and parts[0] == "apis" and parts[1] in names:
        return {"kind": "APIGroup", "apiVersion": "v1", **group_doc(parts[1])}
    return None


def _api_resource(name: str, singular: str, namespaced: bool, kind: str, verbs: list[str]) -> JSON:
    return {
        "name": name,
        "singularName": singular,
        "namespaced": namespaced,
        "kind": kind,
        "verbs": verbs,
    }


def _resource_list(group_version: str, types: list[ResourceType]) -> JSON:
    verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
    resources: list[JSON] = []
    for rt in types:
        singular = rt.kind.lower()
        resources.append(_api_resource(rt.plural, singular, rt.namespaced, rt.kind, verbs))
        for sub in sorted(rt.subresources):
            kind = {"scale": "Scale", "log": "Pod"}.get(sub, rt.kind)
            sub_verbs = ["get"] if sub == "log" else ["get", "patch", "update"]
            resources.append(
                _api_resource(f"{rt.plural}/{sub}", "", rt.namespaced, kind, sub_verbs)
            )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }


def parse_route(path: str) -> Route:
    parts = [p for p in path.split("/") if p]
    doc = _discovery(parts)
    if doc is not None:
        return Route(discovery=doc)
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise _not_routed()
    group_version = f"{group}/{version}" if group else version
    types = group_versions().get(group_version)
    if not types:
        raise _not_routed()
    if not rest:
        return Route(discovery=_resource_list(group_version, types))
    by_plural = {rt.plural: rt for rt in types}
    namespaced = len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in by_plural
    if namespaced and by_plural[rest[2]].namespaced:
        namespace, rt, tail = rest[1], by_plural[rest[2]], rest[3:]
    elif rest[0] in by_plural:
        namespace, rt, tail = None, by_plural[rest[0]], rest[1:]
    else:
        raise _not_routed()
    if len(tail) > 2 or (len(tail) == 2 and tail[1] not in rt.subresources):
        raise _not_routed()
    if rt.namespaced and namespace is None and tail:
        raise _not_routed()  # a named namespaced object needs its namespace
    return Route(rt, namespace, tail[0] if tail else None, tail[1] if len(tail) == 2 else None)


def scale_of(obj: JSON) -> JSON:
    """The `autoscaling/v1` Scale view of a Deployment, ReplicaSet or StatefulSet."""
    meta, spec = obj["metadata"], obj.get("spec") or {}
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            k: meta[k]
            for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
            if k in meta
        },
        "spec": {"replicas": spec.get("replicas", 0)},
        "status": {
            "replicas": (obj.get("status") or {}).get("replicas", 0),
            "selector": selector_string(spec.get("selector")),
        },
    }


def _access_of(
    method: str, path: str, query: dict[str, str], user_agent: str
) -> AccessRecord | None:
    """The RBAC request attributes of a request; None for a path no API serves."""
    try:
        route = parse_route(path)
    except ApiError:
        return None
    if route.discovery is not None or route.rt is None:
        return AccessRecord(None, path.rstrip("/") or "/", "", method.lower(), None, user_agent)
    watch = query.get("watch", "").lower() in ("true", "1")
    return AccessRecord(
        route.rt.group,
        route.rt.plural,
        route.subresource or "",
        rbac_verb(method, route.name is not None, watch),
        route.namespace,
        user_agent,
    )


class RestApi:
    """Routes a request to the cluster and records what clients wrote."""

    def __init__(self, cluster: Cluster, controllers: Controllers) -> None:
        self.cluster = cluster
        self.controllers = controllers
        self.writes: list[WriteRecord] = []
        # Every request as RBAC would see it, never cleared (the RBAC test reads it at the
        # end of the session).
        self.accesses: Counter[AccessRecord] = Counter()
        self.faults: list[Fault] = []
        self.stopped = threading.Event()

    # --- entry point ---------------------------------------------------------------------

    def handle(
        self, method: str, target: str, content_type: str, raw_body: bytes, user_agent: str = ""
    ) -> Response | WatchPlan:
        arrived = time.time()
        split = urlsplit(target)
        path = split.path
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        with self.cluster.lock:
            access = _access_of(method, path, query, user_agent)
            if access is not None:
                self.accesses[access] += 1
            fault = self._take_fault(method, path)
            if fault is not None:  # before any effect, and not a write
                return fault
            body: Any = None
            route = Route()
            try:
                if raw_body.strip():
                    try:
                        body = json.loads(raw_body)
                    except ValueError:
                        raise bad_request("the request body is not valid JSON") from None
                route = parse_route(path)
                result = self._dispatch(method, route, query, content_type, body)
            except ApiError as error:
                result = Response(error.code, error.status_body())
            except Exception as exc:  # an emulator bug: answer it rather than drop the socket
                logger.exception("kube emulator failed on %s %s", method, path)
                result = Response(
                    500, error_for_status(500, f"emulator error: {exc!r}").status_body()
                )
            if method in WRITE_METHODS and isinstance(result, Response):
                self._record(arrived, method, path, query, route, body, result)
            return result

    def _take_fault(self, method: str, path: str) -> Response | None:
        for fault in self.faults:
            if fault.method in (method, "*") and fault.pattern.search(path):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self.faults.remove(fault)
                error = error_for_status(fault.status, f"injected fault on {method} {path}")
                headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after else {}
                return Response(fault.status, error.status_body(), headers=headers)
        return None

    def _record(
        self,
        arrived: float,
        method: str,
        path: str,
        query: dict[str, str],
        route: Route,
        body: Any,
        result: Response,
    ) -> None:
        name = route.name
        if name is None and method == "POST":
            source = result.body if result.status == 201 else body
            if isinstance(source, dict):
                name = (source.get("metadata") or {}).get("name")
        self.writes.append(
            WriteRecord(
                at=arrived,
                method=method,
                path=path,
                kind=route.rt.kind if route.rt else "",
                namespace=route.namespace,
                name=name,
                subresource=route.subresource,
                body=copy.deepcopy(body),
                status=result.status,
                dry_run="dryRun" in query,
            )
        )

    def _dispatch(
        self, method: str, route: Route, query: dict[str, str], content_type: str, body: Any
    ) -> Response | WatchPlan:
        if route.discovery is not None:
            if method != "GET":
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")
            return Response(200, route.discovery)
        rt = route.rt
        assert rt is not None
        dry_run = "dryRun" in query
        if method == "GET":
            if route.name is None:
                return self._list_or_watch(rt, route.namespace, query)
            obj = self.cluster.require(rt, route.namespace, route.name)
            if route.subresource == "scale":
                return Response(200, scale_of(obj))
            if route.subresource == "log":
                return self._log(obj, query)
            return Response(200, obj)
        if method == "POST" and route.name is None and (route.namespace or not rt.namespaced):
            return self._create(rt, route.namespace, body, dry_run)
        if method == "DELETE" and route.name is None:
            return self._delete_collection(rt, route.namespace, query, dry_run)
        if route.name is not None and route.subresource != "log":
            if method == "PUT":
                return self._replace(route, body, dry_run)
            if method == "PATCH":
                return self._patch(route, content_type, body, dry_run)
            if method == "DELETE" and route.subresource is None:
                return self._delete(route, query, body, dry_run)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on this resource")

    # --- reads ---------------------------------------------------------------------------

    def _list_or_watch(
        self, rt: ResourceType, namespace: str | None, query: dict[str, str]
    ) -> Response | WatchPlan:
        label_selector, field_selector = query.get("labelSelector"), query.get("fieldSelector")
        by_label, by_field = label_matcher(label_selector), field_matcher(field_selector)
        if query.get("watch", "").lower() in ("true", "1"):
            rv = query.get("resourceVersion", "")
            if rv and not rv.isdigit():
                raise bad_request(f"invalid resourceVersion {rv!r}")
            try:
                timeout = float(query.get("timeoutSeconds") or DEFAULT_WATCH_SECONDS)
            except ValueError:
                raise bad_request("invalid timeoutSeconds") from None
            since = int(rv) if rv and rv != "0" else None
            return WatchPlan(rt, namespace, label_selector, field_selector, since, timeout)
        items = [o for o in self.cluster.list(rt, namespace) if by_label(o) and by_field(o)]
        return Response(
            200,
            {
                "kind": f"{rt.kind}List",
                "apiVersion": rt.api_version,
                "metadata": {"resourceVersion": str(self.cluster.resource_version)},
                "items": items,
            },
        )

    def _log(self, pod: JSON, query: dict[str, str]) -> Response:
        key = (pod["metadata"].get("namespace", ""), pod["metadata"]["name"])
        fixed = self.controllers.pod_logs.get(key)
        text = render_log(pod, query, self.controllers.log_sources, fixed)
        return Response(200, text, content_type="text/plain")

    def watch_lines(self, plan: WatchPlan) -> Iterator[bytes]:
        """The watch stream, one JSON event per line, until the timeout or shutdown.
        A resourceVersion older than the event log is an ERROR event with a 410 Status,
        as the real API server sends it."""
        by_label, by_field = label_matcher(plan.label_selector), field_matcher(plan.field_selector)

        def wanted(obj: JSON) -> bool:
            ns = obj["metadata"].get("namespace")
            return plan.namespace in (None, ns) and by_label(obj) and by_field(obj)

        def line(kind: str, obj: JSON) -> bytes:
            return json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode()

        deadline = time.monotonic() + plan.timeout
        with self.cluster.lock:
            last = plan.since if plan.since is not None else self.cluster.resource_version
            existing = [] if plan.since is not None else self.cluster.list(plan.rt, plan.namespace)
        for obj in existing:
            if wanted(obj):
                yield line("ADDED", obj)
        while not self.stopped.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                with self.cluster.changed:
                    events = self.cluster.events_since(last)
                    if not events:
                        self.cluster.changed.wait(min(remaining, 1.0))
                        continue
            except ApiError as gone:
                yield line("ERROR", gone.status_body())
                return
            last = events[-1].rv
            for event in events:  # written outside the lock: a slow reader blocks nobody
                if event.type_key == plan.rt.key and wanted(event.obj):
                    yield line(event.type, event.obj)

    # --- writes --------------------------------------------------------------------------

    def _create(
        self, rt: ResourceType, namespace: str | None, body: Any, dry_run: bool
    ) -> Response:
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        meta = body.setdefault("metadata", {})
        if rt.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request"
                )
            meta["namespace"] = namespace
        if rt.has_status:
            body.pop("status", None)  # status is the controllers' to write
        return Response(201, self.cluster.create(rt, body, dry_run=dry_run))

    def _replace(self, route: Route, body: Any, dry_run: bool) -> Response:
        rt, name = route.rt, route.name
        assert rt is not None and name is not None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        current = self.cluster.require(rt, route.namespace, name)
        body_name = (body.get("metadata") or {}).get("name")
        if body_name and body_name != name:
            raise bad_request(
                f"the name of the object ({body_name}) does not match the name on the URL ({name})"
            )
        if route.subresource == "scale":
            return self._write_scale(rt, current, body, dry_run)
        return self._write(rt, route, current, body, dry_run)

    def _patch(self, route: Route, content_type: str, body: Any, dry_run: bool) -> Response:
        rt, name = route.rt, route.name
        assert rt is not None and name is not None
        current = self.cluster.require(rt, route.namespace, name)
        target = scale_of(current) if route.subresource == "scale" else current
        kind = content_type.split(";")[0].strip().lower()
        try:
            if kind == "application/json-patch+json":
                patched = json_patch(target, body)
            elif kind == "application/merge-patch+json":
                patched = merge_patch(target, body)
            elif kind == "application/strategic-merge-patch+json" and not rt.custom:
                patched = strategic_merge(target, body)
            else:
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown format - accepted media types "
                    f"include: application/json-patch+json, application/merge-patch+json"
                    f"{'' if rt.custom else ', application/strategic-merge-patch+json'}",
                )
        except PatchError as error:
            raise invalid(rt, name, str(error)) from None
        if not isinstance(patched, dict):
            raise invalid(rt, name, "the patch must leave an object")
        if route.subresource == "scale":
            return self._write_scale(rt, current, patched, dry_run)
        return self._write(rt, route, current, patched, dry_run)

    def _write(
        self, rt: ResourceType, route: Route, current: JSON, new: JSON, dry_run: bool
    ) -> Response:
        """Store `new` through the main resource or `/status`: each keeps the other's half,
        as the real API server does for types with a status subresource."""
        precondition = (new.get("metadata") or {}).get("resourceVersion")
        if route.subresource == "status":
            status = new.get("status")
            new = copy.deepcopy(current)
            new["status"] = status
        elif rt.has_status:
            new["status"] = current.get("status")
        if new.get("status") is None:
            new.pop("status", None)
        meta = new.setdefault("metadata", {})
        meta.update(name=current["metadata"]["name"], resourceVersion=precondition)
        if rt.namespaced:
            meta["namespace"] = current["metadata"]["namespace"]
        return Response(200, self.cluster.update(rt, new, dry_run=dry_run))

    def _write_scale(self, rt: ResourceType, current: JSON, scale: JSON, dry_run: bool) -> Response:
        name = current["metadata"]["name"]
        replicas = (scale.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise invalid(rt, name, f"spec.replicas: Invalid value: {replicas!r}")
        precondition = (scale.get("metadata") or {}).get("resourceVersion")
        if precondition not in (None, "", current["metadata"]["resourceVersion"]):
            raise conflict(rt, name)
        new = copy.deepcopy(current)
        new["spec"]["replicas"] = replicas
        return Response(200, scale_of(self.cluster.update(rt, new, dry_run=dry_run)))

    def _delete(self, route: Route, query: dict[str, str], body: Any, dry_run: bool) -> Response:
        rt, name = route.rt, route.name
        assert rt is not None and name is not None
        options = body if isinstance(body, dict) else {}
        current = self.cluster.require(rt, route.namespace, name)
        preconditions = options.get("preconditions") or {}
        for key in ("uid", "resourceVersion"):
            if preconditions.get(key) not in (None, current["metadata"][key]):
                raise conflict(rt, name)
        deleted = self.cluster.delete(
            rt, route.namespace, name, self._propagation(rt, query, options), dry_run=dry_run
        )
        if rt is PODS:  # graceful deletion answers with the object
            return Response(200, deleted)
        details = {"name": name, "group": rt.group, "kind": rt.plural}
        details["uid"] = deleted["metadata"]["uid"]
        return Response(
            200,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": details,
            },
        )

    @staticmethod
    def _propagation(rt: ResourceType, query: dict[str, str], options: JSON) -> str:
        policy = query.get("propagationPolicy") or options.get("propagationPolicy")
        orphan = query.get("orphanDependents", str(options.get("orphanDependents", ""))).lower()
        if policy:
            return str(policy)
        if orphan == "true":
            return "Orphan"
        # batch/v1 Jobs still default to orphaning their pods, as on a real API server.
        return "Orphan" if rt is JOBS else "Background"

    def _delete_collection(
        self, rt: ResourceType, namespace: str | None, query: dict[str, str], dry_run: bool
    ) -> Response:
        by_label = label_matcher(query.get("labelSelector"))
        by_field = field_matcher(query.get("fieldSelector"))
        policy = self._propagation(rt, query, {})
        deleted = [
            self.cluster.delete(
                rt,
                namespace or o["metadata"].get("namespace"),
                o["metadata"]["name"],
                policy,
                dry_run=dry_run,
            )
            for o in self.cluster.list(rt, namespace)
            if by_label(o) and by_field(o)
        ]
        return Response(
            200,
            {
                "kind": f"{rt.kind}List",
                "apiVersion": rt.api_version,
                "metadata": {"resourceVersion": str(self.cluster.resource_version)},
                "items": deleted,
            },
        )
