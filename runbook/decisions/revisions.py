"""A Deployment's rollout history, read from its ReplicaSets as `kubectl rollout history`
does: each ReplicaSet owned by the Deployment carries one revision number."""

from __future__ import annotations

import copy
from typing import Any

REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
CHANGE_CAUSE_ANNOTATION = "kubernetes.io/change-cause"


def revisions_of(deployment: str, replica_sets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The revisions of `deployment`, oldest first.

    Each: revision, images (container → image), change_cause, created, replicaset, and
    template — the pod template without the `pod-template-hash` label the controller
    added, i.e. exactly what `kubectl rollout undo` writes back.
    """
    revisions = []
    for rs in replica_sets:
        meta = rs.get("metadata") or {}
        owners = meta.get("ownerReferences") or []
        if not any(o.get("kind") == "Deployment" and o.get("name") == deployment for o in owners):
            continue
        annotations = meta.get("annotations") or {}
        if REVISION_ANNOTATION not in annotations:
            continue
        template = copy.deepcopy(rs["spec"]["template"])
        (template.get("metadata") or {}).get("labels", {}).pop("pod-template-hash", None)
        revisions.append(
            {
                "revision": int(annotations[REVISION_ANNOTATION]),
                "images": {c["name"]: c["image"] for c in template["spec"]["containers"]},
                "change_cause": annotations.get(CHANGE_CAUSE_ANNOTATION, ""),
                "created": meta.get("creationTimestamp", ""),
                "replicaset": meta.get("name", ""),
                "template": template,
            }
        )
    return sorted(revisions, key=lambda r: r["revision"])
