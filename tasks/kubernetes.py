"""Tasks that talk to the Kubernetes API, one call each, named for the `kubectl` verb
they stand in for.

Objects go in and come out as plain JSON dicts (camelCase, exactly what the API serves),
so the decisions in `runbook.decisions` can judge them without a client. The client is
built from settings: an explicit API URL (the local sandbox), else in-cluster config,
else kubeconfig — the same code runs everywhere.

Errors: a 4xx answer becomes a `PlatformCallError` naming the call and the object, and
fails at once; timeouts, connection errors, 429 and 5xx are retried (see `retry_policy`).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from prefect import task

from runbook.decisions.migrations import JobOutcome, created_by, job_outcome
from runbook.decisions.revisions import CHANGE_CAUSE_ANNOTATION, revisions_of
from runbook.decisions.rollout import RolloutOutcome, rollout_outcome
from runbook.settings import PlatformSettings, load_settings
from tasks.logs import run_logger
from tasks.retry_policy import (
    TRANSIENT_HTTP_STATUSES,
    TRANSIENT_RETRIES,
    DeadlineExceeded,
    PlatformCallError,
    call_with_retries,
    done_if_gone,
    is_gone,
)

JSON = dict[str, Any]

RESTARTED_AT_ANNOTATION = "kubectl.kubernetes.io/restartedAt"


# --- the client -------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _api_client(api_url: str | None, context: str | None) -> client.ApiClient:
    configuration = client.Configuration()
    if api_url:
        configuration.host = api_url.rstrip("/")
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except ConfigException:
            config.load_kube_config(context=context, client_configuration=configuration)
    # One retry layer only: Prefect's, which knows transient from permanent.
    configuration.retries = 0
    api = client.ApiClient(configuration)
    api.user_agent = USER_AGENT  # names the runbooks in the API server's audit log
    return api


def api_client(settings: PlatformSettings | None = None) -> client.ApiClient:
    """The shared `ApiClient` for the configured cluster."""
    settings = settings or load_settings()
    url = str(settings.kube_api_url) if settings.kube_api_url else None
    return _api_client(url, settings.kube_context)


def _call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Make one API call and return the answer as the API served it (JSON or text).

    The client's exceptions become `PlatformCallError`s that name the call and say
    whether a retry may help.
    """
    settings = load_settings()
    kwargs.setdefault("_request_timeout", settings.kube_request_timeout_seconds)
    try:
        response = fn(*args, _preload_content=False, **kwargs)
    except ApiException as exc:
        raise _refusal(what, exc) from None
    body = response.data.decode()
    if "json" in (response.headers.get("Content-Type") or ""):
        return json.loads(body)
    return body


def _refusal(what: str, exc: ApiException) -> PlatformCallError:
    if not exc.status:  # no HTTP answer at all: a connection-level failure
        return PlatformCallError(f"{what}: {exc.reason}", transient=True)
    reason, message = exc.reason, ""
    try:
        body = json.loads(exc.body or "{}")
        reason, message = body.get("reason") or reason, body.get("message") or ""
    except ValueError:
        pass
    retry_after = (exc.headers or {}).get("Retry-After")
    return PlatformCallError(
        f"{what}: {exc.status} {reason}" + (f": {message}" if message else ""),
        status=exc.status,
        transient=exc.status in TRANSIENT_HTTP_STATUSES,
        retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None,
    )


def _apps() -> client.AppsV1Api:
    return client.AppsV1Api(api_client())


def _core() -> client.CoreV1Api:
    return client.CoreV1Api(api_client())


def _batch() -> client.BatchV1Api:
    return client.BatchV1Api(api_client())


def _custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client())


def _namespace(namespace: str | None) -> str:
    return namespace or load_settings().namespace


# --- Deployments ------------------------------------------------------------------------


def _read_deployment(name: str, ns: str) -> JSON:
    obj: JSON = _call(
        f"read deployment/{name} in {ns}", _apps().read_namespaced_deployment, name, ns
    )
    return obj


@task(**TRANSIENT_RETRIES)
def read_deployment(name: str, namespace: str | None = None) -> JSON:
    """`kubectl get deployment NAME -o json`.

    Returns the Deployment as the API serves it. Raises `PlatformCallError` (404) if absent.
    """
    return _read_deployment(name, _namespace(namespace))


@task(**TRANSIENT_RETRIES)
def set_deployment_image(
    name: str, container: str, image: str, namespace: str | None = None
) -> JSON:
    """`kubectl set image deployment/NAME CONTAINER=IMAGE`; returns the patched Deployment."""
    ns = _namespace(namespace)
    patch = {"spec": {"template": {"spec": {"containers": [{"name": container, "image": image}]}}}}
    obj: JSON = _call(
        f"set image of deployment/{name} container {container} in {ns}",
        _apps().patch_namespaced_deployment,
        name,
        ns,
        patch,
    )
    return obj


@task(**TRANSIENT_RETRIES)
def set_deployment_env(
    name: str, container: str, env: dict[str, str], namespace: str | None = None
) -> JSON:
    """`kubectl set env deployment/NAME K=V ...` for one container (merged by variable name)."""
    ns = _namespace(namespace)
    variables = [{"name": k, "value": v} for k, v in env.items()]
    patch = {
        "spec": {"template": {"spec": {"containers": [{"name": container, "env": variables}]}}}
    }
    obj: JSON = _call(
        f"set env {sorted(env)} on deployment/{name} container {container} in {ns}",
        _apps().patch_namespaced_deployment,
        name,
        ns,
        patch,
    )
    return obj


@task(**TRANSIENT_RETRIES)
def restart_deployment(name: str, namespace: str | None = None) -> JSON:
    """`kubectl rollout restart deployment/NAME`: stamp the pod template so pods are replaced."""
    ns = _namespace(namespace)
    # RFC 3339 like kubectl's, but to the microsecond: a second restart within the same
    # second (an undo right after a failed restart) must still change the template.
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    patch = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT_ANNOTATION: now}}}}}
    obj: JSON = _call(
        f"restart deployment/{name} in {ns}", _apps().patch_namespaced_deployment, name, ns, patch
    )
    return obj


@task(**TRANSIENT_RETRIES)
def scale_deployment(name: str, replicas: int, namespace: str | None = None) -> int:
    """`kubectl scale deployment/NAME --replicas=N` through the scale subresource.

    Returns the replica count the API now holds.
    """
    ns = _namespace(namespace)
    scale = _call(
        f"scale deployment/{name} to {replicas} in {ns}",
        _apps().patch_namespaced_deployment_scale,
        name,
        ns,
        {"spec": {"replicas": replicas}},
    )
    return int(scale["spec"]["replicas"])


@task(**TRANSIENT_RETRIES)
def read_deployment_scale(name: str, namespace: str | None = None) -> int:
    """The Deployment's desired replica count (`spec.replicas` of its scale subresource)."""
    ns = _namespace(namespace)
    scale = _call(
        f"read scale of deployment/{name} in {ns}",
        _apps().read_namespaced_deployment_scale,
        name,
        ns,
    )
    return int(scale["spec"].get("replicas") or 0)


@task(**TRANSIENT_RETRIES)
def list_deployment_revisions(name: str, namespace: str | None = None) -> list[JSON]:
    """`kubectl rollout history deployment/NAME`: the Deployment's ReplicaSets, oldest first.

    Each item: revision, images (container → image), change_cause, created, replicaset,
    template (see `runbook.decisions.revisions.revisions_of`).
    """
    ns = _namespace(namespace)
    deployment = _read_deployment(name, ns)
    labels = deployment["spec"]["selector"].get("matchLabels") or {}
    selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    replica_sets = _call(
        f"list replicasets of deployment/{name} in {ns}",
        _apps().list_namespaced_replica_set,
        ns,
        label_selector=selector,
    )
    return revisions_of(name, replica_sets["items"])


def _restore_pod_template(name: str, template: JSON, change_cause: str, ns: str) -> JSON:
    patch = [
        {"op": "replace", "path": "/spec/template", "value": template},
        {
            "op": "add",
            "path": "/metadata/annotations/" + CHANGE_CAUSE_ANNOTATION.replace("/", "~1"),
            "value": change_cause,
        },
    ]
    obj: JSON = _call(
        f"restore pod template of deployment/{name} in {ns}",
        _apps().patch_namespaced_deployment,
        name,
        ns,
        patch,
    )
    return obj


@task(**TRANSIENT_RETRIES)
def restore_pod_template(
    name: str, template: JSON, change_cause: str, namespace: str | None = None
) -> JSON:
    """`kubectl rollout undo`: make a recorded revision's pod template the Deployment's.

    A JSON patch replaces the whole template, so nothing of the newer template survives.
    """
    return _restore_pod_template(name, template, change_cause, _namespace(namespace))


def restore_pod_template_now(
    name: str, template: JSON, change_cause: str, namespace: str | None = None
) -> JSON:
    """`restore_pod_template` as a plain call (same retry policy), for a run that is being
    cancelled or terminated: Prefect refuses to start task runs once the flow run is no
    longer Running, but the undo must still be written."""
    ns = _namespace(namespace)
    return call_with_retries(
        f"restore pod template of deployment/{name} in {ns}",
        lambda: _restore_pod_template(name, template, change_cause, ns),
    )


def _watch(
    list_fn: Callable[..., Any], *args: Any, name: str, timeout: float, rv: str | None
) -> Iterator[JSON]:
    """Yield the watched object (as JSON) each time it changes, until `timeout` passes."""
    stream = watch.Watch().stream(
        list_fn,
        *args,
        field_selector=f"metadata.name={name}",
        resource_version=rv,
        timeout_seconds=max(1, int(timeout)),
        _request_timeout=timeout + 10,
    )
    for event in stream:
        if event["type"] in ("ADDED", "MODIFIED"):
            yield event["raw_object"]


@task(**TRANSIENT_RETRIES)
def wait_for_rollout(
    name: str,
    min_generation: int = 0,
    deadline_seconds: float = 600,
    namespace: str | None = None,
) -> RolloutOutcome:
    """`kubectl rollout status deployment/NAME`: watch until the rollout completes or fails.

    Watches (no polling): a `ProgressDeadlineExceeded` condition is seen as soon as the
    controller writes it. `min_generation` is the generation our own change produced.
    Returns the outcome (phase, reason, revision) as `rollout_outcome` judges it. Raises
    `DeadlineExceeded` (a `TimeoutError`, not retried) if neither outcome arrives within
    `deadline_seconds`.
    """
    ns = _namespace(namespace)
    give_up_at = time.monotonic() + deadline_seconds
    obj = _read_deployment(name, ns)
    rv = obj["metadata"]["resourceVersion"]
    outcome = rollout_outcome(obj, min_generation)
    while not outcome.finished:
        remaining = give_up_at - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(
                f"rollout of deployment/{name} in {ns} undecided after {deadline_seconds:.0f}s: "
                f"{outcome.reason}"
            )
        for obj in _watch(
            _apps().list_namespaced_deployment, ns, name=name, timeout=remaining, rv=rv
        ):
            rv = obj["metadata"]["resourceVersion"]
            outcome = rollout_outcome(obj, min_generation)
            if outcome.finished:
                break
    run_logger().info("deployment/%s rollout %s: %s", name, outcome.phase.value, outcome.reason)
    return outcome


# --- StatefulSets, HPAs --------------------------------------------------------------


@task(**TRANSIENT_RETRIES)
def read_statefulset(name: str, namespace: str | None = None) -> JSON:
    """`kubectl get statefulset NAME -o json`."""
    ns = _namespace(namespace)
    obj: JSON = _call(
        f"read statefulset/{name} in {ns}", _apps().read_namespaced_stateful_set, name, ns
    )
    return obj


def _autoscaling() -> client.AutoscalingV2Api:
    return client.AutoscalingV2Api(api_client())


def _read_hpa(name: str, ns: str) -> JSON | None:
    try:
        found: JSON = _call(
            f"read hpa/{name} in {ns}",
            _autoscaling().read_namespaced_horizontal_pod_autoscaler,
            name,
            ns,
        )
    except PlatformCallError as exc:
        if is_gone(exc):
            return None
        raise
    return found


@task(**TRANSIENT_RETRIES)
def apply_horizontal_pod_autoscaler(body: JSON, namespace: str | None = None) -> JSON:
    """`kubectl apply -f hpa.yaml` for an `autoscaling/v2` HPA: create, or replace in place."""
    ns = _namespace(namespace)
    name = body["metadata"]["name"]
    existing = _read_hpa(name, ns)
    if existing is None:
        created: JSON = _call(
            f"create hpa/{name} in {ns}",
            _autoscaling().create_namespaced_horizontal_pod_autoscaler,
            ns,
            body,
        )
        return created
    replacement = {
        **body,
        "metadata": {
            **body["metadata"],
            "resourceVersion": existing["metadata"]["resourceVersion"],
        },
    }
    replaced: JSON = _call(
        f"replace hpa/{name} in {ns}",
        _autoscaling().replace_namespaced_horizontal_pod_autoscaler,
        name,
        ns,
        replacement,
    )
    return replaced


@task(**TRANSIENT_RETRIES)
def read_horizontal_pod_autoscaler(name: str, namespace: str | None = None) -> JSON | None:
    """`kubectl get hpa NAME -o json`, or None if there is none."""
    return _read_hpa(name, _namespace(namespace))


# --- Jobs -------------------------------------------------------------------------------


def _read_job(name: str, ns: str) -> JSON:
    obj: JSON = _call(f"read job/{name} in {ns}", _batch().read_namespaced_job, name, ns)
    return obj


@task(**TRANSIENT_RETRIES)
def create_job(body: JSON, namespace: str | None = None) -> JSON:
    """`kubectl create -f job.yaml`; returns the created Job.

    The create is retried on a 5xx or a lost answer, and the first attempt may have been
    committed all the same: a 409 then means "created" if the Job under that name carries
    every label of `body` (it is ours), and it is returned. A 409 on anybody else's Job
    fails, naming it.
    """
    ns = _namespace(namespace)
    name = body["metadata"]["name"]
    what = f"create job/{name} in {ns}"
    try:
        created: JSON = _call(what, _batch().create_namespaced_job, ns, body)
        return created
    except PlatformCallError as exc:
        if exc.status != 409:
            raise
        existing = _read_job(name, ns)
        if not created_by(existing, body):
            raise PlatformCallError(
                f"{what}: 409 AlreadyExists, and job/{name} is not ours "
                f"(it lacks our labels {body['metadata'].get('labels') or {}})",
                status=409,
            ) from None
    run_logger().info("job/%s in %s: an earlier attempt of this create made it", name, ns)
    return existing


@task(**TRANSIENT_RETRIES)
def wait_for_job(
    name: str, deadline_seconds: float = 1800, namespace: str | None = None
) -> JobOutcome:
    """`kubectl wait --for=condition=complete job/NAME`, watching; returns its outcome.

    A failed Job is returned, not raised, so the caller can fetch its logs first. Raises
    `DeadlineExceeded` if it has not finished within `deadline_seconds`.
    """
    ns = _namespace(namespace)
    give_up_at = time.monotonic() + deadline_seconds
    obj = _read_job(name, ns)
    rv = obj["metadata"]["resourceVersion"]
    outcome = job_outcome(obj)
    while not outcome.finished:
        remaining = give_up_at - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"job/{name} in {ns} not finished after {deadline_seconds:.0f}s")
        for obj in _watch(_batch().list_namespaced_job, ns, name=name, timeout=remaining, rv=rv):
            rv = obj["metadata"]["resourceVersion"]
            outcome = job_outcome(obj)
            if outcome.finished:
                break
    return outcome


@task(**TRANSIENT_RETRIES)
def read_job_logs(name: str, namespace: str | None = None) -> str:
    """`kubectl logs job/NAME`: the logs of the Job's pods, each headed by the pod's name."""
    ns = _namespace(namespace)
    pods = _call(
        f"list pods of job/{name} in {ns}",
        _core().list_namespaced_pod,
        ns,
        label_selector=f"job-name={name}",
    )
    chunks = []
    for pod in pods["items"]:
        pod_name = pod["metadata"]["name"]
        text = _call(
            f"read logs of pod/{pod_name} in {ns}", _core().read_namespaced_pod_log, pod_name, ns
        )
        chunks.append(f"--- {pod_name}\n{text}")
    return "\n".join(chunks)


@task(**TRANSIENT_RETRIES)
def delete_job(name: str, namespace: str | None = None) -> bool:
    """`kubectl delete job NAME` with its pods. Already gone counts as done (returns False)."""
    ns = _namespace(namespace)
    return done_if_gone(
        lambda: _call(
            f"delete job/{name} in {ns}",
            _batch().delete_namespaced_job,
            name,
            ns,
            propagation_policy="Background",
        )
    )


# --- custom objects (cert-manager) ------------------------------------------------------


@task(**TRANSIENT_RETRIES)
def list_custom_objects(
    group: str, version: str, plural: str, namespace: str | None = None
) -> list[JSON]:
    """`kubectl get PLURAL.GROUP -o json` in the namespace."""
    ns = _namespace(namespace)
    result = _call(
        f"list {plural}.{group} in {ns}",
        _custom().list_namespaced_custom_object,
        group,
        version,
        ns,
        plural,
    )
    return list(result.get("items", []))


@task(**TRANSIENT_RETRIES)
def read_custom_object(
    group: str, version: str, plural: str, name: str, namespace: str | None = None
) -> JSON:
    """`kubectl get PLURAL.GROUP NAME -o json`."""
    ns = _namespace(namespace)
    result: JSON = _call(
        f"read {plural}.{group}/{name} in {ns}",
        _custom().get_namespaced_custom_object,
        group,
        version,
        ns,
        plural,
        name,
    )
    return result


@task(**TRANSIENT_RETRIES)
def patch_custom_object(
    group: str,
    version: str,
    plural: str,
    name: str,
    patch: JSON,
    namespace: str | None = None,
    status: bool = False,
) -> JSON:
    """`kubectl patch PLURAL.GROUP NAME --type=merge` (of `/status` when `status`)."""
    ns = _namespace(namespace)
    api = _custom()
    fn = api.patch_namespaced_custom_object_status if status else api.patch_namespaced_custom_object
    result: JSON = _call(
        f"patch {plural}.{group}/{name}{'/status' if status else ''} in {ns}",
        fn,
        group,
        version,
        ns,
        plural,
        name,
        patch,
    )
    return result


@task(**TRANSIENT_RETRIES)
def annotate_deployment(
    name: str, annotations: dict[str, str | None], namespace: str | None = None
) -> JSON:
    """`kubectl annotate deployment NAME K=V K-` (None removes a key; removing an absent
    one is a no-op). Metadata only: the pods are not rolled."""
    ns = _namespace(namespace)
    obj: JSON = _call(
        f"annotate deployment/{name} ({', '.join(sorted(annotations))}) in {ns}",
        _apps().patch_namespaced_deployment,
        name,
        ns,
        {"metadata": {"annotations": annotations}},
    )
    return obj


# --- reconcile ----------------------------------------------------------------------------


@task(**TRANSIENT_RETRIES)
def read_job(name: str, namespace: str | None = None) -> JSON | None:
    """`kubectl get job NAME -o json`, or None if there is none."""
    ns = _namespace(namespace)
    try:
        return _read_job(name, ns)
    except PlatformCallError as exc:
        if exc.status == 404:
            return None
        raise


# How the runbooks' requests introduce themselves to the API server (its audit log; the
# sandbox's RBAC check tells them from the test harness's own requests by it).
USER_AGENT = "complianceagent-runbooks/1"
