"""The controllers: just enough of kube-controller-manager and cert-manager for runbooks.

They react synchronously to every stored change (`Controllers.observe`, called by the
cluster under its lock) and finish slow work (a rollout, a Job, an issuance) later through
the `Scheduler`. A delayed step carries a token (the object's uid and generation, or an
issuance number); when a newer change has superseded it, the step does nothing.

One module per controller: `deployments` (Deployments and their ReplicaSets),
`replicasets` (their Pods),
`statefulsets`, `jobs`, `hpas`, `certificates` (cert-manager); `base` holds what they
share, `scheduler` the delayed steps. `Controllers` routes each change to its controller.
"""

from __future__ import annotations

from ..cluster import Cluster
from ..pod_logs import LogSource
from ..records import HistoryEvent
from ..resources import (
    CERTIFICATES,
    DEPLOYMENTS,
    HPAS,
    JOBS,
    JSON,
    REPLICASETS,
    SECRETS,
    STATEFULSETS,
    ResourceType,
)
from .base import Rollouts
from .certificates import CertificateController
from .deployments import DeploymentController
from .hpas import HpaController
from .jobs import JobController
from .replicasets import ReplicaSetController
from .scheduler import Scheduler
from .statefulsets import StatefulSetController

__all__ = ["Controllers", "Scheduler"]


class Controllers:
    """Deployment/ReplicaSet, StatefulSet, Job, HPA and cert-manager Certificate controllers."""

    def __init__(self, cluster: Cluster) -> None:
        self.scheduler = Scheduler(cluster.lock)
        self.history: list[HistoryEvent] = []
        self.pod_logs: dict[tuple[str, str], str] = {}
        self.log_sources: list[LogSource] = []  # pods whose logs something else writes
        self.rollouts = Rollouts()  # Deployments and StatefulSets roll out alike
        shared = (cluster, self.scheduler, self.history)
        self.deployments = DeploymentController(*shared, self.rollouts)
        self.statefulsets = StatefulSetController(*shared, self.rollouts)
        self.jobs = JobController(*shared, self.pod_logs)
        self.replicasets = ReplicaSetController(*shared)
        self.hpas = HpaController(*shared)
        self.certificates = CertificateController(*shared)
        cluster.observers.append(self.observe)
        cluster.admitters.append(self.admit)

    def admit(self, rt: ResourceType, obj: JSON) -> None:
        """Fill in what a controller would write at once, so the created object's
        resourceVersion stays current for the client that created it."""
        if rt is HPAS and not obj.get("status"):
            obj["status"] = self.hpas.status_for(obj)

    def observe(self, rt: ResourceType, old: JSON | None, new: JSON | None, seeded: bool) -> None:
        if new is None:
            if rt is SECRETS:
                self.certificates.secret_deleted(old or {})
            elif rt is CERTIFICATES and old is not None:
                self.certificates.forget(old)
            elif rt is JOBS and old is not None:
                self.jobs.deleted(old)
            return
        if old is not None and old.get("spec") == new.get("spec"):
            if rt is CERTIFICATES:
                self.certificates.status_changed(old, new)
            return
        if rt is DEPLOYMENTS:
            self.deployments.changed(old, new, seeded)
        elif rt is STATEFULSETS:
            self.statefulsets.changed(old, new, seeded)
        elif rt is REPLICASETS:
            self.replicasets.changed(new)
        elif rt is JOBS and old is None:
            self.jobs.created(new, seeded)
        elif rt is CERTIFICATES:
            self.certificates.changed(old, new, seeded)
