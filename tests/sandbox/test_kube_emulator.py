"""Contract tests for the Kubernetes API emulator, through the official client only."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from sandbox.kube_emulator import KubeEmulator

CERTS = ("cert-manager.io", "v1")


@pytest.fixture(scope="module")
def emu() -> Iterator[KubeEmulator]:
    with KubeEmulator() as emulator:
        emulator.rollout_delay = emulator.job_delay = emulator.certificate_delay = 0.05
        yield emulator


@pytest.fixture(scope="module")
def api(emu: KubeEmulator) -> Iterator[client.ApiClient]:
    with client.ApiClient(client.Configuration(host=emu.url)) as api_client:
        yield api_client


@pytest.fixture
def ns() -> str:
    """A fresh namespace per test: one emulator serves the whole module."""
    return f"t-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def apps(api: client.ApiClient) -> client.AppsV1Api:
    return client.AppsV1Api(api)


@pytest.fixture
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def batch(api: client.ApiClient) -> client.BatchV1Api:
    return client.BatchV1Api(api)


@pytest.fixture
def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def deployment(name: str, image: str = "web:1", replicas: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [
                        {
                            "name": "app",
                            "image": image,
                            "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                        },
                        {"name": "sidecar", "image": "proxy:1"},
                    ]
                },
            },
        },
    }


def job(name: str) -> dict[str, Any]:
    container = {"name": "main", "image": "tools:1", "command": ["migrate"]}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [container]}}},
    }


def certificate(ns: str, not_after: str) -> dict[str, Any]:
    return {
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": {"name": "api-tls", "namespace": ns},
        "spec": {
            "secretName": "api-tls",
            "dnsNames": ["api.example.com"],
            "duration": "2160h",
            "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"},
        },
        "status": {
            "notAfter": not_after,
            "revision": 4,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}],
        },
    }


def image_patch(image: str) -> dict[str, Any]:
    return {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": image}]}}}}


def condition(obj: Any, kind: str) -> Any:
    return next((c for c in obj.status.conditions or [] if c.type == kind), None)


def watch_until(
    list_fn: Callable[..., Any], *args: Any, name: str, done: Callable[[Any], bool]
) -> Any:
    """The first watched object satisfying `done`; fails after 5 s."""
    stream = watch.Watch().stream(
        list_fn, *args, field_selector=f"metadata.name={name}", timeout_seconds=5
    )
    for event in stream:
        if done(event["object"]):
            stream.close()
            return event["object"]
    pytest.fail(f"{name} never reached the expected state")


def eventually(check: Callable[[], Any], timeout: float = 3.0) -> Any:
    give_up = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < give_up, "condition never held"
        time.sleep(0.02)
    return result


def rollout_finished(generation: int) -> Callable[[Any], bool]:
    def done(d: Any) -> bool:
        progressing = condition(d, "Progressing") if d.status else None
        return (
            d.status.observed_generation == generation
            and progressing is not None
            and progressing.reason in ("NewReplicaSetAvailable", "ProgressDeadlineExceeded")
        )

    return done


def replica_sets(apps: client.AppsV1Api, ns: str) -> dict[int, Any]:
    items = apps.list_namespaced_replica_set(ns).items
    return {int(rs.metadata.annotations["deployment.kubernetes.io/revision"]): rs for rs in items}


# --- basic verbs -------------------------------------------------------------------------


def test_create_answers_201_duplicate_409_and_missing_404(apps: client.AppsV1Api, ns: str) -> None:
    created, status, _ = apps.create_namespaced_deployment_with_http_info(ns, deployment("web"))
    assert status == 201
    meta = created.metadata
    assert meta.uid and meta.generation == 1 and meta.namespace == ns
    assert int(meta.resource_version) > 0 and meta.creation_timestamp is not None

    with pytest.raises(ApiException) as duplicate:
        apps.create_namespaced_deployment(ns, deployment("web"))
    assert duplicate.value.status == 409
    assert json.loads(duplicate.value.body)["reason"] == "AlreadyExists"

    with pytest.raises(ApiException) as missing:
        apps.read_namespaced_deployment("nope", ns)
    assert missing.value.status == 404
    assert json.loads(missing.value.body)["message"] == 'deployments.apps "nope" not found'


def test_label_and_field_selectors(core: client.CoreV1Api, ns: str) -> None:
    for name, labels in [
        ("a", {"app": "web", "tier": "front"}),
        ("b", {"app": "web", "tier": "cache"}),
        ("c", {"app": "db", "legacy": "yes"}),
    ]:
        core.create_namespaced_config_map(ns, {"metadata": {"name": name, "labels": labels}})

    def names(**kwargs: Any) -> list[str]:
        return [cm.metadata.name for cm in core.list_namespaced_config_map(ns, **kwargs).items]

    assert names(label_selector="app=web") == ["a", "b"]
    assert names(label_selector="app=web,tier!=cache") == ["a"]
    assert names(label_selector="tier in (cache,other)") == ["b"]
    assert names(label_selector="legacy") == ["c"]
    assert names(label_selector="!legacy,app") == ["a", "b"]
    assert names(field_selector="metadata.name=b") == ["b"]
    everywhere = core.list_config_map_for_all_namespaces(label_selector="app=db")
    assert [cm.metadata.namespace for cm in everywhere.items] == [ns]
    assert int(everywhere.metadata.resource_version) > 0


# --- patches -----------------------------------------------------------------------------


def test_strategic_merge_patch_merges_containers_and_env_by_name(
    apps: client.AppsV1Api, ns: str
) -> None:
    apps.create_namespaced_deployment(ns, deployment("web"))

    patched = apps.patch_namespaced_deployment("web", ns, image_patch("web:2"))
    containers = {c.name: c for c in patched.spec.template.spec.containers}
    assert containers["app"].image == "web:2" and containers["sidecar"].image == "proxy:1"
    assert [(e.name, e.value) for e in containers["app"].env] == [("A", "1"), ("B", "2")]

    set_env = {"name": "app", "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]}
    patched = apps.patch_namespaced_deployment(
        "web", ns, {"spec": {"template": {"spec": {"containers": [set_env]}}}}
    )
    app = patched.spec.template.spec.containers[0]
    assert [(e.name, e.value) for e in app.env] == [("A", "1"), ("B", "3"), ("C", "4")]
    assert patched.metadata.generation == 3

    unset = {
        "name": "app",
        "env": [{"name": "A", "$patch": "delete"}, {"name": "C", "value": None}],
    }
    drop_sidecar = {"name": "sidecar", "$patch": "delete"}
    patched = apps.patch_namespaced_deployment(
        "web", ns, {"spec": {"template": {"spec": {"containers": [unset, drop_sidecar]}}}}
    )
    (app,) = patched.spec.template.spec.containers
    assert [(e.name, e.value) for e in app.env] == [("B", "3"), ("C", None)]


def test_json_patch(apps: client.AppsV1Api, ns: str) -> None:
    apps.create_namespaced_deployment(ns, deployment("web"))
    patched = apps.patch_namespaced_deployment(
        "web",
        ns,
        [
            {"op": "test", "path": "/spec/replicas", "value": 2},
            {"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "web:3"},
            {"op": "add", "path": "/metadata/annotations", "value": {"owner": "ops"}},
            {"op": "remove", "path": "/spec/template/spec/containers/1"},
        ],
    )
    assert [c.image for c in patched.spec.template.spec.containers] == ["web:3"]
    assert patched.metadata.annotations["owner"] == "ops"

    with pytest.raises(ApiException) as failed:
        apps.patch_namespaced_deployment(
            "web", ns, [{"op": "test", "path": "/spec/replicas", "value": 9}]
        )
    assert failed.value.status == 422


def test_merge_patch_on_a_certificate(
    emu: KubeEmulator, custom: client.CustomObjectsApi, ns: str
) -> None:
    emu.seed(certificate(ns, "2030-01-01T00:00:00Z"))
    patched = custom.patch_namespaced_custom_object(
        *CERTS,
        ns,
        "certificates",
        "api-tls",
        {
            "metadata": {"labels": {"team": "ops"}},
            "spec": {"renewBefore": "360h", "duration": None},
        },
    )
    assert patched["metadata"]["labels"] == {"team": "ops"}
    assert patched["spec"]["renewBefore"] == "360h" and "duration" not in patched["spec"]
    assert patched["spec"]["dnsNames"] == ["api.example.com"]
    assert patched["metadata"]["generation"] == 2


def test_dry_run_changes_nothing(emu: KubeEmulator, apps: client.AppsV1Api, ns: str) -> None:
    before = apps.create_namespaced_deployment(ns, deployment("web"))
    emu.clear_writes()
    preview = apps.patch_namespaced_deployment("web", ns, image_patch("web:9"), dry_run="All")
    assert preview.spec.template.spec.containers[0].image == "web:9"
    after = apps.read_namespaced_deployment("web", ns)
    assert after.spec.template.spec.containers[0].image == "web:1"
    assert after.metadata.generation == before.metadata.generation
    assert [w.dry_run for w in emu.writes] == [True]


# --- scale, rollouts, rollbacks ----------------------------------------------------------


def test_scale_subresource(apps: client.AppsV1Api, ns: str) -> None:
    apps.create_namespaced_deployment(ns, deployment("web"))
    scale = apps.patch_namespaced_deployment_scale("web", ns, {"spec": {"replicas": 5}})
    assert scale.kind == "Scale" and scale.spec.replicas == 5

    read = apps.read_namespaced_deployment_scale("web", ns)
    assert read.spec.replicas == 5 and read.status.selector == "app=web"
    web = apps.read_namespaced_deployment("web", ns)
    assert web.spec.replicas == 5 and web.metadata.generation == 2
    done = watch_until(apps.list_namespaced_deployment, ns, name="web", done=rollout_finished(2))
    assert done.status.ready_replicas == 5
    (only,) = replica_sets(apps, ns).values()  # a scale makes no new ReplicaSet
    assert only.spec.replicas == 5


def test_new_template_is_revision_2_and_rollback_revives_revision_1_as_3(
    apps: client.AppsV1Api, ns: str
) -> None:
    apps.create_namespaced_deployment(ns, deployment("web", image="web:1"))
    first = replica_sets(apps, ns)[1]
    assert first.metadata.owner_references[0].name == "web"
    assert first.metadata.labels["pod-template-hash"] in first.metadata.name

    apps.patch_namespaced_deployment(
        "web", ns, {"metadata": {"annotations": {"kubernetes.io/change-cause": "to web:2"}}}
    )
    apps.patch_namespaced_deployment("web", ns, image_patch("web:2"))
    by_revision = replica_sets(apps, ns)
    assert sorted(by_revision) == [1, 2]
    assert by_revision[2].metadata.annotations["kubernetes.io/change-cause"] == "to web:2"
    assert by_revision[1].spec.replicas == 0 and by_revision[2].spec.replicas == 2

    apps.patch_namespaced_deployment("web", ns, image_patch("web:1"))  # like `rollout undo`
    by_revision = replica_sets(apps, ns)
    assert sorted(by_revision) == [2, 3]
    assert by_revision[3].metadata.name == first.metadata.name
    assert by_revision[3].spec.replicas == 2 and by_revision[2].spec.replicas == 0
    web = apps.read_namespaced_deployment("web", ns)
    assert web.metadata.annotations["deployment.kubernetes.io/revision"] == "3"


def test_revision_history_limit_prunes_the_oldest_replicasets(
    apps: client.AppsV1Api, ns: str
) -> None:
    body = deployment("web")
    body["spec"]["revisionHistoryLimit"] = 1
    apps.create_namespaced_deployment(ns, body)
    for version in (2, 3, 4):
        apps.patch_namespaced_deployment("web", ns, image_patch(f"web:{version}"))
    assert sorted(replica_sets(apps, ns)) == [3, 4]


def test_rollout_completes_and_a_watch_sees_it(
    emu: KubeEmulator, apps: client.AppsV1Api, ns: str
) -> None:
    emu.seed({**deployment("web"), "metadata": {"name": "web", "namespace": ns}})
    seeded = apps.read_namespaced_deployment("web", ns)
    assert condition(seeded, "Available").status == "True" and seeded.status.ready_replicas == 2

    patched = apps.patch_namespaced_deployment("web", ns, image_patch("web:2"))
    done = watch_until(
        apps.list_namespaced_deployment,
        ns,
        name="web",
        done=rollout_finished(patched.metadata.generation),
    )
    assert condition(done, "Progressing").reason == "NewReplicaSetAvailable"
    assert done.status.updated_replicas == done.status.available_replicas == 2
    completions = [e for e in emu.history if e.namespace == ns and e.what == "RolloutComplete"]
    assert len(completions) == 1


def test_failing_image_exceeds_the_progress_deadline(
    emu: KubeEmulator, apps: client.AppsV1Api, ns: str
) -> None:
    emu.seed({**deployment("web"), "metadata": {"name": "web", "namespace": ns}})
    emu.fail_rollouts_for_image(":broken")
    try:
        patched = apps.patch_namespaced_deployment("web", ns, image_patch("web:broken"))
        done = watch_until(
            apps.list_namespaced_deployment,
            ns,
            name="web",
            done=rollout_finished(patched.metadata.generation),
        )
    finally:
        emu.clear_rollout_failures()
    progressing = condition(done, "Progressing")
    assert (progressing.status, progressing.reason) == ("False", "ProgressDeadlineExceeded")
    assert done.status.unavailable_replicas > 0
    failures = [
        e for e in emu.history if e.namespace == ns and e.what == "ProgressDeadlineExceeded"
    ]
    assert abs(failures[0].at - progressing.last_transition_time.timestamp()) < 1.5


def test_statefulset_rolls_out(emu: KubeEmulator, apps: client.AppsV1Api, ns: str) -> None:
    spec = deployment("db")["spec"]
    emu.seed(
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "db", "namespace": ns},
            "spec": spec,
        }
    )
    assert apps.read_namespaced_stateful_set("db", ns).status.ready_replicas == 2
    apps.patch_namespaced_stateful_set("db", ns, image_patch("db:2"))
    done = watch_until(
        apps.list_namespaced_stateful_set,
        ns,
        name="db",
        done=lambda s: s.status.observed_generation == 2 and s.status.updated_replicas == 2,
    )
    assert done.status.current_revision == done.status.update_revision


def test_deleting_a_deployment_deletes_its_replicasets(apps: client.AppsV1Api, ns: str) -> None:
    apps.create_namespaced_deployment(ns, deployment("web"))
    apps.patch_namespaced_deployment("web", ns, image_patch("web:2"))
    assert len(replica_sets(apps, ns)) == 2
    apps.delete_namespaced_deployment("web", ns)
    assert replica_sets(apps, ns) == {}


# --- Jobs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "succeed", "outcome", "phase"),
    [("migrate-1", True, "Complete", "Succeeded"), ("backfill-1", False, "Failed", "Failed")],
)
def test_job_outcome_and_pod_logs(
    emu: KubeEmulator,
    batch: client.BatchV1Api,
    core: client.CoreV1Api,
    ns: str,
    name: str,
    succeed: bool,
    outcome: str,
    phase: str,
) -> None:
    emu.set_job_behaviour(name.split("-")[0], succeed=succeed, logs=f"{name} says hi\n")
    batch.create_namespaced_job(ns, job(name))
    done = watch_until(
        batch.list_namespaced_job,
        ns,
        name=name,
        done=lambda j: bool(j.status and j.status.conditions),
    )
    assert condition(done, outcome).status == "True"
    assert (done.status.succeeded, done.status.failed) == ((1, None) if succeed else (None, 1))
    if not succeed:
        assert condition(done, "Failed").reason == "BackoffLimitExceeded"

    pods = core.list_namespaced_pod(ns, label_selector=f"job-name={name}").items
    assert len(pods) == 1 and pods[0].metadata.name.startswith(f"{name}-")
    assert pods[0].status.phase == phase
    assert core.read_namespaced_pod_log(pods[0].metadata.name, ns) == f"{name} says hi\n"

    batch.delete_namespaced_job(name, ns, propagation_policy="Background")
    assert core.list_namespaced_pod(ns).items == []


# --- Certificates ------------------------------------------------------------------------


def x509_of(emu: KubeEmulator, ns: str, secret: str, key: str = "tls.crt") -> x509.Certificate:
    data = (emu.get("v1", "Secret", ns, secret) or {})["data"][key]
    return x509.load_pem_x509_certificate(base64.b64decode(data))


def test_a_seeded_ready_certificate_has_a_real_certificate_in_its_secret(
    emu: KubeEmulator, ns: str
) -> None:
    emu.seed(certificate(ns, "2030-01-01T00:00:00Z"))

    leaf, ca = x509_of(emu, ns, "api-tls"), x509_of(emu, ns, "api-tls", "ca.crt")
    assert leaf.not_valid_after_utc.isoformat() == "2030-01-01T00:00:00+00:00"
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 90  # spec.duration
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.example.com"]
    assert leaf.issuer == ca.subject
    leaf.verify_directly_issued_by(ca)  # signed by the sandbox CA
    assert ca.public_bytes(serialization.Encoding.PEM).decode() == emu.ca_certificate_pem


def test_deleting_the_secret_renews_the_certificate(
    emu: KubeEmulator, core: client.CoreV1Api, custom: client.CustomObjectsApi, ns: str
) -> None:
    emu.seed(certificate(ns, "2026-01-05T00:00:00Z"))
    core.delete_namespaced_secret("api-tls", ns)

    def renewed() -> dict[str, Any] | None:
        cert = custom.get_namespaced_custom_object(*CERTS, ns, "certificates", "api-tls")
        ready = next(c for c in cert["status"]["conditions"] if c["type"] == "Ready")
        return cert if ready["status"] == "True" and cert["status"]["revision"] == 5 else None

    cert = eventually(renewed)
    assert cert["status"]["notAfter"] > "2026-01-05T00:00:00Z"
    assert cert["status"]["renewalTime"] < cert["status"]["notAfter"]
    assert [c["type"] for c in cert["status"]["conditions"]] == ["Ready"]
    secret = core.read_namespaced_secret("api-tls", ns)
    assert secret.type == "kubernetes.io/tls" and {"tls.crt", "tls.key"} <= set(secret.data)
    assert [e.what for e in emu.history if e.namespace == ns][-1] == "CertificateReady"


def issuing_like_cmctl(custom: client.CustomObjectsApi, ns: str) -> None:
    """`cmctl renew`: Issuing=True added by a status update, the other conditions kept."""
    cert = custom.get_namespaced_custom_object(*CERTS, ns, "certificates", "api-tls")
    cert["status"]["conditions"].append(
        {"type": "Issuing", "status": "True", "reason": "ManuallyTriggered", "message": "renew"}
    )
    custom.replace_namespaced_custom_object_status(*CERTS, ns, "certificates", "api-tls", cert)


def test_issuing_condition_renews_the_certificate_like_cmctl(
    emu: KubeEmulator, custom: client.CustomObjectsApi, ns: str
) -> None:
    emu.seed(certificate(ns, "2026-01-05T00:00:00Z"))
    old_serial = x509_of(emu, ns, "api-tls").serial_number
    issuing_like_cmctl(custom, ns)

    # While it is issued the current certificate is still served: Ready stays True.
    during = emu.get("cert-manager.io/v1", "Certificate", ns, "api-tls")
    assert {c["type"]: c["status"] for c in during["status"]["conditions"]} == {
        "Ready": "True",
        "Issuing": "True",
    }
    cert = eventually(
        lambda: (
            (c := emu.get("cert-manager.io/v1", "Certificate", ns, "api-tls"))
            and c["status"]["revision"] == 5
            and c
        )
    )
    leaf = x509_of(emu, ns, "api-tls")
    assert leaf.serial_number != old_serial
    assert cert["status"]["notAfter"] == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert cert["status"]["notBefore"] == leaf.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    renewal = leaf.not_valid_after_utc - lifetime / 3  # 2/3 of the lifetime: no renewBefore
    assert cert["status"]["renewalTime"] == renewal.strftime("%Y-%m-%dT%H:%M:%SZ")
    request = emu.get("cert-manager.io/v1", "CertificateRequest", ns, "api-tls-5")
    assert request["metadata"]["annotations"]["cert-manager.io/certificate-revision"] == "5"
    ready = next(c for c in request["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Issued")
    issued = x509.load_pem_x509_certificate(base64.b64decode(request["status"]["certificate"]))
    assert issued.serial_number == leaf.serial_number
    csr = x509.load_pem_x509_csr(base64.b64decode(request["spec"]["request"]))
    assert csr.public_key() == leaf.public_key()


def test_a_failing_issuer_fails_the_request_and_keeps_the_secret(
    emu: KubeEmulator, custom: client.CustomObjectsApi, ns: str
) -> None:
    emu.seed(certificate(ns, "2026-01-05T00:00:00Z"))
    old_serial = x509_of(emu, ns, "api-tls").serial_number
    emu.fail_certificate_issuance("api-tls", "ACME order failed: rate limited")
    try:
        issuing_like_cmctl(custom, ns)
        request = eventually(
            lambda: (
                (r := emu.get("cert-manager.io/v1", "CertificateRequest", ns, "api-tls-5"))
                and any(c.get("reason") == "Failed" for c in r["status"]["conditions"])
                and r
            )
        )
    finally:
        emu.clear_certificate_failures()
    ready = next(c for c in request["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["message"]) == ("False", "ACME order failed: rate limited")
    cert = eventually(
        lambda: (
            (c := emu.get("cert-manager.io/v1", "Certificate", ns, "api-tls"))
            and c["status"].get("failedIssuanceAttempts") == 1
            and c
        )
    )
    conditions = {c["type"]: c for c in cert["status"]["conditions"]}
    assert conditions["Issuing"]["status"] == "False"
    assert conditions["Issuing"]["reason"] == "Failed"
    assert conditions["Ready"]["status"] == "True"
    assert cert["status"]["revision"] == 4 and cert["status"]["lastFailureTime"]
    assert x509_of(emu, ns, "api-tls").serial_number == old_serial  # the Secret is untouched


# --- faults, the write log, HPAs, discovery ----------------------------------------------


def test_injected_fault_answers_once_then_the_request_succeeds(
    emu: KubeEmulator, apps: client.AppsV1Api, ns: str
) -> None:
    apps.create_namespaced_deployment(ns, deployment("web"))
    emu.clear_writes()
    emu.inject_fault("PATCH", rf"/namespaces/{ns}/deployments/web$", status=503)
    with pytest.raises(ApiException) as unavailable:
        apps.patch_namespaced_deployment("web", ns, image_patch("web:2"))
    assert unavailable.value.status == 503
    assert json.loads(unavailable.value.body)["reason"] == "ServiceUnavailable"
    assert apps.read_namespaced_deployment("web", ns).metadata.generation == 1  # no effect
    assert emu.writes == []

    apps.patch_namespaced_deployment("web", ns, image_patch("web:2"))
    assert [(w.method, w.status) for w in emu.writes] == [("PATCH", 200)]


def test_write_log_has_client_writes_only(
    emu: KubeEmulator, apps: client.AppsV1Api, ns: str
) -> None:
    emu.clear_writes()
    apps.list_namespaced_deployment(ns)
    assert emu.writes == []

    apps.create_namespaced_deployment(ns, deployment("web"))
    watch_until(apps.list_namespaced_deployment, ns, name="web", done=rollout_finished(1))
    (write,) = emu.writes  # the ReplicaSet and status updates are the controller's
    assert (write.method, write.kind, write.namespace, write.name) == (
        "POST",
        "Deployment",
        ns,
        "web",
    )
    assert (write.status, write.subresource) == (201, None)
    assert write.body["spec"]["replicas"] == 2

    apps.patch_namespaced_deployment_scale("web", ns, {"spec": {"replicas": 3}})
    assert (emu.writes[-1].subresource, emu.writes[-1].name) == ("scale", "web")


def test_hpa_autoscaling_v2_create_replace_read(api: client.ApiClient, ns: str) -> None:
    hpas = client.AutoscalingV2Api(api)
    body = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "web"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "minReplicas": 2,
            "maxReplicas": 5,
        },
    }
    created = hpas.create_namespaced_horizontal_pod_autoscaler(ns, body)
    body["spec"]["maxReplicas"] = 8
    body["metadata"]["resourceVersion"] = created.metadata.resource_version
    replaced = hpas.replace_namespaced_horizontal_pod_autoscaler("web", ns, body)
    assert replaced.spec.max_replicas == 8
    read = hpas.read_namespaced_horizontal_pod_autoscaler("web", ns)
    assert read.spec.max_replicas == 8 and read.spec.min_replicas == 2
    assert read.status.desired_replicas == 0  # nothing to scale: no such Deployment

    with pytest.raises(ApiException) as stale:
        hpas.replace_namespaced_horizontal_pod_autoscaler("web", ns, body)
    assert stale.value.status == 409


def test_watch_resumes_from_a_resource_version_and_too_old_is_gone(api: client.ApiClient) -> None:
    with KubeEmulator(event_log_size=5) as small:
        core = client.CoreV1Api(client.ApiClient(client.Configuration(host=small.url)))
        first = core.create_namespaced_config_map("default", {"metadata": {"name": "cm-0"}})
        for i in range(1, 4):
            core.create_namespaced_config_map("default", {"metadata": {"name": f"cm-{i}"}})
        events = watch.Watch().stream(
            core.list_namespaced_config_map,
            "default",
            resource_version=first.metadata.resource_version,
            timeout_seconds=5,
        )
        seen = [next(events)["object"].metadata.name for _ in range(3)]
        events.close()
        assert seen == ["cm-1", "cm-2", "cm-3"]
        for i in range(4, 10):
            core.create_namespaced_config_map("default", {"metadata": {"name": f"cm-{i}"}})
        with pytest.raises(ApiException) as gone:
            list(
                watch.Watch().stream(
                    core.list_namespaced_config_map,
                    "default",
                    resource_version=first.metadata.resource_version,
                    timeout_seconds=1,
                )
            )
        assert gone.value.status == 410


def test_everything_served_deserializes_into_typed_models(
    emu: KubeEmulator, api: client.ApiClient, apps: client.AppsV1Api, core: client.CoreV1Api
) -> None:
    """Whatever earlier tests left behind must fit the client's strict models."""
    assert client.VersionApi(api).get_code().major == "1"
    assert client.CoreApi(api).get_api_versions().versions == ["v1"]
    groups = {g.name for g in client.ApisApi(api).get_api_versions().groups}
    assert {"apps", "batch", "autoscaling", "cert-manager.io"} <= groups
    assert "deployments/scale" in {r.name for r in apps.get_api_resources().resources}
    assert apps.list_deployment_for_all_namespaces().items
    assert apps.list_replica_set_for_all_namespaces().items
    apps.list_stateful_set_for_all_namespaces()
    client.BatchV1Api(api).list_job_for_all_namespaces()
    client.AutoscalingV2Api(api).list_horizontal_pod_autoscaler_for_all_namespaces()
    core.list_pod_for_all_namespaces()
    core.list_secret_for_all_namespaces()
    core.list_namespace()
