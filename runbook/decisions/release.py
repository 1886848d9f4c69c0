"""What a deploy or a rollback will do, decided from Deployments and their rollout history
as plain JSON (what `tasks.kubernetes` returns). No clients, no Prefect.

The runbook's two commands this stands for:

    kubectl set image deployment/backend backend=complianceagent/backend:${VERSION}
    kubectl rollout undo deployment/backend [--to-revision=N]
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from runbook.decisions.deployment import deployment_view
from runbook.decisions.refusal import Refused

JSON = dict[str, Any]

# What the runbook's `kubectl` commands name: the platform's three Deployments.
Component = Literal["backend", "frontend", "celery-workers"]
# What a deploy updates; celery-workers run the backend's image and follow it (see below).
Deployable = Literal["backend", "frontend"]
DEPLOY_ORDER: tuple[Component, ...] = ("backend", "celery-workers", "frontend")

# A Docker image tag: what `docker tag` accepts (and nothing a shell would interpret).
TAG_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"


# --- images and containers -----------------------------------------------------------------


def image_repository(image: str) -> str:
    """The image without its tag or digest:
    `registry:5000/complianceagent/backend:1.4.2` → `registry:5000/complianceagent/backend`.

    A colon after the last slash starts the tag; one before it is a registry port.
    """
    name = image.split("@", 1)[0]
    colon, slash = name.rfind(":"), name.rfind("/")
    return name[:colon] if colon > slash else name


def image_tag(image: str) -> str:
    """The tag of an image reference (`latest` when it has none, as Docker reads it)."""
    name = image.split("@", 1)[0]
    colon, slash = name.rfind(":"), name.rfind("/")
    return name[colon + 1 :] if colon > slash else "latest"


def with_tag(image: str, tag: str) -> str:
    """The same repository at another tag: a new version never moves registries."""
    if not re.fullmatch(TAG_PATTERN, tag):
        raise Refused("version", f"{tag!r} is not an image tag (pattern {TAG_PATTERN})")
    return f"{image_repository(image)}:{tag}"


def current_revision(deployment: JSON) -> int:
    return deployment_view(deployment).revision


# --- deploy --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """A component as it ran before the change: what a rollback brings back."""

    component: str
    deployment: str
    container: str
    image: str
    revision: int
    template: JSON
    progress_deadline_seconds: int


def record(component: str, deployment: JSON, revisions: Sequence[JSON]) -> Recorded:
    """Record a Deployment's current revision, image and pod template.

    The template is the current revision's ReplicaSet's (what `kubectl rollout undo` would
    write back); if the history lacks it, the Deployment's own template is the same thing.
    """
    view = deployment_view(deployment)
    entry = next((r for r in revisions if r["revision"] == view.revision), None)
    return Recorded(
        component=component,
        deployment=view.name,
        container=view.container.name,
        image=view.container.image,
        revision=view.revision,
        template=entry["template"] if entry is not None else view.template,
        progress_deadline_seconds=view.progress_deadline_seconds,
    )


def deploy_components(components: Iterable[str], workers_follow_backend: bool) -> list[Component]:
    """The Deployments a deploy updates, in rollout order.

    celery-workers run the backend's image: left on the old one, they would execute the
    new API's tasks with old code (and an old schema). So by default they follow the
    backend, rolled out right after it and before the frontend that calls the new API.
    """
    wanted = set(components)
    if "backend" in wanted and workers_follow_backend:
        wanted.add("celery-workers")
    return [c for c in DEPLOY_ORDER if c in wanted]


@dataclass(frozen=True)
class ImageChange:
    recorded: Recorded
    target_image: str

    @property
    def changes(self) -> bool:
        return self.target_image != self.recorded.image


def plan_images(version: str, records: Sequence[Recorded]) -> list[ImageChange]:
    """Each component's image at `version`, in its own repository."""
    return [ImageChange(r, with_tag(r.image, version)) for r in records]


@dataclass(frozen=True)
class Undone:
    """What a deploy's automatic rollback achieved."""

    revisions: dict[str, int]  # deployment → its revision once the undo rolled out
    problems: tuple[str, ...]  # each step of the undo that failed, in order
    health: str  # the health verdict after the undo

    @property
    def whole(self) -> bool:
        return not self.problems


def rollback_cause(version: str, why: str) -> str:
    """The change-cause the undo records on each Deployment (the API caps annotations)."""
    return f"deploy of {version} rolled back: {why}"[:500]


def failed_deploy_summary(version: str, why: str, undone: Undone) -> str:
    """One paragraph for the report, the run's error and chat: what failed, what was put
    back, and how the platform is now."""
    outcome = "rolled back" if undone.whole else "only PARTLY rolled back"
    sentences = [f"Deploy of {version} failed and was {outcome}: {why}."]
    sentences += [problem.rstrip(". ") + "." for problem in undone.problems]
    sentences.append(f"After the rollback: {undone.health}.")
    return " ".join(sentences)


# --- rollback ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RollbackChoice:
    current: JSON  # the revision entry running now (see `revisions.revisions_of`)
    target: JSON  # the revision entry whose pod template comes back
    already_there: bool  # the Deployment already runs the target's template


def _existing(revisions: Sequence[JSON]) -> str:
    return ", ".join(str(r["revision"]) for r in revisions) or "none"


def recorded_revision_now(
    revisions: Sequence[JSON], recorded: int, recorded_image: str | None
) -> int:
    """The revision number that holds what a run recorded as `recorded` (with image
    `recorded_image`). Kubernetes renumbers a revision brought back by a rollout undo: the
    run's own rollback turns revision 1 into, say, 3. So when `recorded` is gone from the
    history, the newest revision running `recorded_image` is the same template under its
    new number; with neither, `recorded` is returned and refused as not in the history."""
    if any(r["revision"] == recorded for r in revisions) or not recorded_image:
        return recorded
    same = [r for r in revisions if recorded_image in (r.get("images") or {}).values()]
    return max(same, key=lambda r: r["revision"])["revision"] if same else recorded


def choose_rollback(
    deployment: JSON, revisions: Sequence[JSON], to_revision: int | None
) -> RollbackChoice:
    """`kubectl rollout undo [--to-revision=N]`: which revision comes back.

    Without `to_revision`, the newest revision older than the current one. A revision
    that is not in the history is refused, listing the ones that are.
    """
    name = deployment["metadata"]["name"]
    revision = current_revision(deployment)
    current = next((r for r in revisions if r["revision"] == revision), None)
    if current is None:
        raise Refused(
            "deployment",
            f"deployment/{name} is at revision {revision}, which its history lacks "
            f"(existing revisions: {_existing(revisions)})",
        )
    if to_revision is None:
        older = [r for r in revisions if r["revision"] < revision]
        if not older:
            raise Refused(
                "to_revision",
                f"deployment/{name} has no revision before the current one ({revision}); "
                f"existing revisions: {_existing(revisions)}",
            )
        target = max(older, key=lambda r: r["revision"])
    else:
        found = next((r for r in revisions if r["revision"] == to_revision), None)
        if found is None:
            raise Refused(
                "to_revision",
                f"revision {to_revision} is not in the rollout history of deployment/{name}; "
                f"existing revisions: {_existing(revisions)}",
            )
        target = found
    return RollbackChoice(current, target, target["template"] == current["template"])


def history_rows(revisions: Sequence[JSON], revision_now: int) -> list[JSON]:
    """`kubectl rollout history` as table rows, newest first."""
    return [
        {
            "revision": r["revision"],
            "current": "✓" if r["revision"] == revision_now else "",
            "images": ", ".join(f"{c}={i}" for c, i in r["images"].items()),
            "change_cause": r["change_cause"] or "-",
            "created": r["created"] or "-",
            "replicaset": r["replicaset"],
        }
        for r in sorted(revisions, key=lambda r: r["revision"], reverse=True)
    ]
