"""Tasks for cert-manager's Certificates and CertificateRequests, one API call each, named
for the `kubectl`/`cmctl` verb they stand in for. Objects in and out as JSON dicts.

`renew_certificate` is `cmctl renew`: it adds the condition `Issuing=True` (reason
`ManuallyTriggered`) with a full **status update** (`replace_namespaced_custom_object_status`)
of the Certificate as read — a merge patch of `status.conditions` would replace the whole
list and drop `Ready`.
"""

from __future__ import annotations

import time

from prefect import task

from runbook.decisions.certificates import (
    CertificateState,
    IssuancePhase,
    certificate_state,
    issuance_progress,
)
from tasks.kubernetes import _call, _custom, _namespace, _watch
from tasks.logs import run_logger
from tasks.retry_policy import TRANSIENT_RETRIES, DeadlineExceeded, PlatformCallError

JSON = dict[str, object]
GROUP, VERSION = "cert-manager.io", "v1"
REVISION_ANNOTATION = "cert-manager.io/certificate-revision"
NAME_ANNOTATION = "cert-manager.io/certificate-name"
MANUALLY_TRIGGERED = "ManuallyTriggered"
CONFLICT_ATTEMPTS = 3


@task(**TRANSIENT_RETRIES)
def list_certificates(namespace: str | None = None) -> list[dict]:
    """`kubectl get certificates -o json`: every Certificate in the namespace."""
    ns = _namespace(namespace)
    result = _call(
        f"list certificates.{GROUP} in {ns}",
        _custom().list_namespaced_custom_object,
        GROUP,
        VERSION,
        ns,
        "certificates",
    )
    return list(result.get("items", []))


def _read(name: str, ns: str) -> dict:
    obj: dict = _call(
        f"read certificates.{GROUP}/{name} in {ns}",
        _custom().get_namespaced_custom_object,
        GROUP,
        VERSION,
        ns,
        "certificates",
        name,
    )
    return obj


@task(**TRANSIENT_RETRIES)
def read_certificate(name: str, namespace: str | None = None) -> dict:
    """`kubectl get certificate NAME -o json`; a `PlatformCallError` (404) if absent."""
    return _read(name, _namespace(namespace))


@task(**TRANSIENT_RETRIES)
def renew_certificate(
    name: str, expected_revision: int, message: str, namespace: str | None = None
) -> dict:
    """`cmctl renew NAME`: add `Issuing=True` (ManuallyTriggered) by a status update.

    The Certificate is re-read for its resourceVersion; if its revision is no longer
    `expected_revision` (renewed since the plan was approved) or it is already issuing,
    nothing is written and a `PlatformCallError` says why. A 409 (cert-manager wrote its
    status meanwhile) is retried on a fresh read, as `kubectl` would be by hand.
    """
    ns = _namespace(namespace)
    for attempt in range(1, CONFLICT_ATTEMPTS + 1):
        cert = _read(name, ns)
        state = certificate_state(cert)
        if state.revision != expected_revision:
            raise PlatformCallError(
                f"certificate/{name} in {ns} is at revision {state.revision}, not the approved "
                f"{expected_revision}: it changed since the plan; nothing was written"
            )
        if state.issuing == "True":
            raise PlatformCallError(
                f"certificate/{name} in {ns} is already being issued "
                f"({state.issuing_reason}); nothing was written"
            )
        status = dict(cert.get("status") or {})
        conditions = [c for c in status.get("conditions") or [] if c.get("type") != "Issuing"]
        conditions.append(
            {
                "type": "Issuing",
                "status": "True",
                "reason": MANUALLY_TRIGGERED,
                "message": message,
                "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "observedGeneration": cert["metadata"].get("generation"),
            }
        )
        status["conditions"] = conditions
        body = {**cert, "status": status}
        try:
            updated: dict = _call(
                f"update status of certificates.{GROUP}/{name} in {ns}",
                _custom().replace_namespaced_custom_object_status,
                GROUP,
                VERSION,
                ns,
                "certificates",
                name,
                body,
            )
        except PlatformCallError as exc:
            if exc.status == 409 and attempt < CONFLICT_ATTEMPTS:
                continue
            raise
        run_logger().info("certificate/%s: Issuing=True (ManuallyTriggered) set", name)
        return updated
    raise AssertionError("unreachable")


@task(**TRANSIENT_RETRIES)
def wait_for_certificate_issuance(
    name: str, before: CertificateState, deadline_seconds: float, namespace: str | None = None
) -> dict:
    """Watch the Certificate until the renewal started on `before` is done or failed
    (`runbook.decisions.certificates.issuance_progress`); returns it then.

    Raises `DeadlineExceeded` (not retried) when neither happens in `deadline_seconds`.
    """
    ns = _namespace(namespace)
    give_up_at = time.monotonic() + deadline_seconds
    obj = _read(name, ns)
    rv = obj["metadata"]["resourceVersion"]
    while (progress := issuance_progress(before, certificate_state(obj))).phase == (
        IssuancePhase.PENDING
    ):
        remaining = give_up_at - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(
                f"certificate/{name} in {ns} not renewed after {deadline_seconds:.0f}s: "
                f"{progress.detail}"
            )
        for obj in _watch(
            _custom().list_namespaced_custom_object,
            GROUP,
            VERSION,
            ns,
            "certificates",
            name=name,
            timeout=remaining,
            rv=rv,
        ):
            rv = obj["metadata"]["resourceVersion"]
            if issuance_progress(before, certificate_state(obj)).phase != IssuancePhase.PENDING:
                break
    run_logger().info("certificate/%s issuance %s: %s", name, progress.phase, progress.detail)
    return obj


@task(**TRANSIENT_RETRIES)
def find_certificate_request(
    certificate: str, revision: int, namespace: str | None = None
) -> dict | None:
    """`kubectl get certificaterequests` of one Certificate's revision (by cert-manager's
    annotations, not by name), or None when there is none."""
    ns = _namespace(namespace)
    result = _call(
        f"list certificaterequests.{GROUP} in {ns}",
        _custom().list_namespaced_custom_object,
        GROUP,
        VERSION,
        ns,
        "certificaterequests",
    )
    for request in result.get("items", []):
        annotations = request["metadata"].get("annotations") or {}
        if annotations.get(NAME_ANNOTATION) == certificate and annotations.get(
            REVISION_ANNOTATION
        ) == str(revision):
            found: dict = request
            return found
    return None
