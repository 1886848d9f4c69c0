"""Read prefect.yaml, the one list of deployments, and build runnable deployments from it.

`prefect deploy --all` reads the same file in production; locally, `serve_all` serves
every entry from one process with its schedules, so what a newcomer clicks through in the
UI is exactly what production runs.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import Flow

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"


@dataclass(frozen=True)
class DeploymentSpec:
    """One `deployments:` entry of prefect.yaml."""

    name: str
    entrypoint: str
    description: str = ""
    tags: tuple[str, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[dict[str, Any], ...] = ()
    concurrency_limit: int | None = None
    # prefect.yaml `triggers:` (event triggers): automations that start this deployment.
    triggers: tuple[dict[str, Any], ...] = ()

    def load_flow(self) -> Flow[..., Any]:
        """Import the entrypoint (`path/to/module.py:function`) and return its flow."""
        path, _, function = self.entrypoint.partition(":")
        module_name = path.removesuffix(".py").replace("/", ".")
        if module_name in sys.modules:
            module = sys.modules[module_name]
        else:
            spec = importlib.util.spec_from_file_location(module_name, PROJECT_ROOT / path)
            if spec is None or spec.loader is None:
                raise ImportError(f"{self.name}: cannot load entrypoint {self.entrypoint}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        candidate = getattr(module, function)
        if not isinstance(candidate, Flow):
            raise TypeError(f"{self.name}: {self.entrypoint} is not a Prefect flow")
        return candidate


def load_catalog(path: Path = PREFECT_YAML) -> list[DeploymentSpec]:
    document = yaml.safe_load(path.read_text())
    specs = []
    for entry in document.get("deployments") or []:
        specs.append(
            DeploymentSpec(
                name=entry["name"],
                entrypoint=entry["entrypoint"],
                description=(entry.get("description") or "").strip(),
                tags=tuple(entry.get("tags") or ()),
                parameters=dict(entry.get("parameters") or {}),
                schedules=tuple(entry.get("schedules") or ()),
                concurrency_limit=entry.get("concurrency_limit"),
                triggers=tuple(entry.get("triggers") or ()),
            )
        )
    return specs


def deployment_triggers(spec: DeploymentSpec) -> list[Any]:
    """The yaml's `triggers:` as `prefect deploy` reads them (a name each if none given):
    `serve` creates their automations too, owned by the deployment, replaced on restart."""
    from prefect.events import DeploymentTriggerTypes
    from pydantic import TypeAdapter

    adapter: TypeAdapter[Any] = TypeAdapter(DeploymentTriggerTypes)
    return [
        adapter.validate_python({"name": f"{spec.name}__automation_{i}", **trigger})
        for i, trigger in enumerate(spec.triggers, start=1)
    ]


def to_runner_deployment(spec: DeploymentSpec) -> Any:
    """A `RunnerDeployment` for `prefect.serve`, carrying the yaml's schedules, limits and
    triggers."""
    from prefect.client.schemas.schedules import construct_schedule

    schedules = [
        {
            "schedule": construct_schedule(**{k: v for k, v in s.items() if k != "active"}),
            "active": s.get("active", True),
        }
        for s in spec.schedules
    ]
    return spec.load_flow().to_deployment(
        name=spec.name,
        description=spec.description or None,
        tags=list(spec.tags),
        parameters=spec.parameters,
        schedules=schedules or None,
        concurrency_limit=spec.concurrency_limit,
        triggers=deployment_triggers(spec) or None,
    )
