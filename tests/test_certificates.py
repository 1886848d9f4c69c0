"""The certificates check and the cert-renewal runbook against the sandbox: the emulator's
cert-manager issuing real certificates, the backend serving them over HTTPS, the
notification receiver, a real Prefect server."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from kubernetes import client
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
from prefect.exceptions import ParameterTypeError
from prefect.flow_runs import resume_flow_run

from flows.certificates import cert_renewal, certificates
from sandbox.platform import NAMESPACE, TLS_CERTIFICATE, TLS_SECRET, Sandbox
from tasks.cert_manager import renew_certificate
from tests.helpers import read_artifacts, start_in_thread, wait_for_paused_run

CERT = "cert-manager.io/v1"
SERVED_NAME = "api.complianceagent.ai"


def stamp(seconds_from_now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds_from_now))


def new_certificate(name: str, duration: str) -> dict[str, Any]:
    """A Certificate as a team would apply it: cert-manager issues it (no status)."""
    return {
        "apiVersion": CERT,
        "kind": "Certificate",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "secretName": f"{name}-secret",
            "dnsNames": [f"{name}.complianceagent.ai"],
            "duration": duration,
            "issuerRef": {"name": "sandbox-ca", "kind": "ClusterIssuer"},
        },
    }


def eventually(check: Any, timeout: float = 5.0) -> Any:
    give_up = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < give_up, "condition never held"
        time.sleep(0.02)
    return result


@pytest.fixture
def certs(platform: Sandbox) -> Iterator[Any]:
    """The emulator with quick issuance; Certificates a test adds are removed afterwards."""
    kube = platform.kube
    previous = kube.certificate_delay
    kube.certificate_delay = 0.1
    seeded = {c["metadata"]["name"] for c in kube.list(CERT, "Certificate", NAMESPACE)}
    yield kube
    kube.certificate_delay = previous
    kube.clear_certificate_failures()
    with client.ApiClient(client.Configuration(host=kube.url)) as api:
        for cert in kube.list(CERT, "Certificate", NAMESPACE):
            name = cert["metadata"]["name"]
            if name not in seeded:
                client.CustomObjectsApi(api).delete_namespaced_custom_object(
                    "cert-manager.io", "v1", NAMESPACE, "certificates", name
                )
                if kube.get("v1", "Secret", NAMESPACE, cert["spec"]["secretName"]):
                    client.CoreV1Api(api).delete_namespaced_secret(
                        cert["spec"]["secretName"], NAMESPACE
                    )


def certificate(kube: Any, name: str = TLS_CERTIFICATE) -> dict[str, Any]:
    return kube.get(CERT, "Certificate", NAMESPACE, name)


def secret_serial(kube: Any) -> int:
    data = kube.get("v1", "Secret", NAMESPACE, TLS_SECRET)["data"]["tls.crt"]
    return x509.load_pem_x509_certificate(base64.b64decode(data)).serial_number


def served(platform: Sandbox) -> x509.Certificate:
    """The certificate the backend presents, by a verifying handshake of our own."""
    host, port = platform.tls_address.rsplit(":", 1)
    context = ssl.create_default_context(cadata=platform.kube.ca_certificate_pem)
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=SERVED_NAME) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def approve(flow_name: str, approve: bool = True) -> str:
    paused = wait_for_paused_run(flow_name)
    plan = read_artifacts(paused.id)["approval-plan"].data
    resume_flow_run(
        paused.id, run_input={"approve": approve, "approver": "erin", "reason": "CHG-42"}
    )
    return plan


def no_deletes(kube: Any) -> None:
    assert [w for w in kube.writes if w.method == "DELETE"] == []


# --- certificates: the daily check ------------------------------------------------------


def test_check_warns_pages_and_tabulates_by_days_left_and_readiness(platform, certs):
    certs.seed(new_certificate("soon-tls", "480h"))  # 20 days: a warning
    certs.seed(new_certificate("urgent-tls", "120h"))  # 5 days: a page
    certs.fail_certificate_issuance("broken-tls", "ACME order failed: rate limited")
    certs.seed(new_certificate("broken-tls", "2160h"))  # never issued: Ready False, a page
    eventually(lambda: certificate(certs, "urgent-tls")["status"].get("revision") == 1)
    eventually(lambda: certificate(certs, "broken-tls")["status"].get("failedIssuanceAttempts"))
    certs.clear_writes()

    state = certificates(return_state=True)

    assert state.is_completed(), state.message
    result = state.result()
    assert result["warning"] == ["soon-tls"]
    assert sorted(result["critical"]) == ["broken-tls", "urgent-tls"]
    assert TLS_CERTIFICATE in result["ok"] and result["renewals_started"] == []
    rows = {r["certificate"]: r for r in _table(state)}
    assert rows["soon-tls"]["severity"] == "warning"
    assert rows["soon-tls"]["days left"].startswith(("19.9", "20.0"))
    assert rows["broken-tls"]["ready"] == "False (DoesNotExist)"
    assert rows["broken-tls"]["failed issuance attempts"] == 1
    assert rows[TLS_CERTIFICATE]["renewalTime"] == certificate(certs)["status"]["renewalTime"]

    chat = platform.receiver.wait_for(lambda n: n.path.startswith("/slack"))
    assert (
        "soon-tls (warning)" in chat.json["text"] and "urgent-tls (critical)" in chat.json["text"]
    )
    assert TLS_CERTIFICATE not in chat.json["text"]
    pages = [n.json for n in platform.receiver.received if n.path.startswith("/v2/enqueue")]
    assert sorted(p["dedup_key"] for p in pages) == [
        f"certificate/{NAMESPACE}/broken-tls",
        f"certificate/{NAMESPACE}/urgent-tls",
    ]
    assert all(p["payload"]["severity"] == "critical" for p in pages)
    broken = next(p for p in pages if p["dedup_key"].endswith("broken-tls"))
    assert "not Ready" in broken["payload"]["summary"]
    assert certs.writes == []  # a check changes nothing


def _table(state: Any) -> list[dict[str, Any]]:
    artifact = read_artifacts(state.state_details.flow_run_id)["certificates"]
    data = artifact.data
    return json.loads(data) if isinstance(data, str) else data


def test_check_refuses_a_critical_threshold_not_below_the_warning_one(platform, certs):
    state = certificates(warn_days=7, critical_days=7, return_state=True)
    assert state.is_failed()
    assert "critical_days: 7 must be below warn_days (7)" in state.message
    assert platform.receiver.received == []


def test_check_starts_one_renewal_for_a_certificate_cert_manager_did_not_renew(platform, certs):
    overdue = new_certificate("overdue-tls", "2160h")
    overdue["status"] = {
        "conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}],
        "notBefore": stamp(-80 * 86400),
        "notAfter": stamp(10 * 86400),
        "renewalTime": stamp(-20 * 86400),
        "revision": 3,
    }
    certs.seed(overdue)
    deployment_id = cert_renewal.to_deployment(name="cert-renewal").apply()
    try:
        first = certificates(return_state=True)
        second = certificates(return_state=True)  # the next day's check: no second run

        assert first.is_completed(), first.message
        assert first.result()["renewals_started"] == ["overdue-tls"]
        assert second.is_completed(), second.message
        with get_client(sync_client=True) as prefect_api:
            runs = prefect_api.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                flow_run_filter=FlowRunFilter(),
            )
            assert [r.parameters for r in runs] == [{"certificate": "overdue-tls"}]
            for run in runs:
                prefect_api.delete_flow_run(run.id)
    finally:
        with get_client(sync_client=True) as prefect_api:
            prefect_api.delete_deployment(deployment_id)


# --- cert-renewal -----------------------------------------------------------------------


def test_renewal_issues_a_new_certificate_and_the_handshake_sees_it(platform, certs):
    before = certificate(certs)["status"]
    old = served(platform)
    assert old.serial_number == secret_serial(certs)

    run = start_in_thread(cert_renewal, certificate=TLS_CERTIFICATE)
    plan = approve("cert-renewal")
    state = run.join()

    assert state.is_completed(), state.message
    assert f"| served now | serial {old.serial_number:x}" in plan
    after = certificate(certs)["status"]
    assert after["revision"] == before["revision"] + 1
    assert after["notAfter"] > before["notAfter"]
    assert [c["type"] for c in after["conditions"]] == ["Ready"]
    new = served(platform)  # a real handshake, trusting the sandbox CA
    assert new.serial_number != old.serial_number
    assert new.serial_number == secret_serial(certs)
    assert new.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ") == after["notAfter"]
    result = state.result()
    assert result["served_serial"] == f"{new.serial_number:x}"
    # cmctl renew: one status update that kept Ready and added Issuing; nothing deleted.
    [write] = certs.writes
    assert (write.method, write.subresource, write.name) == ("PUT", "status", TLS_CERTIFICATE)
    conditions = {c["type"]: c for c in write.body["status"]["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    assert (conditions["Issuing"]["status"], conditions["Issuing"]["reason"]) == (
        "True",
        "ManuallyTriggered",
    )
    assert "erin: CHG-42" in conditions["Issuing"]["message"]
    report = read_artifacts(state.state_details.flow_run_id)["cert-renewal-report"].data
    assert f"serial {new.serial_number:x}" in report
    chat = platform.receiver.wait_for(lambda n: n.path.startswith("/slack"))
    assert "renewed" in chat.json["text"]


def test_failed_issuance_reports_the_reason_and_keeps_serving_the_old_certificate(platform, certs):
    before = certificate(certs)["status"]
    old_serial = served(platform).serial_number
    certs.fail_certificate_issuance(TLS_CERTIFICATE, "ACME order failed: rate limited")

    run = start_in_thread(cert_renewal, certificate=TLS_CERTIFICATE)
    approve("cert-renewal")
    state = run.join()

    assert state.is_failed()
    assert (
        f"CertificateRequest {TLS_CERTIFICATE}-{before['revision'] + 1} Ready=False, "
        "Failed: ACME order failed: rate limited" in state.message
    )
    assert "failed issuance attempts: 1" in state.message
    assert certs.get("v1", "Secret", NAMESPACE, TLS_SECRET) is not None
    assert served(platform).serial_number == old_serial == secret_serial(certs)
    assert certificate(certs)["status"]["revision"] == before["revision"]
    no_deletes(certs)
    chat = platform.receiver.wait_for(lambda n: n.path.startswith("/slack"))
    assert "rate limited" in chat.json["text"]


def test_an_unknown_certificate_is_refused_before_any_write(platform, certs):
    state = cert_renewal(certificate="no-such-tls", return_state=True)

    assert state.is_failed()
    assert "certificate: no Certificate 'no-such-tls'" in state.message
    assert TLS_CERTIFICATE in state.message  # the ones that exist are listed
    assert certs.writes == []


@pytest.mark.parametrize("name", ["Bad_Name", "", "x" * 64])
def test_a_malformed_name_is_refused_by_validation(platform, certs, name):
    with pytest.raises(ParameterTypeError, match="certificate"):
        cert_renewal(certificate=name)
    assert certs.writes == []


def test_a_rejected_renewal_writes_nothing(platform, certs):
    revision = certificate(certs)["status"]["revision"]

    run = start_in_thread(cert_renewal, certificate=TLS_CERTIFICATE)
    approve("cert-renewal", approve=False)
    state = run.join()

    assert state.is_failed()
    assert "rejected by erin" in state.message
    assert certs.writes == []
    assert certificate(certs)["status"]["revision"] == revision


def test_a_renewal_approved_after_cert_manager_renewed_is_refused(platform, certs):
    """No lock through the pause; the approved plan pins revision and notAfter."""
    revision = certificate(certs)["status"]["revision"]
    run = start_in_thread(cert_renewal, certificate=TLS_CERTIFICATE)
    paused = wait_for_paused_run("cert-renewal")
    assert f"certificate/{TLS_CERTIFICATE} revision = {revision}" in (
        read_artifacts(paused.id)["approval-plan"].data
    )
    # Meanwhile the Certificate is renewed (cert-manager on its own, or another operator).
    renew_certificate.fn(TLS_CERTIFICATE, revision, "renewed during the pause")
    give_up = time.monotonic() + 30
    while certificate(certs)["status"]["revision"] != revision + 1:
        assert time.monotonic() < give_up, "the renewal during the pause never finished"
        time.sleep(0.1)
    certs.clear_writes()

    approve("cert-renewal")
    state = run.join()

    assert state.is_failed()
    assert "changed since the plan was approved" in state.message
    assert f"certificate/{TLS_CERTIFICATE} revision: {revision} → {revision + 1}" in state.message
    assert certs.writes == []
    assert certificate(certs)["status"]["revision"] == revision + 1
