"""The Deployment controller: ReplicaSets with revision annotations, rollouts that complete,
or fail on demand with `ProgressDeadlineExceeded`, `rollout undo` reviving an old template."""

from __future__ import annotations

import copy
import functools
import time

from ..resources import DEPLOYMENTS, JSON, REPLICASETS
from .base import (
    RolloutController,
    get_condition,
    ns_name,
    owner_reference,
    random_lowercase,
    set_condition,
    template_hash,
)

REVISION = "deployment.kubernetes.io/revision"
REVISION_HISTORY = "deployment.kubernetes.io/revision-history"
CHANGE_CAUSE = "kubernetes.io/change-cause"
POD_TEMPLATE_HASH = "pod-template-hash"


def _without_hash(template: JSON) -> JSON:
    template = copy.deepcopy(template)
    labels = (template.get("metadata") or {}).get("labels")
    if labels:
        labels.pop(POD_TEMPLATE_HASH, None)
    return template


def _revision(obj: JSON) -> int:
    try:
        return int((obj["metadata"].get("annotations") or {}).get(REVISION, "0"))
    except ValueError:
        return 0


class DeploymentController(RolloutController):
    """Deployments and the ReplicaSets they own."""

    def changed(self, old: JSON | None, new: JSON, seeded: bool) -> None:
        template_changed = old is None or old["spec"].get("template") != new["spec"]["template"]
        self._sync_replicasets(new)
        if old is None and new.get("status"):
            return  # a seed that brings its own status keeps it
        if old is None and seeded:
            self._complete_rollout(self.cluster.require(DEPLOYMENTS, *ns_name(new)), record=False)
            return
        self._start_rollout(new, template_changed)

    def _sync_replicasets(self, deployment: JSON) -> None:
        """Make the ReplicaSet for the current template the newest revision (creating it, or
        reviving an old one on a rollback), scale the others to 0 and prune history."""
        ns, name = ns_name(deployment)
        spec = deployment["spec"]
        owned = self._owned(REPLICASETS, deployment)
        for rs in owned:  # adopt seeded ReplicaSets whose owner uid was made up
            for ref in rs["metadata"]["ownerReferences"]:
                if ref.get("kind") == "Deployment" and ref.get("name") == name:
                    ref["uid"] = deployment["metadata"]["uid"]
        template = _without_hash(spec["template"])
        current = next(
            (rs for rs in owned if _without_hash(rs["spec"]["template"]) == template), None
        )
        top = max((_revision(rs) for rs in owned), default=0)
        annotations = deployment["metadata"].get("annotations") or {}
        if current is None:
            revision = top + 1 if owned else max(1, _revision(deployment))
            current = self._new_replicaset(deployment, revision)
            owned.append(current)
        else:
            revision = top if _revision(current) == top and top > 0 else top + 1
            rs_annotations = current["metadata"].setdefault("annotations", {})
            if _revision(current) and revision != _revision(current):  # a rollback
                old = [v for v in rs_annotations.get(REVISION_HISTORY, "").split(",") if v]
                rs_annotations[REVISION_HISTORY] = ",".join([*old, str(_revision(current))])
            rs_annotations[REVISION] = str(revision)
            if CHANGE_CAUSE in annotations:
                rs_annotations[CHANGE_CAUSE] = annotations[CHANGE_CAUSE]
        for rs in owned:
            is_current = rs["metadata"]["name"] == current["metadata"]["name"]
            rs["spec"]["replicas"] = spec["replicas"] if is_current else 0
            if not is_current:
                rs["status"] = {"replicas": 0, "observedGeneration": rs["metadata"]["generation"]}
            self.cluster.update(REPLICASETS, rs)
        if annotations.get(REVISION) != str(revision):
            latest = self.cluster.require(DEPLOYMENTS, ns, name)
            latest["metadata"].setdefault("annotations", {})[REVISION] = str(revision)
            self.cluster.update(DEPLOYMENTS, latest)
        self._prune_history(deployment, current)

    def _new_replicaset(self, deployment: JSON, revision: int) -> JSON:
        ns, name = ns_name(deployment)
        template = _without_hash(deployment["spec"]["template"])
        pod_hash = template_hash(template)
        labels = {**(template.get("metadata") or {}).get("labels", {}), POD_TEMPLATE_HASH: pod_hash}
        template.setdefault("metadata", {})["labels"] = labels
        selector = copy.deepcopy(deployment["spec"]["selector"])
        selector.setdefault("matchLabels", {})[POD_TEMPLATE_HASH] = pod_hash
        annotations = {REVISION: str(revision)}
        change_cause = (deployment["metadata"].get("annotations") or {}).get(CHANGE_CAUSE)
        if change_cause is not None:
            annotations[CHANGE_CAUSE] = change_cause
        rs_name = f"{name}-{pod_hash}"
        if self.cluster.get(REPLICASETS, ns, rs_name) is not None:  # a stranger took the name
            rs_name = f"{name}-{pod_hash[:5]}{random_lowercase(5)}"
        return self.cluster.create(
            REPLICASETS,
            {
                "metadata": {
                    "name": rs_name,
                    "namespace": ns,
                    "labels": dict(labels),
                    "annotations": annotations,
                    "ownerReferences": [owner_reference(deployment)],
                },
                "spec": {
                    "replicas": deployment["spec"]["replicas"],
                    "selector": selector,
                    "template": template,
                },
                "status": {"replicas": 0, "observedGeneration": 1},
            },
        )

    def _prune_history(self, deployment: JSON, current: JSON) -> None:
        limit = deployment["spec"].get("revisionHistoryLimit", 10)
        old = sorted(
            (
                rs
                for rs in self._owned(REPLICASETS, deployment)
                if rs["metadata"]["name"] != current["metadata"]["name"]
                and not rs["spec"].get("replicas")
            ),
            key=_revision,
        )
        for rs in old[: max(0, len(old) - limit)]:
            self.cluster.delete(REPLICASETS, *ns_name(rs))

    def _current_replicaset(self, deployment: JSON) -> JSON | None:
        revision = _revision(deployment)
        owned = self._owned(REPLICASETS, deployment)
        return next((rs for rs in owned if _revision(rs) == revision), None)

    def _start_rollout(self, deployment: JSON, template_changed: bool) -> None:
        ns, name = ns_name(deployment)
        deployment = self.cluster.require(DEPLOYMENTS, ns, name)
        now, desired = time.time(), deployment["spec"]["replicas"]
        status = deployment.get("status") or {}
        status["observedGeneration"] = deployment["metadata"]["generation"]
        status.setdefault("replicas", 0)
        if template_changed:
            rs = self._current_replicaset(deployment)
            rs_name = rs["metadata"]["name"] if rs else name
            status["updatedReplicas"] = 0
            status["unavailableReplicas"] = desired
            message = f'ReplicaSet "{rs_name}" is progressing.'
            set_condition(status, "Progressing", "True", "ReplicaSetUpdated", message, now)
        else:  # a scale: the counts move towards the new size
            for field in ("updatedReplicas", "readyReplicas", "availableReplicas"):
                status[field] = min(status.get(field, 0), desired)
        if get_condition(status, "Available") is None:
            message = "Deployment does not have minimum availability."
            set_condition(status, "Available", "False", "MinimumReplicasUnavailable", message, now)
        deployment = self._write_status(DEPLOYMENTS, deployment, status)
        self._record(deployment, "RolloutStarted", now)
        meta = deployment["metadata"]
        step = functools.partial(
            self._finish_rollout, ns, name, meta["uid"], meta["generation"], template_changed
        )
        self.scheduler.call_later(self.rollouts.delay, step)

    def _finish_rollout(
        self, ns: str, name: str, uid: str, generation: int, template_changed: bool
    ) -> None:
        deployment = self._latest(DEPLOYMENTS, ns, name, uid)
        if deployment is None or deployment["metadata"]["generation"] != generation:
            return  # deleted, or superseded by a newer change
        progressing = get_condition(deployment.get("status"), "Progressing") or {}
        if template_changed and self.rollouts.fail(deployment["spec"]["template"]):
            self._fail_rollout(deployment)
        elif template_changed or progressing.get("reason") != "ProgressDeadlineExceeded":
            self._complete_rollout(deployment, record=True)

    def _complete_rollout(self, deployment: JSON, *, record: bool) -> None:
        now, desired = time.time(), deployment["spec"]["replicas"]
        rs = self._current_replicaset(deployment)
        rs_name = rs["metadata"]["name"] if rs else deployment["metadata"]["name"]
        status = deployment.get("status") or {}
        status.pop("unavailableReplicas", None)
        status.update(
            observedGeneration=deployment["metadata"]["generation"],
            replicas=desired,
            updatedReplicas=desired,
            readyReplicas=desired,
            availableReplicas=desired,
        )
        message = "Deployment has minimum availability."
        set_condition(status, "Available", "True", "MinimumReplicasAvailable", message, now)
        message = f'ReplicaSet "{rs_name}" has successfully progressed.'
        set_condition(status, "Progressing", "True", "NewReplicaSetAvailable", message, now)
        deployment = self._write_status(DEPLOYMENTS, deployment, status)
        if rs is not None:
            rs_status = {
                "replicas": desired,
                "fullyLabeledReplicas": desired,
                "readyReplicas": desired,
                "availableReplicas": desired,
                "observedGeneration": rs["metadata"]["generation"],
            }
            self._write_status(REPLICASETS, rs, rs_status)
        if record:
            self._record(deployment, "RolloutComplete", now)

    def _fail_rollout(self, deployment: JSON) -> None:
        now, desired = time.time(), deployment["spec"]["replicas"]
        rs = self._current_replicaset(deployment)
        rs_name = rs["metadata"]["name"] if rs else deployment["metadata"]["name"]
        status = deployment.get("status") or {}
        status.update(
            observedGeneration=deployment["metadata"]["generation"],
            updatedReplicas=0,
            unavailableReplicas=max(desired, 1),
        )
        message = f'ReplicaSet "{rs_name}" has timed out progressing.'
        set_condition(status, "Progressing", "False", "ProgressDeadlineExceeded", message, now)
        deployment = self._write_status(DEPLOYMENTS, deployment, status)
        self._record(deployment, "ProgressDeadlineExceeded", now)
