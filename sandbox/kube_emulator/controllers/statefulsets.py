"""The StatefulSet controller, simple form: status counts and revisions, no pods, no ordinals."""

from __future__ import annotations

import functools
import time

from ..resources import JSON, STATEFULSETS
from .base import RolloutController, ns_name, template_hash


class StatefulSetController(RolloutController):
    """StatefulSets: status counts and revisions move as a rollout would move them."""

    def changed(self, old: JSON | None, new: JSON, seeded: bool) -> None:
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
            *ns_name(new),
            meta["uid"],
            meta["generation"],
            template_changed,
        )
        self.scheduler.call_later(self.rollouts.delay, step)

    def _finish_statefulset(
        self, ns: str, name: str, uid: str, generation: int, template_changed: bool
    ) -> None:
        sts = self._latest(STATEFULSETS, ns, name, uid)
        if sts is None or sts["metadata"]["generation"] != generation:
            return
        if template_changed and self.rollouts.fail(sts["spec"]["template"]):
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
