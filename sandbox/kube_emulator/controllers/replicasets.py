"""The ReplicaSet controller: a ReplicaSet keeps `spec.replicas` Pods of its template,
named `{replicaset}-{5 random}` and owned by it, so `kubectl get pods -l app=backend` and
`kubectl logs -l app=backend` find the current revision's pods. Pods are Running and ready
at once; scaling down removes the newest first, as the real controller prefers."""

from __future__ import annotations

import time

from ..resources import JSON, PODS, REPLICASETS
from .base import Controller, ns_name, running_pod


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
        return self.cluster.create(PODS, running_pod(replicaset, time.time(), ready_condition=True))


def _age(pod: JSON) -> tuple[str, str]:
    return pod["metadata"]["creationTimestamp"], pod["metadata"]["name"]
