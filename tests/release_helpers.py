"""Shared by the release runbooks' tests: read the emulator's Deployments, and put back
what a test changed (`platform.reset()` does not undo changes to seeded Deployments)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from runbook.decisions.rollout import rollout_verdict
from tasks import kubernetes as k8s

NS = "complianceagent"
RELEASED = ("backend", "frontend", "celery-workers")


def live(kube: Any, name: str) -> dict[str, Any]:
    return kube.get("apps/v1", "Deployment", NS, name)


def image_of(kube: Any, name: str) -> str:
    return live(kube, name)["spec"]["template"]["spec"]["containers"][0]["image"]


def revision_of(kube: Any, name: str) -> int:
    return int(live(kube, name)["metadata"]["annotations"]["deployment.kubernetes.io/revision"])


def deployment_writes(kube: Any, name: str) -> list[Any]:
    return [w for w in kube.writes if w.kind == "Deployment" and w.name == name]


def kinds_of(writes: list[Any]) -> list[str]:
    """`set-image` for a strategic merge patch of the template, `restore` for the JSON
    patch `restore_pod_template` sends, `scale` for the scale subresource."""
    out = []
    for w in writes:
        if w.subresource == "scale":
            out.append("scale")
        elif isinstance(w.body, list):
            out.append("restore")
        else:
            out.append("set-image")
    return out


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Wait for an observable condition instead of sleeping and hoping."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"never happened within {timeout}s: {what}")


def wait_settled(kube: Any, name: str, timeout: float = 10) -> None:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if rollout_verdict(live(kube, name)).finished:
            return
        time.sleep(0.02)
    raise AssertionError(f"deployment/{name} never settled")


@contextmanager
def jobs_removed(kube: Any) -> Iterator[None]:
    """Delete the Jobs a test created (a test may leave one running on purpose)."""
    before = {j["metadata"]["name"] for j in kube.list("batch/v1", "Job", NS)}
    try:
        yield
    finally:
        for job in kube.list("batch/v1", "Job", NS):
            if job["metadata"]["name"] not in before:
                k8s.delete_job.fn(job["metadata"]["name"])


@contextmanager
def deployments_restored(kube: Any, names: tuple[str, ...] = RELEASED) -> Iterator[None]:
    """Put the Deployments' pod templates and replica counts back as they were."""
    before = {n: live(kube, n)["spec"] for n in names}
    try:
        yield
    finally:
        kube.clear_rollout_failures()
        for name, spec in before.items():
            now = live(kube, name)["spec"]
            if now["template"] != spec["template"]:
                k8s.restore_pod_template.fn(name, spec["template"], "test cleanup")
            if now["replicas"] != spec["replicas"]:
                k8s.scale_deployment.fn(name, spec["replicas"])
            wait_settled(kube, name)
