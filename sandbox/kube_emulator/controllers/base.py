"""What every controller shares: the cluster, the scheduler, the history, and small helpers
for conditions, owner references and names."""

from __future__ import annotations

import copy
import hashlib
import json
import random
import string
from typing import Any

from ..cluster import Cluster
from ..records import HistoryEvent
from ..resources import JSON, ResourceType, rfc3339
from .scheduler import Scheduler

_HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the API server's "safe" alphabet


class Controller:
    """One controller: reacts to changes of its kinds and records what it did in `history`."""

    def __init__(self, cluster: Cluster, scheduler: Scheduler, history: list[HistoryEvent]) -> None:
        self.cluster = cluster
        self.scheduler = scheduler
        self.history = history

    def _record(self, obj: JSON, what: str, at: float) -> None:
        meta = obj["metadata"]
        self.history.append(
            HistoryEvent(at, obj["kind"], meta.get("namespace"), meta["name"], what)
        )

    def _write_status(self, rt: ResourceType, obj: JSON, status: JSON) -> JSON:
        obj = copy.deepcopy(obj)
        obj["status"] = status
        return self.cluster.update(rt, obj)

    def _latest(self, rt: ResourceType, ns: str, name: str, uid: str) -> JSON | None:
        obj = self.cluster.get(rt, ns, name)
        return obj if obj is not None and obj["metadata"]["uid"] == uid else None

    def _owned(self, rt: ResourceType, owner: JSON) -> list[JSON]:
        """Objects whose controller reference names `owner` (by kind and name, so seeded
        ReplicaSets with a made-up uid are adopted too)."""
        meta = owner["metadata"]
        return [
            obj
            for obj in self.cluster.list(rt, meta["namespace"])
            if any(
                r.get("kind") == owner["kind"] and r.get("name") == meta["name"]
                for r in obj["metadata"].get("ownerReferences") or []
            )
        ]


def set_condition(
    status: JSON,
    kind: str,
    value: str,
    reason: str,
    message: str,
    now: float,
    stamps: tuple[str, ...] = ("lastUpdateTime", "lastTransitionTime"),
    **extra: Any,
) -> None:
    """Set one condition; `lastTransitionTime` only moves when the status flips."""
    conditions = status.setdefault("conditions", [])
    condition: JSON = {"type": kind, "status": value, "reason": reason, "message": message}
    condition.update({stamp: rfc3339(now) for stamp in stamps}, **extra)
    for i, existing in enumerate(conditions):
        if existing.get("type") == kind:
            if existing.get("status") == value and existing.get("lastTransitionTime"):
                condition["lastTransitionTime"] = existing["lastTransitionTime"]
            conditions[i] = condition
            return
    conditions.append(condition)


def get_condition(status: JSON | None, kind: str) -> JSON | None:
    return next((c for c in (status or {}).get("conditions") or [] if c.get("type") == kind), None)


def template_hash(template: JSON) -> str:
    """A stable 10-character name suffix for a pod template, as `{deploy}-{hash}`."""
    digest = int.from_bytes(hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest())
    chars = []
    for _ in range(10):
        digest, index = divmod(digest, len(_HASH_ALPHABET))
        chars.append(_HASH_ALPHABET[index])
    return "".join(chars)


def owner_reference(owner: JSON) -> JSON:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def ns_name(obj: JSON) -> tuple[str, str]:
    return obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def random_lowercase(length: int) -> str:
    return "".join(random.choices(string.ascii_lowercase, k=length))


def running_pod(owner: JSON, now: float, *, ready_condition: bool) -> JSON:
    """A Pod of `owner`'s template (a ReplicaSet's or a Job's), scheduled and running since
    `now`: what the kubelet would report once its containers started."""
    ns, name = ns_name(owner)
    template = owner["spec"]["template"]
    spec = {**copy.deepcopy(template.get("spec") or {}), "nodeName": "emulated-node"}
    status: JSON = {"phase": "Running", "startTime": rfc3339(now)}
    if ready_condition:
        status["conditions"] = [{"type": "Ready", "status": "True"}]
    status["containerStatuses"] = [
        {
            "name": c["name"],
            "image": c["image"],
            "imageID": "",
            "ready": True,
            "restartCount": 0,
            "started": True,
            "state": {"running": {"startedAt": rfc3339(now)}},
        }
        for c in spec.get("containers", [])
    ]
    return {
        "metadata": {
            "name": f"{name}-{random_lowercase(5)}",
            "namespace": ns,
            "labels": dict((template.get("metadata") or {}).get("labels") or {}),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": spec,
        "status": status,
    }


def images(template: JSON) -> list[str]:
    spec = template.get("spec") or {}
    return [c.get("image", "") for c in spec.get("containers", []) + spec.get("initContainers", [])]


class Rollouts:
    """How rollouts of Deployments and StatefulSets go: how long they take, which ones fail."""

    def __init__(self) -> None:
        self.delay = 0.2
        self.failing_images: set[str] = set()

    def fail(self, template: JSON) -> bool:
        return any(bad in image for image in images(template) for bad in self.failing_images)


class RolloutController(Controller):
    """A controller of workloads that roll out (Deployments, StatefulSets)."""

    def __init__(
        self,
        cluster: Cluster,
        scheduler: Scheduler,
        history: list[HistoryEvent],
        rollouts: Rollouts,
    ) -> None:
        super().__init__(cluster, scheduler, history)
        self.rollouts = rollouts
