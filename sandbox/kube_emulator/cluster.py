"""The object store: every object, the global resourceVersion counter and the watch event
log. Every change (a client's, a seed's or a controller's) goes through `Cluster`, which
applies defaults, validates, bumps `generation` on spec changes and tells the observers
(the controllers)."""

from __future__ import annotations

import builtins
import copy
import random
import re
import string
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .resources import (
    DEPLOYMENTS,
    HPAS,
    JOBS,
    JSON,
    NAMESPACES,
    PODS,
    REGISTRY,
    REPLICASETS,
    SECRETS,
    STATEFULSETS,
    ApiError,
    ResourceType,
    already_exists,
    conflict,
    invalid,
    not_found,
    rfc3339,
)

# (type, old, new, seeded): old is None on create, new is None on delete.
Observer = Callable[[ResourceType, JSON | None, JSON | None, bool], None]

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_WORKLOADS = (DEPLOYMENTS, REPLICASETS, STATEFULSETS)


@dataclass(frozen=True)
class WatchEvent:
    rv: int
    type_key: str
    type: str  # ADDED | MODIFIED | DELETED
    obj: JSON  # never mutated once logged


def random_suffix(length: int = 5) -> str:
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=length))


class Cluster:
    """Objects by type, namespace and name, behind one re-entrant lock."""

    def __init__(self, event_log_size: int = 5000) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # watchers wait on this
        self.observers: list[Observer] = []
        # Called on a new object before it is stored, like an admission webhook.
        self.admitters: list[Callable[[ResourceType, JSON], None]] = []
        self._objects: dict[str, dict[tuple[str, str], JSON]] = {rt.key: {} for rt in REGISTRY}
        self._rv = 0
        self._events: deque[WatchEvent] = deque(maxlen=event_log_size)
        self._expired_rv = 0  # events up to this resourceVersion have left the log

    @property
    def resource_version(self) -> int:
        return self._rv

    # --- reads: always deep copies, so nobody can change a stored object in place ----------

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> JSON | None:
        with self.lock:
            obj = self._objects[rt.key].get((namespace or "", name))
            return copy.deepcopy(obj) if obj is not None else None

    def require(self, rt: ResourceType, namespace: str | None, name: str) -> JSON:
        obj = self.get(rt, namespace, name)
        if obj is None:
            raise not_found(rt, name)
        return obj

    def list(self, rt: ResourceType, namespace: str | None = None) -> list[JSON]:
        with self.lock:
            items = sorted(self._objects[rt.key].items())
            return [copy.deepcopy(o) for (ns, _), o in items if namespace in (None, ns)]

    def events_since(self, rv: int) -> builtins.list[WatchEvent]:
        """Events after `rv`; 410 Expired when some of them have left the log."""
        with self.lock:
            if rv < self._expired_rv:
                raise ApiError(
                    410, "Expired", f"too old resource version: {rv} ({self._expired_rv})"
                )
            return [e for e in self._events if e.rv > rv]

    # --- writes -------------------------------------------------------------------------

    def create(
        self, rt: ResourceType, obj: JSON, *, seeded: bool = False, dry_run: bool = False
    ) -> JSON:
        """Store a new object. A seed may bring its own uid and creationTimestamp.
        `dry_run` answers what would be stored, and stores nothing."""
        with self.lock:
            obj = copy.deepcopy(obj)
            obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
            meta = obj.setdefault("metadata", {})
            if rt.namespaced:
                meta["namespace"] = meta.get("namespace") or "default"
            else:
                meta.pop("namespace", None)
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = self._generate_name(rt, meta)
            name = meta.get("name") or ""
            if not name:
                raise invalid(
                    rt, "", "metadata.name: Required value: name or generateName is required"
                )
            if (meta.get("namespace", ""), name) in self._objects[rt.key]:
                raise already_exists(rt, name)
            if not (seeded and meta.get("uid")):
                meta["uid"] = str(uuid.uuid4())
            if not (seeded and meta.get("creationTimestamp")):
                meta["creationTimestamp"] = rfc3339()
            meta["generation"] = 1
            for managed in ("resourceVersion", "deletionTimestamp", "selfLink", "managedFields"):
                meta.pop(managed, None)
            if rt is JOBS:
                _label_job(obj)
            apply_defaults(rt, obj)
            for admit in self.admitters:
                admit(rt, obj)
            validate(rt, None, obj)
            if dry_run:
                return obj
            stored = self._store(rt, obj, "ADDED")
            self._notify(rt, None, stored, seeded)
            return copy.deepcopy(stored)

    def update(self, rt: ResourceType, obj: JSON, *, dry_run: bool = False) -> JSON:
        """Replace a stored object. A stale `metadata.resourceVersion` is a 409 Conflict;
        none at all means "whatever is there". An update that changes nothing is a no-op."""
        with self.lock:
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            name = meta.get("name") or ""
            old = self._objects[rt.key].get((meta.get("namespace") or "", name))
            if old is None:
                raise not_found(rt, name)
            if meta.get("resourceVersion") not in (None, "", old["metadata"]["resourceVersion"]):
                raise conflict(rt, name)
            obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
            for fixed in ("uid", "creationTimestamp", "generation", "resourceVersion"):
                meta[fixed] = old["metadata"][fixed]
            if rt.namespaced:
                meta["namespace"] = old["metadata"]["namespace"]
            apply_defaults(rt, obj)
            validate(rt, old, obj)
            if obj.get("spec") != old.get("spec"):
                meta["generation"] = old["metadata"]["generation"] + 1
            if obj == old:
                return copy.deepcopy(old)
            if dry_run:
                return obj
            stored = self._store(rt, obj, "MODIFIED")
            self._notify(rt, old, stored, False)
            return copy.deepcopy(stored)

    def delete(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        propagation: str = "Background",
        *,
        dry_run: bool = False,
    ) -> JSON:
        """Remove an object at once (no finalizers), then its dependents unless orphaned."""
        with self.lock:
            old = self._objects[rt.key].get((namespace or "", name))
            if old is None:
                raise not_found(rt, name)
            if dry_run:
                return copy.deepcopy(old)
            del self._objects[rt.key][(namespace or "", name)]
            self._rv += 1
            final = copy.deepcopy(old)
            final["metadata"]["resourceVersion"] = str(self._rv)
            self._log(WatchEvent(self._rv, rt.key, "DELETED", final))
            self._notify(rt, old, None, False)
            self._collect_dependents(rt, old, propagation)
            return copy.deepcopy(final)

    # --- internals ------------------------------------------------------------------------

    def _generate_name(self, rt: ResourceType, meta: JSON) -> str:
        while True:
            name = f"{meta['generateName']}{random_suffix()}"
            if (meta.get("namespace", ""), name) not in self._objects[rt.key]:
                return name

    def _store(self, rt: ResourceType, obj: JSON, event_type: str) -> JSON:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        meta = obj["metadata"]
        self._objects[rt.key][(meta.get("namespace", ""), meta["name"])] = obj
        self._log(WatchEvent(self._rv, rt.key, event_type, obj))
        return obj

    def _log(self, event: WatchEvent) -> None:
        if len(self._events) == self._events.maxlen:
            self._expired_rv = self._events[0].rv
        self._events.append(event)
        self.changed.notify_all()

    def _notify(self, rt: ResourceType, old: JSON | None, new: JSON | None, seeded: bool) -> None:
        for observer in self.observers:
            observer(rt, copy.deepcopy(old), copy.deepcopy(new), seeded)

    def _collect_dependents(self, rt: ResourceType, owner: JSON, propagation: str) -> None:
        """The garbage collector, done synchronously: delete (or orphan) what `owner` owned;
        a deleted Namespace takes everything in it along."""
        uid = owner["metadata"]["uid"]
        for dep_rt in REGISTRY:
            for (ns, dep_name), dep in list(self._objects[dep_rt.key].items()):
                if (ns, dep_name) not in self._objects[dep_rt.key]:
                    continue  # already collected through another owner
                if rt is NAMESPACES and dep_rt.namespaced and ns == owner["metadata"]["name"]:
                    self.delete(dep_rt, ns, dep_name)
                    continue
                refs = dep["metadata"].get("ownerReferences") or []
                if not any(r.get("uid") == uid for r in refs):
                    continue
                if propagation == "Orphan":
                    orphan = copy.deepcopy(dep)
                    orphan["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
                    self.update(dep_rt, orphan)
                else:
                    self.delete(dep_rt, ns, dep_name)


def _label_job(job: JSON) -> None:
    """What the API server adds to a new Job: a selector on its uid, and matching labels."""
    meta, spec = job["metadata"], job.setdefault("spec", {})
    labels = {
        "batch.kubernetes.io/controller-uid": meta["uid"],
        "batch.kubernetes.io/job-name": meta["name"],
        "controller-uid": meta["uid"],
        "job-name": meta["name"],
    }
    if not spec.get("manualSelector"):
        spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": meta["uid"]}}
    template_meta = spec.setdefault("template", {}).setdefault("metadata", {})
    template_meta["labels"] = {**(template_meta.get("labels") or {}), **labels}


def apply_defaults(rt: ResourceType, obj: JSON) -> None:
    """The defaults the API server fills in on every write (the ones flows look at), and
    the status fields the typed client models require."""
    spec = obj.get("spec")
    if rt is DEPLOYMENTS and isinstance(spec, dict):
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        strategy = spec.setdefault("strategy", {"type": "RollingUpdate"})
        if strategy.get("type", "RollingUpdate") == "RollingUpdate":
            strategy["type"] = "RollingUpdate"
            strategy.setdefault("rollingUpdate", {"maxUnavailable": "25%", "maxSurge": "25%"})
    elif rt in (REPLICASETS, STATEFULSETS) and isinstance(spec, dict):
        spec.setdefault("replicas", 1)
    elif rt is JOBS and isinstance(spec, dict):
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completions", 1)
        spec.setdefault("parallelism", 1)
    elif rt is SECRETS:
        obj.setdefault("type", "Opaque")
    elif rt is NAMESPACES:
        obj.setdefault("spec", {"finalizers": ["kubernetes"]})
        obj.setdefault("status", {"phase": "Active"})
    elif rt is PODS:
        obj.setdefault("status", {"phase": "Pending"})
    # The typed client models require these whenever a status is present at all.
    status = obj.get("status")
    if isinstance(status, dict) and rt in (REPLICASETS, STATEFULSETS):
        status.setdefault("replicas", 0)
    elif isinstance(status, dict) and rt is HPAS:
        status.setdefault("desiredReplicas", 0)


def _validate_pod_spec(rt: ResourceType, name: str, spec: JSON | None, path: str) -> None:
    containers = (spec or {}).get("containers") or []
    if not containers:
        raise invalid(rt, name, f"{path}.containers: Required value")
    for i, container in enumerate(containers + (spec or {}).get("initContainers", [])):
        for field in ("name", "image"):
            if not container.get(field):
                raise invalid(rt, name, f"{path}.containers[{i}].{field}: Required value")


def validate(rt: ResourceType, old: JSON | None, new: JSON) -> None:
    """The checks a flow could plausibly trip over, with the API server's wording."""
    name = new["metadata"].get("name", "")
    if not _NAME.match(name):
        raise invalid(
            rt,
            name,
            f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain must '
            "consist of lower case alphanumeric characters, '-' or '.'",
        )
    spec = new.get("spec") or {}
    if rt is PODS:
        _validate_pod_spec(rt, name, spec, "spec")
    elif rt in _WORKLOADS or rt is JOBS:
        template = spec.get("template")
        if not template:
            raise invalid(rt, name, "spec.template: Required value")
        _validate_pod_spec(rt, name, template.get("spec"), "spec.template.spec")
    if rt in _WORKLOADS:
        selector = spec.get("selector")
        if not selector:
            raise invalid(rt, name, "spec.selector: Required value")
        labels = (spec["template"].get("metadata") or {}).get("labels") or {}
        wanted = selector.get("matchLabels") or {}
        if any(labels.get(k) != v for k, v in wanted.items()):
            raise invalid(
                rt,
                name,
                "spec.template.metadata.labels: Invalid value: "
                f"{labels}: `selector` does not match template `labels`",
            )
        if old is not None and old["spec"].get("selector") != selector:
            raise invalid(rt, name, f"spec.selector: Invalid value: {selector}: field is immutable")
    if rt is JOBS:
        restart = (spec["template"].get("spec") or {}).get("restartPolicy")
        if restart not in ("Never", "OnFailure"):
            raise invalid(
                rt,
                name,
                f'spec.template.spec.restartPolicy: Unsupported value: "{restart}": '
                'supported values: "OnFailure", "Never"',
            )
        if old is not None and old["spec"].get("template") != spec.get("template"):
            raise invalid(rt, name, "spec.template: Invalid value: field is immutable")
