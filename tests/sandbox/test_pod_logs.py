"""Backend pods and their logs through the Kubernetes API, as `kubectl logs` reads them: the
emulator's ReplicaSet pods, the stand-in's real JSON request logs behind `pods/log`."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from sandbox.platform import NAMESPACE as NS
from sandbox.platform import Sandbox

RFC3339_NANO = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?Z) (.*)$")


@pytest.fixture
def clean(sandbox: Sandbox) -> Sandbox:
    sandbox.reset()
    return sandbox


@pytest.fixture
def core(sandbox: Sandbox) -> Iterator[client.CoreV1Api]:
    with client.ApiClient(client.Configuration(host=sandbox.kube.url)) as api:
        yield client.CoreV1Api(api)


@pytest.fixture
def http(sandbox: Sandbox) -> Iterator[httpx.Client]:
    assert sandbox.backend is not None
    with httpx.Client(base_url=sandbox.backend.url, timeout=10) as c:
        yield c


def backend_pods(core: client.CoreV1Api) -> list[str]:
    pods = core.list_namespaced_pod(NS, label_selector="app=backend").items
    return sorted(p.metadata.name for p in pods)


def log_of(core: client.CoreV1Api, pod: str, **options: object) -> list[str]:
    return str(core.read_namespaced_pod_log(pod, NS, **options)).splitlines()


def all_lines(core: client.CoreV1Api) -> list[dict]:
    return [json.loads(line) for pod in backend_pods(core) for line in log_of(core, pod)]


def test_backend_pods_are_the_current_replicasets_and_follow_its_replicas(clean, core):
    deployment = clean.kube.get("apps/v1", "Deployment", NS, "backend")
    assert deployment is not None
    replicasets = [
        rs
        for rs in clean.kube.list("apps/v1", "ReplicaSet", NS)
        if rs["metadata"]["ownerReferences"][0]["name"] == "backend" and rs["spec"]["replicas"]
    ]
    assert len(replicasets) == 1
    rs_name = replicasets[0]["metadata"]["name"]

    pods = core.list_namespaced_pod(NS, label_selector="app=backend").items
    assert len(pods) == deployment["spec"]["replicas"]
    for pod in pods:
        assert pod.metadata.name.startswith(f"{rs_name}-")
        assert pod.metadata.owner_references[0].name == rs_name
        assert pod.status.phase == "Running"
        assert [c.name for c in pod.spec.containers] == ["backend"]

    apps = client.AppsV1Api(core.api_client)
    before = deployment["spec"]["replicas"]
    try:
        apps.patch_namespaced_deployment_scale("backend", NS, {"spec": {"replicas": before + 2}})
        assert len(backend_pods(core)) == before + 2
    finally:
        apps.patch_namespaced_deployment_scale("backend", NS, {"spec": {"replicas": before}})
    assert len(backend_pods(core)) == before


def test_each_request_is_one_json_line_in_one_backend_pods_log(clean, core, http):
    user = f"user-{uuid.uuid4().hex[:6]}"
    clean.backend.force_status["/api/v1/scans"] = 500
    clean.backend.delay_seconds["/api/v1/reports"] = 0.3

    http.get("/health")
    http.get("/api/v1/scans", headers={"X-User-Id": user})
    http.post("/api/v1/reports", headers={"X-User-Id": user})
    http.get("/metrics")  # scrapes are not logged

    lines = sorted(all_lines(core), key=lambda r: r["ts"])
    assert [(r["method"], r["path"], r["status"], r["level"]) for r in lines] == [
        ("GET", "/health", 200, "info"),
        ("GET", "/api/v1/scans", 500, "error"),
        ("POST", "/api/v1/reports", 404, "warning"),
    ]
    assert [r.get("user_id") for r in lines] == [None, user, user]
    assert lines[1]["msg"] == "request failed: injected failure (500)"
    assert lines[2]["duration_ms"] >= 300
    # A Service spreads requests over the pods: three requests, three pods, one line each.
    assert [len(log_of(core, pod)) for pod in backend_pods(core)] == [1, 1, 1]


def test_tail_lines_since_seconds_and_timestamps_are_honoured(clean, core, http):
    pod = backend_pods(core)[0]
    only_one = [pod]
    clean.backend.pods = lambda: only_one  # every request to this pod, for counting
    try:
        clean.backend.log_clock = lambda: time.time_ns() - 2 * 3600 * 10**9
        for n in range(3):
            http.get(f"/old/{n}")
        clean.backend.log_clock = time.time_ns
        for n in range(4):
            http.get(f"/new/{n}")
    finally:
        clean.backend.pods = clean._backend_pods

    paths = [json.loads(line)["path"] for line in log_of(core, pod)]
    assert paths == [*(f"/old/{n}" for n in range(3)), *(f"/new/{n}" for n in range(4))]
    assert [json.loads(x)["path"] for x in log_of(core, pod, tail_lines=2)] == ["/new/2", "/new/3"]
    assert log_of(core, pod, tail_lines=0) == []
    recent = [json.loads(x)["path"] for x in log_of(core, pod, since_seconds=3600)]
    assert recent == [f"/new/{n}" for n in range(4)]
    assert len(log_of(core, pod, since_seconds=3 * 3600)) == 7
    assert len(log_of(core, pod, since_seconds=3600, tail_lines=10)) == 4

    stamped = log_of(core, pod, timestamps=True, tail_lines=1)
    match = RFC3339_NANO.match(stamped[0])
    assert match, stamped
    assert json.loads(match.group(2))["path"] == "/new/3"
    assert match.group(1)[:19] == json.loads(match.group(2))["ts"][:19]


@pytest.mark.parametrize(
    ("options", "status", "message"),
    [
        ({"since_seconds": 0}, 422, "sinceSeconds: Invalid value: 0: must be greater than 0"),
        ({"tail_lines": -1}, 422, "tailLines: Invalid value: -1"),
        ({"container": "sidecar"}, 400, "container sidecar is not valid for pod"),
    ],
)
def test_bad_log_options_are_refused_as_the_api_server_does(clean, core, options, status, message):
    pod = backend_pods(core)[0]
    with pytest.raises(ApiException) as refused:
        core.read_namespaced_pod_log(pod, NS, **options)
    assert refused.value.status == status
    assert message in json.loads(refused.value.body)["message"]


def test_a_pod_that_does_not_exist_is_404(clean, core):
    with pytest.raises(ApiException) as refused:
        core.read_namespaced_pod_log("backend-ghost", NS)
    assert refused.value.status == 404
