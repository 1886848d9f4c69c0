"""The production files say what they must and agree with each other and with the code.

No Docker engine, Helm or cluster here: the Dockerfile is parsed (what it copies exists,
the code lands where prefect.yaml pulls it from, the lock is what it installs); the Helm
values validate against the official charts' own values.schema.json (copied into
deploy/helm/chart-schemas/ from PrefectHQ/prefect-helm) and name only keys the charts
know; the base job template is rendered with Prefect's own templating.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from jsonschema import Draft7Validator
from prefect.utilities.templating import apply_values, find_placeholders
from pydantic import SecretStr

from bridge.app import RULES_DIR, BridgeSettings
from runbook.settings import ENV_PREFIX, PlatformSettings
from sandbox.services.alertmanager import ALERTMANAGER_CONFIG
from tasks.prometheus import ALERT_RULES_DIR

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SCHEMAS = DEPLOY / "helm" / "chart-schemas"


def _yaml_docs(path: Path) -> dict[str, Any]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def _locked_version(package: str) -> str:
    match = re.search(rf"^{package}==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M)
    assert match, f"{package} is not in requirements.lock"
    return match.group(1)


# --- the image -------------------------------------------------------------------------


def test_image_copies_only_what_exists_and_puts_the_code_where_prefect_yaml_pulls_it():
    instructions = _dockerfile()
    workdir = [args for op, args in instructions if op == "WORKDIR"]
    pull = yaml.safe_load((ROOT / "prefect.yaml").read_text())["pull"]
    assert workdir == [pull[0]["prefect.deployments.steps.set_working_directory"]["directory"]]
    assert workdir == ["/opt/runbooks"]
    for op, args in instructions:
        if op == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
    copied = {
        Path(s).parts[0] for op, a in instructions if op == "COPY" for s in shlex.split(a)[:-1]
    }
    # Every package a flow imports from is in the image (import-linter's root packages),
    # and the alert bridge.
    assert {"flows", "tasks", "runbook", "deployments", "bridge", "requirements.lock"} <= copied


def test_image_holds_the_files_the_code_reads_at_run_time():
    """The rules directory is read, not imported: without it the bridge refuses to start
    and incident-response cannot check the alert's own query."""
    copied = {shlex.split(args)[-1].rstrip("/") for op, args in _dockerfile() if op == "COPY"}
    for read in (ALERT_RULES_DIR, RULES_DIR):
        assert read.relative_to(ROOT).as_posix() in copied, f"{read} is not in the image"


def test_image_installs_exactly_the_lock_with_the_python_the_project_requires():
    instructions = _dockerfile()
    [base] = [args for op, args in instructions if op == "FROM"]
    assert base.startswith("python:3.11-")  # pyproject: requires-python >=3.11,<3.12
    installs = [args for op, args in instructions if op == "RUN" and "pip install" in args]
    assert installs == ["pip install --no-cache-dir --no-deps -r requirements.lock"]
    # pg_dump must match the PostgreSQL server's major version (15).
    env = " ".join(args for op, args in instructions if op in ("ENV", "RUN"))
    assert "postgresql-client-15" in env and "/usr/lib/postgresql/15/bin" in env
    assert any(op == "USER" and args != "root" for op, args in instructions)


def test_image_leaves_tests_and_sandbox_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"tests/", "sandbox/", ".venv/", ".git/"} <= set(ignored)


# --- the official Helm charts' values ---------------------------------------------------


def _unknown_keys(ours: Any, defaults: Any, path: str = "") -> list[str]:
    """Keys we set that the chart's values.yaml does not have (a typo the charts' schemas
    let through: they allow additional properties). Free-form maps ({} or [] defaults)
    and lists are not descended into."""
    if not isinstance(ours, dict) or not isinstance(defaults, dict) or not defaults:
        return []
    unknown = []
    for key, value in ours.items():
        if key not in defaults:
            unknown.append(f"{path}{key}")
        else:
            unknown += _unknown_keys(value, defaults[key], f"{path}{key}.")
    return unknown


@pytest.mark.parametrize("chart", ["prefect-server", "prefect-worker"])
def test_values_validate_against_the_official_charts_schema(chart):
    values = yaml.safe_load((DEPLOY / "helm" / f"{chart}.values.yaml").read_text())
    schema = json.loads((SCHEMAS / f"{chart}.values.schema.json").read_text())
    errors = [f"{list(e.path)}: {e.message}" for e in Draft7Validator(schema).iter_errors(values)]
    assert errors == []
    defaults = yaml.safe_load((SCHEMAS / f"{chart}.values.yaml").read_text())
    assert _unknown_keys(values, defaults) == []


def test_the_schema_check_would_catch_a_mistake():
    schema = json.loads((SCHEMAS / "prefect-worker.values.schema.json").read_text())
    bad = {"worker": {"apiConfig": "selfhosted", "config": {"workPool": 7}}}
    assert len(list(Draft7Validator(schema).iter_errors(bad))) == 2
    defaults = yaml.safe_load((SCHEMAS / "prefect-worker.values.yaml").read_text())
    assert _unknown_keys({"worker": {"confg": {}}}, defaults) == ["worker.confg"]


def test_server_runs_on_postgresql_and_the_worker_serves_the_runbooks_pool():
    server = yaml.safe_load((DEPLOY / "helm" / "prefect-server.values.yaml").read_text())
    assert server["postgresql"]["enabled"] is False and server["sqlite"]["enabled"] is False
    assert server["externalDatabase"]["existingSecret"]
    assert server["externalDatabase"]["connectionStringSecretKey"]
    worker = yaml.safe_load((DEPLOY / "helm" / "prefect-worker.values.yaml").read_text())
    pools = {
        d["work_pool"]["name"]
        for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    }
    assert pools == {worker["worker"]["config"]["workPool"]} == {"runbooks"}
    assert worker["worker"]["config"]["type"] == "kubernetes"
    # The Prefect the charts run is the Prefect the runbooks are locked to.
    prefect = _locked_version("prefect")
    assert server["global"]["prefect"]["image"]["prefectTag"].startswith(f"{prefect}-")
    assert worker["worker"]["image"]["prefectTag"].startswith(f"{prefect}-")


# --- the base job template --------------------------------------------------------------


def _template() -> dict[str, Any]:
    return json.loads((DEPLOY / "prefect" / "base-job-template.json").read_text())


def test_every_placeholder_of_the_job_template_is_a_declared_variable():
    template = _template()
    used = {p.name for p in find_placeholders(json.dumps(template["job_configuration"]))}
    declared = set(template["variables"]["properties"])
    assert used - declared == set()
    assert declared - used == set()


def _rendered_job() -> dict[str, Any]:
    template = _template()
    defaults = {
        name: spec["default"]
        for name, spec in template["variables"]["properties"].items()
        if "default" in spec
    }
    values = {**defaults, "name": "runbook", "command": "prefect flow-run execute", "env": {}}
    return apply_values(template["job_configuration"], values)["job_manifest"]


def test_flow_run_jobs_run_as_the_least_privilege_account_with_credentials_from_a_secret():
    job = _rendered_job()
    pod = job["spec"]["template"]["spec"]
    rbac = _yaml_docs(DEPLOY / "kubernetes" / "rbac.yaml")
    account = rbac["ServiceAccount"]["metadata"]
    assert pod["serviceAccountName"] == account["name"]
    assert job["metadata"]["namespace"] == account["namespace"]
    [container] = pod["containers"]
    secret = _yaml_docs(DEPLOY / "kubernetes" / "runbooks-credentials.example.yaml")["Secret"]
    settings = _yaml_docs(DEPLOY / "kubernetes" / "runbooks-settings.yaml")["ConfigMap"]
    assert container["envFrom"] == [
        {"configMapRef": {"name": settings["metadata"]["name"]}},
        {"secretRef": {"name": secret["metadata"]["name"]}},
    ]
    assert (
        secret["metadata"]["namespace"] == settings["metadata"]["namespace"] == account["namespace"]
    )
    assert set(container["resources"]) == {"requests", "limits"}
    assert all(container["resources"][k]["memory"] for k in ("requests", "limits"))
    assert pod["securityContext"]["runAsNonRoot"] is True


def _secret_variables() -> set[str]:
    return {
        f"{ENV_PREFIX}{name.upper()}"
        for name, field in PlatformSettings.model_fields.items()
        if SecretStr in (getattr(field.annotation, "__args__", None) or (field.annotation,))
    }


def test_settings_configmap_is_valid_production_settings_without_a_secret(monkeypatch):
    data = _yaml_docs(DEPLOY / "kubernetes" / "runbooks-settings.yaml")["ConfigMap"]["data"]
    assert data["RUNBOOK_ENVIRONMENT"] == "production"  # explicit: it has no default
    assert not set(data) & _secret_variables()
    for name, value in data.items():
        monkeypatch.setenv(name, value)
    known = {f"{ENV_PREFIX}{n.upper()}" for n in PlatformSettings.model_fields}
    assert set(data) <= known
    assert PlatformSettings().environment == "production"


def test_credentials_secret_holds_only_credentials():
    keys = set(
        _yaml_docs(DEPLOY / "kubernetes" / "runbooks-credentials.example.yaml")["Secret"][
            "stringData"
        ]
    )
    assert keys - {"PREFECT_API_AUTH_STRING"} == _secret_variables()


def test_flow_run_jobs_send_heartbeats_so_a_lost_node_is_found():
    # The worker passes this default env to every flow-run Job: without heartbeats, a run
    # whose node is lost stays Running and reconcile's heartbeat trigger never fires.
    env = _template()["variables"]["properties"]["env"]["default"]
    assert env == {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}


# --- alerts: Alertmanager → the alert bridge → Prefect ---------------------------------


def test_alertmanager_posts_to_the_bridges_service_and_the_bridge_to_the_workers_server(
    monkeypatch,
):
    bridge = _yaml_docs(DEPLOY / "kubernetes" / "alert-bridge.yaml")
    service, deployment = bridge["Service"], bridge["Deployment"]
    [receiver] = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())["receivers"]
    [webhook] = receiver["webhook_configs"]
    url = urlsplit(webhook["url"])
    [port] = service["spec"]["ports"]
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    assert url.hostname == f"{name}.{namespace}.svc.cluster.local"
    assert (url.port, url.path) == (port["port"], "/alertmanager")  # bridge/app.py's route

    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    [container] = pod["containers"]
    assert container["command"] == ["python", "-m", "bridge"]
    [listening] = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    env = {e["name"]: e for e in container["env"]}
    for variable in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING"):
        monkeypatch.delenv(variable, raising=False)
    for variable, entry in env.items():
        monkeypatch.setenv(variable, entry.get("value", "from the secret"))
    settings = BridgeSettings()
    assert settings.port == listening["containerPort"] and settings.host == "0.0.0.0"
    assert settings.prefect_api_auth_string is not None

    # The same server, credential and image as the worker and its flow runs.
    worker = yaml.safe_load((DEPLOY / "helm" / "prefect-worker.values.yaml").read_text())
    server = worker["worker"]["selfHostedServerApiConfig"]
    assert str(settings.prefect_api_url) == server["apiUrl"]
    secret = env["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] == server["basicAuth"]["existingSecret"]
    image = _template()["variables"]["properties"]["image"]["default"]
    assert container["image"] == image
    assert pod["securityContext"]["runAsNonRoot"] is True
