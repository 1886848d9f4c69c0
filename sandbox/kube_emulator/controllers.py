"""The controllers: just enough of kube-controller-manager and cert-manager for runbooks.

They react synchronously to every stored change (`Controllers.observe`, called by the
cluster under its lock) and finish slow work (a rollout, a Job, an issuance) later through
the `Scheduler`. A delayed step carries a token (the object's uid and generation, or an
issuance number); when a newer change has superseded it, the step does nothing.
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import heapq
import itertools
import json
import logging
import random
import string
import threading
import time
from collections.abc import Callable
from typing import Any

from .cluster import Cluster
from .records import HistoryEvent
from .resources import (
    CERTIFICATES,
    DEPLOYMENTS,
    HPAS,
    JOBS,
    JSON,
    PODS,
    REPLICASETS,
    SECRETS,
    STATEFULSETS,
    ResourceType,
    find_type,
    parse_go_duration,
    rfc3339,
)

logger = logging.getLogger(__name__)

REVISION = "deployment.kubernetes.io/revision"
REVISION_HISTORY = "deployment.kubernetes.io/revision-history"
CHANGE_CAUSE = "kubernetes.io/change-cause"
POD_TEMPLATE_HASH = "pod-template-hash"
TEMPORARY_CERTIFICATE = "cert-manager.io/issue-temporary-certificate"
DEFAULT_CERT_DURATION = "2160h"  # 90 days
_HASH_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the API server's "safe" alphabet


class Scheduler:
    """Runs delayed controller steps in due order on one thread, under the cluster lock."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._cond = threading.Condition()
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kube-emulator-controllers")
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def call_later(self, delay: float, step: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._queue, (time.monotonic() + max(0.0, delay), next(self._seq), step))
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    now = time.monotonic()
                    if self._queue and self._queue[0][0] <= now:
                        break
                    self._cond.wait(self._queue[0][0] - now if self._queue else None)
                if self._stopping:
                    return
                _, _, step = heapq.heappop(self._queue)
            try:
                with self._lock:
                    step()
            except Exception:  # one broken step must not stop every later one
                logger.exception("kube emulator controller step failed")


# --- small helpers ------------------------------------------------------------------------


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


def _certificate_condition(
    status: JSON, kind: str, value: str, reason: str, message: str, now: float, generation: int
) -> None:
    stamps = ("lastTransitionTime",)  # cert-manager conditions have no lastUpdateTime
    set_condition(status, kind, value, reason, message, now, stamps, observedGeneration=generation)


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


def _images(template: JSON) -> list[str]:
    spec = template.get("spec") or {}
    return [c.get("image", "") for c in spec.get("containers", []) + spec.get("initContainers", [])]


def _owner_reference(owner: JSON) -> JSON:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Controllers:
    """Deployment/ReplicaSet, StatefulSet, Job, HPA and cert-manager Certificate controllers."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.scheduler = Scheduler(cluster.lock)
        self.rollout_delay = 0.2
        self.job_delay = 0.2
        self.certificate_delay = 0.2
        self.failing_images: set[str] = set()
        self.job_behaviours: dict[str, tuple[bool, str]] = {}
        self.pod_logs: dict[tuple[str, str], str] = {}
        self.history: list[HistoryEvent] = []
        self._issuing: dict[tuple[str, str], int] = {}  # certificate -> pending issuance
        self._issuance_numbers = itertools.count(1)
        cluster.observers.append(self.observe)
        cluster.admitters.append(self.admit)

    def admit(self, rt: ResourceType, obj: JSON) -> None:
        """Fill in what a controller would write at once, so the created object's
        resourceVersion stays current for the client that created it."""
        if rt is HPAS and not obj.get("status"):
            obj["status"] = self._hpa_status(obj)

    def observe(self, rt: ResourceType, old: JSON | None, new: JSON | None, seeded: bool) -> None:
        if new is None:
            if rt is SECRETS:
                self._secret_deleted(old or {})
            elif rt is CERTIFICATES and old is not None:
                self._issuing.pop((old["metadata"]["namespace"], old["metadata"]["name"]), None)
            return
        if old is not None and old.get("spec") == new.get("spec"):
            if rt is CERTIFICATES:
                self._certificate_status_changed(old, new)
            return
        if rt is DEPLOYMENTS:
            self._deployment_changed(old, new, seeded)
        elif rt is STATEFULSETS:
            self._statefulset_changed(old, new, seeded)
        elif rt is JOBS and old is None:
            self._job_created(new, seeded)
        elif rt is CERTIFICATES:
            self._certificate_changed(old, new)

    # --- plumbing ---------------------------------------------------------------------------

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

    # --- Deployments ----------------------------------------------------------------------

    def _deployment_changed(self, old: JSON | None, new: JSON, seeded: bool) -> None:
        template_changed = old is None or old["spec"].get("template") != new["spec"]["template"]
        self._sync_replicasets(new)
        if old is None and new.get("status"):
            return  # a seed that brings its own status keeps it
        if old is None and seeded:
            self._complete_rollout(self.cluster.require(DEPLOYMENTS, *_ns_name(new)), record=False)
            return
        self._start_rollout(new, template_changed)

    def _sync_replicasets(self, deployment: JSON) -> None:
        """Make the ReplicaSet for the current template the newest revision (creating it, or
        reviving an old one on a rollback), scale the others to 0 and prune history."""
        ns, name = _ns_name(deployment)
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
        ns, name = _ns_name(deployment)
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
                    "ownerReferences": [_owner_reference(deployment)],
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
            self.cluster.delete(REPLICASETS, *_ns_name(rs))

    def _current_replicaset(self, deployment: JSON) -> JSON | None:
        revision = _revision(deployment)
        owned = self._owned(REPLICASETS, deployment)
        return next((rs for rs in owned if _revision(rs) == revision), None)

    def _start_rollout(self, deployment: JSON, template_changed: bool) -> None:
        ns, name = _ns_name(deployment)
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
        self.scheduler.call_later(self.rollout_delay, step)

    def _finish_rollout(
        self, ns: str, name: str, uid: str, generation: int, template_changed: bool
    ) -> None:
        deployment = self._latest(DEPLOYMENTS, ns, name, uid)
        if deployment is None or deployment["metadata"]["generation"] != generation:
            return  # deleted, or superseded by a newer change
        progressing = get_condition(deployment.get("status"), "Progressing") or {}
        if template_changed and self._fails(deployment["spec"]["template"]):
            self._fail_rollout(deployment)
        elif template_changed or progressing.get("reason") != "ProgressDeadlineExceeded":
            self._complete_rollout(deployment, record=True)

    def _fails(self, template: JSON) -> bool:
        return any(bad in image for image in _images(template) for bad in self.failing_images)

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

    # --- StatefulSets (simple form: no pods, no ordinals) -------------------------------------

    def _statefulset_changed(self, old: JSON | None, new: JSON, seeded: bool) -> None:
        if old is None and new.get("status"):
            return
        template_changed = old is None or old["spec"].get("template") != new["spec"]["template"]
        desired, status = new["spec"]["replicas"], new.get("status") or {}
        revision = f"{new['metadata']['name']}-{template_hash(new['spec']['template'])}"
        status.update(
            observedGeneration=new["metadata"]["generation"],
            replicas=desired,
            updateRevision=revision,
        )
        if old is None and seeded:
            self._complete_statefulset(new, status, record=False)
            return
        for field in ("readyReplicas", "currentReplicas", "updatedReplicas", "availableReplicas"):
            status[field] = min(status.get(field, 0), desired)
        if template_changed:
            status["updatedReplicas"] = 0
        new = self._write_status(STATEFULSETS, new, status)
        meta = new["metadata"]
        step = functools.partial(
            self._finish_statefulset,
            *_ns_name(new),
            meta["uid"],
            meta["generation"],
            template_changed,
        )
        self.scheduler.call_later(self.rollout_delay, step)

    def _finish_statefulset(
        self, ns: str, name: str, uid: str, generation: int, template_changed: bool
    ) -> None:
        sts = self._latest(STATEFULSETS, ns, name, uid)
        if sts is None or sts["metadata"]["generation"] != generation:
            return
        if template_changed and self._fails(sts["spec"]["template"]):
            self._record(sts, "RolloutStalled", time.time())  # no deadline on StatefulSets
        else:
            self._complete_statefulset(sts, sts.get("status") or {}, record=True)

    def _complete_statefulset(self, sts: JSON, status: JSON, *, record: bool) -> None:
        desired = sts["spec"]["replicas"]
        status.update(
            replicas=desired,
            readyReplicas=desired,
            currentReplicas=desired,
            updatedReplicas=desired,
            availableReplicas=desired,
            currentRevision=status.get("updateRevision"),
        )
        sts = self._write_status(STATEFULSETS, sts, status)
        if record:
            self._record(sts, "RolloutComplete", time.time())

    # --- Jobs ------------------------------------------------------------------------------

    def job_behaviour(self, job_name: str) -> tuple[bool, str]:
        """The longest configured prefix wins; by default a Job succeeds, silently."""
        matches = [p for p in self.job_behaviours if job_name.startswith(p)]
        return self.job_behaviours[max(matches, key=len)] if matches else (True, "")

    def _job_created(self, job: JSON, seeded: bool) -> None:
        status = job.get("status") or {}
        if seeded and (status.get("conditions") or status.get("succeeded") or status.get("failed")):
            return  # a seeded, finished Job
        if job["spec"].get("suspend"):
            return
        now = time.time()
        pod = self._create_job_pod(job, now)
        job = self._write_status(JOBS, job, {"active": 1, "ready": 0, "startTime": rfc3339(now)})
        self._record(job, "JobStarted", now)
        step = functools.partial(
            self._finish_job, *_ns_name(job), job["metadata"]["uid"], pod["metadata"]["name"]
        )
        self.scheduler.call_later(self.job_delay, step)

    def _create_job_pod(self, job: JSON, now: float) -> JSON:
        ns, name = _ns_name(job)
        template = job["spec"]["template"]
        spec = {**copy.deepcopy(template["spec"]), "nodeName": "emulated-node"}
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
            for c in spec["containers"]
        ]
        return self.cluster.create(
            PODS,
            {
                "metadata": {
                    "name": f"{name}-{random_lowercase(5)}",
                    "namespace": ns,
                    "labels": dict((template.get("metadata") or {}).get("labels") or {}),
                    "ownerReferences": [_owner_reference(job)],
                },
                "spec": spec,
                "status": {
                    "phase": "Running",
                    "startTime": rfc3339(now),
                    "containerStatuses": containers,
                },
            },
        )

    def _finish_job(self, ns: str, name: str, uid: str, pod_name: str) -> None:
        job = self._latest(JOBS, ns, name, uid)
        if job is None:
            return
        succeed, logs = self.job_behaviour(name)
        now = time.time()
        pod = self.cluster.get(PODS, ns, pod_name)
        if pod is not None:
            self.pod_logs[(ns, pod_name)] = logs
            pod["status"]["phase"] = "Succeeded" if succeed else "Failed"
            for container in pod["status"].get("containerStatuses", []):
                started = container["state"].get("running", {}).get("startedAt", rfc3339(now))
                container.update(ready=False, started=False)
                container["state"] = {
                    "terminated": {
                        "exitCode": 0 if succeed else 1,
                        "reason": "Completed" if succeed else "Error",
                        "startedAt": started,
                        "finishedAt": rfc3339(now),
                    }
                }
            self.cluster.update(PODS, pod)
        status = job.get("status") or {}
        status.pop("active", None)
        stamps = ("lastProbeTime", "lastTransitionTime")
        if succeed:
            status.update(succeeded=1, completionTime=rfc3339(now))
            set_condition(status, "Complete", "True", "", "", now, stamps)
        else:
            status.update(failed=1)
            message = "Job has reached the specified backoff limit"
            set_condition(status, "Failed", "True", "BackoffLimitExceeded", message, now, stamps)
        job = self._write_status(JOBS, job, status)
        self._record(job, "JobComplete" if succeed else "JobFailed", now)

    # --- HorizontalPodAutoscalers (status only: nothing autoscales) -------------------------

    def _hpa_status(self, hpa: JSON) -> JSON:
        spec = hpa.get("spec") or {}
        ref = spec.get("scaleTargetRef") or {}
        target_rt = find_type(ref.get("apiVersion", "apps/v1"), ref.get("kind", ""))
        target = None
        if target_rt is not None:
            target = self.cluster.get(target_rt, hpa["metadata"]["namespace"], ref.get("name", ""))
        if target is None:
            return {"currentReplicas": 0, "desiredReplicas": 0}
        current = target["spec"].get("replicas", 0)
        low, high = spec.get("minReplicas", 1), spec.get("maxReplicas", current)
        return {"currentReplicas": current, "desiredReplicas": min(max(current, low), high)}

    # --- cert-manager Certificates --------------------------------------------------------

    def _certificate_changed(self, old: JSON | None, new: JSON) -> None:
        if old is None:
            if get_condition(new.get("status"), "Ready") is None:
                self._start_issuance(
                    new, "DoesNotExist", "Issuing certificate as Secret does not exist"
                )
        else:
            self._start_issuance(
                new, "SecretMismatch", "Issuing certificate as the Certificate spec changed"
            )

    def _certificate_status_changed(self, old: JSON, new: JSON) -> None:
        """`cmctl renew` sets the Issuing condition through the status subresource."""
        issuing = get_condition(new.get("status"), "Issuing") or {}
        was_issuing = (get_condition(old.get("status"), "Issuing") or {}).get("status") == "True"
        if issuing.get("status") == "True" and not was_issuing:
            self._start_issuance(
                new,
                issuing.get("reason") or "ManuallyTriggered",
                issuing.get("message") or "Certificate re-issuance manually triggered",
            )

    def _secret_deleted(self, secret: JSON) -> None:
        ns, name = _ns_name(secret)
        for cert in self.cluster.list(CERTIFICATES, ns):
            if (cert.get("spec") or {}).get("secretName") == name:
                self._start_issuance(
                    cert, "DoesNotExist", "Issuing certificate as Secret does not exist"
                )

    def _start_issuance(self, cert: JSON, reason: str, message: str) -> None:
        key = _ns_name(cert)
        if key in self._issuing:
            return  # already on its way
        number = next(self._issuance_numbers)
        self._issuing[key] = number  # before writing: our own write comes back through observe
        now = time.time()
        cert = self.cluster.require(CERTIFICATES, *key)
        status = cert.get("status") or {}
        generation = cert["metadata"]["generation"]
        _certificate_condition(status, "Ready", "False", "InProgress", message, now, generation)
        _certificate_condition(status, "Issuing", "True", reason, message, now, generation)
        cert = self._write_status(CERTIFICATES, cert, status)
        self._record(cert, "CertificateIssuing", now)
        annotations = cert["metadata"].get("annotations") or {}
        secret_name = (cert.get("spec") or {}).get("secretName")
        if (
            annotations.get(TEMPORARY_CERTIFICATE) == "true"
            and secret_name
            and self.cluster.get(SECRETS, key[0], secret_name) is None
        ):
            self._write_tls_secret(cert, now, temporary=True)
            self._record(cert, "TemporaryCertificateIssued", now)
        step = functools.partial(self._finish_issuance, *key, number)
        self.scheduler.call_later(self.certificate_delay, step)

    def _finish_issuance(self, ns: str, name: str, number: int) -> None:
        if self._issuing.get((ns, name)) != number:
            return
        del self._issuing[(ns, name)]
        cert = self.cluster.get(CERTIFICATES, ns, name)
        if cert is None:
            return
        spec, now = cert.get("spec") or {}, time.time()
        duration = parse_go_duration(spec.get("duration") or DEFAULT_CERT_DURATION)
        # cert-manager renews a third of the way from the end unless told otherwise:
        # 30 days (720h) for the default 90-day certificate.
        renew_before = parse_go_duration(spec["renewBefore"]) if "renewBefore" in spec else None
        not_after = now + duration
        status = cert.get("status") or {}
        conditions = status.get("conditions", [])
        status["conditions"] = [c for c in conditions if c.get("type") != "Issuing"]
        message = "Certificate is up to date and has not expired"
        generation = cert["metadata"]["generation"]
        _certificate_condition(status, "Ready", "True", "Ready", message, now, generation)
        status.update(
            notBefore=rfc3339(now),
            notAfter=rfc3339(not_after),
            renewalTime=rfc3339(not_after - (renew_before or duration / 3)),
            revision=int(status.get("revision") or 0) + 1,
        )
        status.pop("failedIssuanceAttempts", None)
        status.pop("lastFailureTime", None)
        cert = self._write_status(CERTIFICATES, cert, status)
        if spec.get("secretName"):
            self._write_tls_secret(cert, not_after, temporary=False)
        self._record(cert, "CertificateReady", now)

    def _write_tls_secret(self, cert: JSON, not_after: float, *, temporary: bool) -> None:
        """The Secret cert-manager writes: dummy PEM blocks, annotated like the real thing."""
        ns, cert_name = _ns_name(cert)
        spec = cert.get("spec") or {}
        issuer = spec.get("issuerRef") or {}
        names = ",".join(spec.get("dnsNames") or [])
        subject = (
            "temporary certificate" if temporary else f"certificate until {rfc3339(not_after)}"
        )
        body = _b64(f"emulated {subject} for {names or cert_name}")
        data = {
            "tls.crt": _b64(f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"),
            "tls.key": _b64(f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n"),
            "ca.crt": _b64(
                f"-----BEGIN CERTIFICATE-----\n{_b64('emulated CA')}\n-----END CERTIFICATE-----\n"
            ),
        }
        annotations = {
            "cert-manager.io/certificate-name": cert_name,
            "cert-manager.io/common-name": spec.get("commonName", ""),
            "cert-manager.io/alt-names": names,
            "cert-manager.io/issuer-name": issuer.get("name", ""),
            "cert-manager.io/issuer-kind": issuer.get("kind", "Issuer"),
            "cert-manager.io/issuer-group": issuer.get("group", "cert-manager.io"),
        }
        existing = self.cluster.get(SECRETS, ns, spec["secretName"])
        if existing is None:
            self.cluster.create(
                SECRETS,
                {
                    "metadata": {
                        "name": spec["secretName"],
                        "namespace": ns,
                        "annotations": annotations,
                        "labels": {"controller.cert-manager.io/fao": "true"},
                    },
                    "type": "kubernetes.io/tls",
                    "data": data,
                },
            )
        else:
            existing["data"] = {**(existing.get("data") or {}), **data}
            existing["metadata"]["annotations"] = {
                **(existing["metadata"].get("annotations") or {}),
                **annotations,
            }
            self.cluster.update(SECRETS, existing)


def _ns_name(obj: JSON) -> tuple[str, str]:
    return obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def random_lowercase(length: int) -> str:
    return "".join(random.choices(string.ascii_lowercase, k=length))
