"""The ReplicaSet controller: a ReplicaSet keeps `spec.replicas` Pods of its template,
named `{replicaset}-{5 random}` and owned by it, so `kubectl get pods -l app=backend` and
`kubectl logs -l app=backend` find the current revision's pods. Pods are Running and ready
at once; scaling down removes the newest first, as the real controller prefers."""

from __future__ import annotations

import copy
import time

from ..resources import JSON, PODS, REPLICASETS, rfc3339
from .base import Controller, ns_name, owner_reference, random_lowercase


class ReplicaSetController(Controller):
    """Pods for ReplicaSets: as many as `spec.replicas`, created and deleted at once."""

    def changed(self, replicaset: JSON) -> None:
        ns, _ = ns_name(replicaset)
        replicaset = self.cluster.get(REPLICASETS, ns, replicaset["metadata"]["name"]) or {}
        if not replicaset:
            return
        pods = sorted(self._owned(PODS, replicaset), key=_age)
        wanted = int((replicaset.get("spec") or {}).get("replicas") or 0)
        for pod in reversed(pods[wanted:]):
            self.cluster.delete(PODS, *ns_name(pod))
        for _ in range(wanted - len(pods)):
            self._create_pod(replicaset)

    def _create_pod(self, replicaset: JSON) -> JSON:
        ns, name = ns_name(replicaset)
        now = time.time()
        template = replicaset["spec"]["template"]
        spec = {**copy.deepcopy(template.get("spec") or {}), "nodeName": "emulated-node"}
        containers = [
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
        return self.cluster.create(
            PODS,
            {
                "metadata": {
                    "name": f"{name}-{random_lowercase(5)}",
                    "namespace": ns,
                    "labels": dict((template.get("metadata") or {}).get("labels") or {}),
                    "ownerReferences": [owner_reference(replicaset)],
                },
                "spec": spec,
                "status": {
                    "phase": "Running",
                    "startTime": rfc3339(now),
                    "conditions": [{"type": "Ready", "status": "True"}],
                    "containerStatuses": containers,
                },
            },
        )


def _age(pod: JSON) -> tuple[str, str]:
    return pod["metadata"]["creationTimestamp"], pod["metadata"]["name"]
