"""A Deployment as the release runbooks read it: the few values they use, by name.

Built from the API's JSON (camelCase, as `tasks.kubernetes` returns it) by one pure
function, so no flow indexes `metadata.generation` or `containers[0]` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runbook.decisions.revisions import REVISION_ANNOTATION

JSON = dict[str, Any]

# Kubernetes' own default when a Deployment does not say.
DEFAULT_PROGRESS_DEADLINE_SECONDS = 600


@dataclass(frozen=True)
class Container:
    """The application container: the one `kubectl set image NAME=…` addresses."""

    name: str
    image: str
    working_dir: str | None
    env_names: tuple[str, ...]
    env: dict[str, str]  # literal values only; variables from a Secret or field are absent
    env_from: tuple[str, ...]  # e.g. "secret backend-secrets", "configMap backend-config"


@dataclass(frozen=True)
class DeploymentView:
    name: str
    generation: int
    revision: int  # deployment.kubernetes.io/revision; 0 before the controller set it
    replicas: int
    progress_deadline_seconds: int
    container: Container
    template: JSON  # the pod template as served


def main_container(deployment: JSON) -> JSON:
    """The container the runbook's `set image NAME=…` addresses: the one named like the
    Deployment, else the only one."""
    name = deployment["metadata"]["name"]
    containers = deployment["spec"]["template"]["spec"]["containers"]
    named = [c for c in containers if c.get("name") == name]
    if named:
        return dict(named[0])
    if len(containers) == 1:
        return dict(containers[0])
    raise ValueError(
        f"deployment/{name} has {len(containers)} containers and none is named {name!r}: "
        "cannot tell which one runs the application"
    )


def env_sources(container: JSON) -> tuple[str, ...]:
    """A container's `envFrom` as `kind name` (`secret backend-secrets`): what the plan shows
    instead of values."""
    return tuple(
        f"{kind.removesuffix('Ref')} {ref['name']}"
        for source in container.get("envFrom") or []
        for kind, ref in source.items()
        if isinstance(ref, dict) and "name" in ref
    )


def container_view(container: JSON) -> Container:
    variables = container.get("env") or []
    return Container(
        name=container["name"],
        image=container["image"],
        working_dir=container.get("workingDir"),
        env_names=tuple(v["name"] for v in variables),
        env={v["name"]: str(v["value"]) for v in variables if "value" in v},
        env_from=env_sources(container),
    )


def deployment_view(deployment: JSON) -> DeploymentView:
    meta, spec = deployment["metadata"], deployment["spec"]
    annotations = meta.get("annotations") or {}
    return DeploymentView(
        name=meta["name"],
        generation=int(meta.get("generation") or 0),
        revision=int(annotations.get(REVISION_ANNOTATION) or 0),
        replicas=int(spec.get("replicas", 1)),
        progress_deadline_seconds=int(
            spec.get("progressDeadlineSeconds") or DEFAULT_PROGRESS_DEADLINE_SECONDS
        ),
        container=container_view(main_container(deployment)),
        template=spec["template"],
    )
