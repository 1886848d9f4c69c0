"""The release runbooks' decisions on literal data: images, revisions, bounds, the HPA,
the migration Job. No servers, no Prefect."""

from __future__ import annotations

import copy

import pytest

from runbook.decisions.deployment import main_container
from runbook.decisions.migrations import (
    alembic_current,
    applied_migrations,
    maintenance_mode_of,
    migration_job_body,
    migration_job_name,
)
from runbook.decisions.refusal import Refused
from runbook.decisions.release import (
    choose_rollback,
    deploy_components,
    history_rows,
    image_repository,
    image_tag,
    plan_images,
    record,
    recorded_revision_now,
    with_tag,
)
from runbook.decisions.scaling import check_hpa_bounds, hpa_body, hpa_drift, judge_scale
from runbook.report import StepTimer, markdown_table
from runbook.settings import database_name_of


def template(image, name="backend"):
    return {
        "metadata": {"labels": {"app": name}},
        "spec": {"containers": [{"name": name, "image": image}]},
    }


def deployment(image="complianceagent/backend:1.4.2", revision=3, name="backend", **spec):
    return {
        "metadata": {
            "name": name,
            "annotations": {"deployment.kubernetes.io/revision": str(revision)},
        },
        "spec": {"replicas": 3, "template": template(image, name), **spec},
    }


def revision(number, image, name="backend", cause=""):
    return {
        "revision": number,
        "images": {name: image},
        "change_cause": cause,
        "created": f"2026-11-0{number}T10:00:00Z",
        "replicaset": f"{name}-rs{number}",
        "template": template(image, name),
    }


HISTORY = [
    revision(1, "complianceagent/backend:1.4.0"),
    revision(2, "complianceagent/backend:1.4.1", cause="deploy 1.4.1"),
    revision(3, "complianceagent/backend:1.4.2"),
]


# --- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "repository", "tag"),
    [
        ("complianceagent/backend:1.4.2", "complianceagent/backend", "1.4.2"),
        ("registry:5000/ca/backend:1.4.2", "registry:5000/ca/backend", "1.4.2"),
        ("registry:5000/ca/backend", "registry:5000/ca/backend", "latest"),
        ("ca/backend:1.4.2@sha256:abc", "ca/backend", "1.4.2"),
    ],
)
def test_image_repository_and_tag(image, repository, tag):
    assert image_repository(image) == repository
    assert image_tag(image) == tag


def test_with_tag_keeps_the_repository_and_refuses_a_bad_tag():
    assert with_tag("registry:5000/ca/backend:1.4.2", "1.5.0") == "registry:5000/ca/backend:1.5.0"
    with pytest.raises(Refused, match=r"^version: 'x; rm' is not an image tag"):
        with_tag("ca/backend:1", "x; rm")


def test_main_container_is_the_one_named_like_the_deployment_else_the_only_one():
    two = deployment()
    two["spec"]["template"]["spec"]["containers"].insert(0, {"name": "proxy", "image": "envoy"})
    assert main_container(two)["name"] == "backend"
    other = deployment()
    other["spec"]["template"]["spec"]["containers"][0]["name"] = "api"
    assert main_container(other)["name"] == "api"
    other["spec"]["template"]["spec"]["containers"].append({"name": "proxy", "image": "envoy"})
    with pytest.raises(ValueError, match="none is named 'backend'"):
        main_container(other)


# --- deploy ---------------------------------------------------------------------------------


def test_workers_follow_the_backend_and_the_order_is_backend_workers_frontend():
    assert deploy_components(["frontend", "backend"], True) == [
        "backend",
        "celery-workers",
        "frontend",
    ]
    assert deploy_components(["backend"], False) == ["backend"]
    assert deploy_components(["frontend"], True) == ["frontend"]


def test_record_takes_the_current_revisions_template_and_the_deadline():
    recorded = record("backend", deployment(progressDeadlineSeconds=120), HISTORY)
    assert (recorded.image, recorded.revision, recorded.container) == (
        "complianceagent/backend:1.4.2",
        3,
        "backend",
    )
    assert recorded.template == HISTORY[2]["template"]
    assert recorded.progress_deadline_seconds == 120
    assert record("backend", deployment(), []).progress_deadline_seconds == 600  # k8s default


def test_plan_images_marks_components_already_at_the_version():
    [same] = plan_images("1.4.2", [record("backend", deployment(), HISTORY)])
    assert not same.changes
    [new] = plan_images("1.5.0", [record("backend", deployment(), HISTORY)])
    assert new.changes and new.target_image == "complianceagent/backend:1.5.0"


# --- rollback -------------------------------------------------------------------------------


def test_rollback_without_a_revision_takes_the_previous_one():
    choice = choose_rollback(deployment(), HISTORY, None)
    assert (choice.current["revision"], choice.target["revision"]) == (3, 2)
    assert not choice.already_there


def test_rollback_to_a_given_revision():
    assert choose_rollback(deployment(), HISTORY, 1).target["images"] == {
        "backend": "complianceagent/backend:1.4.0"
    }


def test_rollback_to_a_missing_revision_is_refused_listing_the_existing_ones():
    with pytest.raises(Refused) as refused:
        choose_rollback(deployment(), HISTORY, 7)
    assert refused.value.field == "to_revision"
    assert "revision 7 is not in the rollout history of deployment/backend" in str(refused.value)
    assert "existing revisions: 1, 2, 3" in str(refused.value)


def test_rollback_with_no_older_revision_is_refused():
    with pytest.raises(Refused, match=r"^to_revision: .*no revision before the current one"):
        choose_rollback(deployment(revision=1), HISTORY[:1], None)


def test_rollback_to_the_current_template_is_already_there():
    assert choose_rollback(deployment(), HISTORY, 3).already_there


def test_history_rows_newest_first_with_the_current_marked():
    rows = history_rows(HISTORY, 3)
    assert [r["revision"] for r in rows] == [3, 2, 1]
    assert rows[0]["current"] == "✓" and rows[1]["current"] == ""
    assert rows[1]["change_cause"] == "deploy 1.4.1"
    assert rows[2]["images"] == "backend=complianceagent/backend:1.4.0"


# --- scaling --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("component", "replicas", "approval"),
    [
        ("backend", 5, False),
        ("backend", 20, False),
        ("backend", 1, True),
        ("backend", 0, True),
        ("frontend", 2, False),
        ("celery-workers", 1, False),
        ("celery-workers", 0, True),
    ],
)
def test_scale_needs_approval_below_the_floor_or_to_zero(component, replicas, approval):
    assert judge_scale(component, replicas).needs_approval is approval


@pytest.mark.parametrize(
    ("component", "replicas", "field", "text"),
    [
        ("backend", 21, "replicas", "above the ceiling of 20 for backend"),
        ("frontend", 11, "replicas", "above the ceiling of 10 for frontend"),
        ("backend", -1, "replicas", "negative"),
        ("postgres", 1, "deployment", "'postgres' is not one of"),
    ],
)
def test_scale_out_of_bounds_is_refused_naming_the_field(component, replicas, field, text):
    with pytest.raises(Refused) as refused:
        judge_scale(component, replicas)
    assert refused.value.field == field
    assert text in str(refused.value)


def test_hpa_body_is_the_runbooks():
    body = hpa_body("backend", 2, 20, 70)
    assert body["apiVersion"] == "autoscaling/v2"
    assert body["metadata"]["name"] == "backend-hpa"
    assert body["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "backend",
    }
    assert (body["spec"]["minReplicas"], body["spec"]["maxReplicas"]) == (2, 20)
    assert body["spec"]["metrics"] == [
        {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": 70},
            },
        }
    ]


def test_hpa_drift_ignores_what_the_server_adds():
    desired = hpa_body("backend", 2, 20, 70)
    live = copy.deepcopy(desired)
    live["spec"]["behavior"] = {"scaleDown": {"stabilizationWindowSeconds": 300}}
    live["status"] = {"currentReplicas": 3}
    assert hpa_drift(desired, live) == []
    live["spec"]["maxReplicas"] = 10
    assert hpa_drift(desired, live) == ["maxReplicas"]
    assert hpa_drift(desired, None) == ["scaleTargetRef", "minReplicas", "maxReplicas", "metrics"]


@pytest.mark.parametrize(
    ("low", "high", "field"),
    [(1, 20, "min_replicas"), (2, 21, "max_replicas"), (10, 5, "min_replicas")],
)
def test_hpa_bounds_are_refused_naming_the_field(low, high, field):
    with pytest.raises(Refused) as refused:
        check_hpa_bounds("backend", low, high)
    assert refused.value.field == field


# --- migrations -----------------------------------------------------------------------------

BACKEND = {
    "metadata": {"name": "backend", "namespace": "complianceagent"},
    "spec": {
        "template": {
            "metadata": {"labels": {"app": "backend"}},
            "spec": {
                "serviceAccountName": "backend",
                "imagePullSecrets": [{"name": "registry"}],
                "volumes": [
                    {"name": "config", "configMap": {"name": "backend-config"}},
                    {"name": "cache", "emptyDir": {}},
                ],
                "containers": [
                    {
                        "name": "backend",
                        "image": "complianceagent/backend:1.4.2",
                        "env": [
                            {"name": "MAINTENANCE_MODE", "value": "true"},
                            {
                                "name": "DATABASE_URL",
                                "valueFrom": {"secretKeyRef": {"name": "database", "key": "url"}},
                            },
                        ],
                        "envFrom": [{"secretRef": {"name": "api-key"}}],
                        "volumeMounts": [{"name": "config", "mountPath": "/app/config"}],
                        "livenessProbe": {"httpGet": {"path": "/health/live", "port": 8000}},
                        "ports": [{"containerPort": 8000}],
                    }
                ],
            },
        }
    },
}


def test_migration_job_runs_the_backend_image_env_and_envfrom():
    job = migration_job_body(BACKEND, "backend-migrate-1a2b3c4d", 1800)
    assert job["metadata"]["name"] == "backend-migrate-1a2b3c4d"
    spec = job["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"]) == (0, 1800)
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "backend"
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["volumes"] == [{"name": "config", "configMap": {"name": "backend-config"}}]
    [container] = pod["containers"]
    assert container["image"] == "complianceagent/backend:1.4.2"
    assert container["command"] == ["/bin/sh", "-c", "alembic upgrade head && alembic current"]
    assert container["workingDir"] == "/app"
    assert container["env"] == BACKEND["spec"]["template"]["spec"]["containers"][0]["env"]
    assert container["envFrom"] == [{"secretRef": {"name": "api-key"}}]
    assert "livenessProbe" not in container and "ports" not in container
    # The Deployment itself is not modified by building the Job.
    assert "command" not in BACKEND["spec"]["template"]["spec"]["containers"][0]


def test_migration_job_name_is_a_valid_unique_name():
    assert migration_job_name("backend", "1A2B3C4D-0000-4000-8000-000000000000") == (
        "backend-migrate-1a2b3c4d"
    )


def test_maintenance_mode_is_read_from_the_env():
    assert maintenance_mode_of(BACKEND)
    off = copy.deepcopy(BACKEND)
    off["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] = "false"
    assert not maintenance_mode_of(off)


LOGS = """--- backend-migrate-1a2b3c4d-xyzab
INFO  [alembic.runtime.migration] Context impl PostgresqlImpl.
INFO  [alembic.runtime.migration] Running upgrade 3f2a9c1d7e10 -> 8c41d5e2b6a9, add index
INFO  [alembic.runtime.migration] Running upgrade 8c41d5e2b6a9 -> a7e3f09b12c4, add policy
a7e3f09b12c4 (head)
"""


def test_alembic_current_and_applied_steps_are_read_from_the_logs():
    assert alembic_current(LOGS) == "a7e3f09b12c4 (head)"
    assert applied_migrations(LOGS) == [
        "3f2a9c1d7e10 -> 8c41d5e2b6a9, add index",
        "8c41d5e2b6a9 -> a7e3f09b12c4, add policy",
    ]
    assert alembic_current("Traceback (most recent call last):\nError\n") is None


# --- settings and report helpers ------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "name"),
    [
        ("postgresql://app:s3cret@db:5432/complianceagent?sslmode=require", "complianceagent"),
        ("postgresql://app@db", "app"),
        ("host=db dbname=ca_prod user=app password=x", "ca_prod"),
    ],
)
def test_database_name_comes_from_the_dsn(dsn, name):
    assert database_name_of(dsn) == name


def test_markdown_table_and_step_timer():
    assert markdown_table([{"a": 1, "b": "x|y"}]) == "| a | b |\n|---|---|\n| 1 | x\\|y |"
    timer = StepTimer()
    with timer.step("ok"):
        pass
    with pytest.raises(RuntimeError), timer.step("boom"):
        raise RuntimeError("boom")
    assert [(s["step"], s["outcome"]) for s in timer.steps] == [
        ("ok", "ok"),
        ("boom", "failed: RuntimeError"),
    ]


def test_a_recorded_revision_renumbered_by_a_rollback_is_found_by_its_image():
    # The run recorded revision 1 (1.4.0); its own rollback brought 1.4.0 back as 4.
    renumbered = [*HISTORY[1:], revision(4, "complianceagent/backend:1.4.0")]
    assert recorded_revision_now(renumbered, 1, "complianceagent/backend:1.4.0") == 4
    assert recorded_revision_now(HISTORY, 1, "complianceagent/backend:1.4.0") == 1
    # Neither the number nor the image: left as recorded, for choose_rollback to refuse.
    assert recorded_revision_now(renumbered, 1, "complianceagent/backend:0.9") == 1
    assert recorded_revision_now(renumbered, 1, None) == 1
