"""Runbook > Maintenance Procedures > Certificate Renewal.

    kubectl get certificate -o wide        # check expiry
    kubectl delete secret tls-secret       # "force renewal"
    kubectl annotate certificate complianceagent-tls \
        cert-manager.io/issue-temporary-certificate="true"

`certificates` (daily): every Certificate in the namespace as a table (notAfter, days
left, renewalTime, Ready, failed issuance attempts); warns chat under `warn_days`, pages
the on-call engineer under `critical_days` or when a Certificate is not Ready (severity:
`runbook.decisions.certificates.judge_certificate`); and starts `cert-renewal` for a
Certificate past its renewal time that cert-manager is not renewing.

`cert-renewal` (on demand, approval): `cmctl renew` instead of the page's two commands,
then proof on the wire that the new certificate is the one served.
"""

from __future__ import annotations

import base64
import datetime as dt
from typing import Annotated, Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.logging import get_run_logger
from pydantic import Field

from runbook.decisions.certificates import (
    CertificateState,
    IssuancePhase,
    Severity,
    certificate_state,
    check_thresholds,
    issuance_progress,
    judge_certificate,
    report_row,
    rfc3339,
)
from runbook.decisions.locks import certificate_fingerprint
from runbook.decisions.refusal import Refused
from runbook.fault_points import fault_point
from runbook.report import StepTimer, markdown_table
from runbook.settings import K8S_NAME, PlatformSettings, load_settings
from tasks.approval import Plan, RequestedBy, refuse_if_changed, request_approval
from tasks.cert_manager import (
    find_certificate_request,
    list_certificates,
    renew_certificate,
    wait_for_certificate_issuance,
)
from tasks.intent import clear_intent, record_intent
from tasks.locks import exclusive
from tasks.notify import announce, notify_chat, page_on_call
from tasks.tls import (
    ServedCertificate,
    certificate_facts,
    fetch_served_certificate,
    wait_for_served_certificate,
)

CERT_RENEWAL_DEPLOYMENT = "cert-renewal/cert-renewal"


class CertificateRenewalFailed(RuntimeError):
    """cert-manager did not issue the new certificate, or it is not the one served."""


# --- certificates: the daily check -----------------------------------------------------


@flow(name="certificates", flow_run_name="certificates-check")
def certificates(
    warn_days: Annotated[int, Field(ge=1, le=365)] = 21,
    critical_days: Annotated[int, Field(ge=0, le=364)] = 7,
    start_renewals: bool = True,
) -> dict[str, Any]:
    """Check every cert-manager Certificate's expiry and readiness; warn, page, renew.

    Args:
        warn_days: Tell chat when a certificate expires in fewer days than this.
        critical_days: Page the on-call engineer when a certificate expires in fewer days
            than this (must be below warn_days); a certificate that is not Ready pages too.
        start_renewals: Start cert-renewal (it asks for approval) for a certificate past its
            renewal time that cert-manager is not renewing.
    """
    logger = get_run_logger()
    namespace = load_settings().namespace
    now = dt.datetime.now(dt.UTC)

    # 1. Check the thresholds before reading anything.
    check_thresholds(warn_days, critical_days)

    # 2. List the Certificates and judge each one.
    states = [certificate_state(obj) for obj in list_certificates()]
    verdicts = [judge_certificate(s, now, warn_days, critical_days) for s in states]
    rows = [report_row(s, v) for s, v in zip(states, verdicts, strict=True)]
    by = {
        sev: [s.name for s, v in zip(states, verdicts, strict=True) if v.severity is sev]
        for sev in Severity
    }

    # 3. Publish the table.
    summary = (
        f"{len(states)} certificate(s) in {namespace}: {len(by[Severity.OK])} ok, "
        f"{len(by[Severity.WARNING])} warning, {len(by[Severity.CRITICAL])} critical"
    )
    create_table_artifact(rows, key="certificates", description=summary)

    # 4. Warn chat about whatever is not ok; page for each critical one.
    attention = [r for r in rows if r["severity"] != Severity.OK.value]
    if attention:
        lines = [f"• {r['certificate']} ({r['severity']}): {r['detail']}" for r in attention]
        notify_chat(f":lock: Certificates in {namespace} need attention\n" + "\n".join(lines))
    for row in rows:
        if row["severity"] == Severity.CRITICAL.value:
            page_on_call(
                f"Certificate {row['certificate']} in {namespace}: {row['detail']}",
                "critical",
                dedup_key=f"certificate/{namespace}/{row['certificate']}",
                details=row,
            )

    # 5. Start a renewal for each one cert-manager should have renewed by now.
    started, not_started = [], []
    if start_renewals:
        for state, verdict in zip(states, verdicts, strict=True):
            if verdict.needs_renewal:
                try:
                    started.append(_start_renewal(namespace, state))
                except Exception as exc:
                    not_started.append(f"{state.name}: {exc}")
    logger.info(summary)
    result = {
        "summary": summary,
        "ok": by[Severity.OK],
        "warning": by[Severity.WARNING],
        "critical": by[Severity.CRITICAL],
        "renewals_started": started,
    }
    if not_started:
        raise CertificateRenewalFailed(
            f"{summary}; could not start cert-renewal for " + "; ".join(not_started)
        )
    return result


def _start_renewal(namespace: str, state: CertificateState) -> str:
    """Start cert-renewal without waiting for it: it waits for its own approval.
    One run per Certificate revision, however many daily checks find it overdue."""
    # Called from a sync flow, run_deployment is synchronous and returns the FlowRun.
    run: FlowRun = run_deployment(  # type: ignore[assignment]
        CERT_RENEWAL_DEPLOYMENT,
        parameters={"certificate": state.name},
        timeout=0,
        idempotency_key=f"cert-renewal/{namespace}/{state.name}/revision-{state.revision}",
        tags=["started-by-certificates-check"],
    )
    get_run_logger().warning(
        "certificate/%s is past its renewal time and not being renewed: started %s (%s)",
        state.name,
        run.name,
        run.id,
    )
    return state.name


# --- cert-renewal: cmctl renew, verified by a TLS handshake ---------------------------


@flow(name="cert-renewal", flow_run_name="cert-renewal-{certificate}")
def cert_renewal(
    certificate: Annotated[
        str, Field(pattern=K8S_NAME, max_length=63, examples=["complianceagent-tls"])
    ],
    deadline_seconds: Annotated[int, Field(ge=10, le=3600)] = 600,
    verify_tls: bool = True,
    requested_by: RequestedBy = None,
) -> dict[str, Any]:
    """Renew a cert-manager Certificate now (cmctl renew) and verify the new one is served.

    Why not the page's `kubectl delete secret` + `issue-temporary-certificate`: deleting
    the Secret takes TLS down until the new certificate is issued (and for good if the
    issuance fails), and the annotation triggers nothing by itself. `cmctl renew` adds the
    `Issuing` condition instead: cert-manager issues a new certificate while the current
    one keeps being served, and on failure nothing changes. The TLS Secret is never deleted.

    Args:
        certificate: Name of the Certificate to renew (kubectl get certificates).
        deadline_seconds: How long to wait for cert-manager to issue it and for the endpoint
            to serve it before the run fails.
        verify_tls: Check by a TLS handshake that the endpoint serves the new certificate
            (RUNBOOK_TLS_ENDPOINTS says where; default: its first dnsName, port 443).
        requested_by: Who asks for this change (optional); that person cannot approve it.
    """
    settings = load_settings()
    namespace = settings.namespace
    timer = StepTimer()

    # 1. Read the Certificate; an unknown one, or one already being issued, is refused.
    #    No lock yet: reading changes nothing, and no lock is held through the approval.
    with timer.step("read certificate"):
        before = _find(certificate)
        endpoint = _endpoint(settings, before) if verify_tls else None
        served_before = _served_now(endpoint, settings, before)

    # 2. Approval, showing the current certificate and what will happen.
    plan = _plan(namespace, before, endpoint, served_before)
    with timer.step("approval"):
        decision = request_approval(plan)

    with exclusive(f"certificate/{namespace}/{certificate}"):
        # 3. Under the lock: refuse if the Certificate changed since the plan was approved.
        refuse_if_changed(plan, _fingerprint(_find(certificate)))

        # One write (Issuing=True): cert-manager completes the issuance without us.
        note = f"certificate/{certificate}: Issuing=True set; cert-manager issues it"
        target = f"certificate/{namespace}/{certificate}"
        intent = record_intent("cert-renewal", [target], [{"kind": "note", "text": note}])
        # 4. cmctl renew: Issuing=True by a status update; the other conditions kept.
        with timer.step("cmctl renew (Issuing=True)"):
            message = f"Manually triggered by {decision.approver}: {decision.reason}"
            renew_certificate(certificate, before.revision, message[:500])
        fault_point("cert-renewal: renewal requested")

        try:
            # 5. Wait for cert-manager: Issuing gone, Ready, revision + 1, later notAfter.
            with timer.step("wait for issuance"):
                after = certificate_state(
                    wait_for_certificate_issuance(certificate, before, deadline_seconds)
                )
                request = find_certificate_request(certificate, before.revision + 1)
                progress = issuance_progress(before, after)
                if progress.phase is IssuancePhase.FAILED:
                    raise CertificateRenewalFailed(_failure(namespace, after, request))

            # 6. Verify on the wire: the endpoint serves the new serial and notAfter.
            served = None
            if endpoint is not None:
                with timer.step("verify by TLS handshake"):
                    served = _verify_served(endpoint, after, request, deadline_seconds, settings)
        except Exception as exc:
            problem = f"Renewal of certificate/{certificate} in {namespace} failed: {exc}"
            if not isinstance(exc, CertificateRenewalFailed):
                problem += "; " + _request_outcome(certificate, before.revision + 1)
            _publish(namespace, before, None, served_before, None, problem, timer)
            announce(f":rotating_light: {problem}")
            raise CertificateRenewalFailed(problem) from None

    clear_intent(intent)
    # 7. Report.
    summary = (
        f"certificate/{certificate} renewed: revision {before.revision} -> {after.revision}, "
        f"notAfter {rfc3339(before.not_after)} -> {rfc3339(after.not_after)}"
        + (f"; {endpoint[0]} serves serial {served.serial}" if endpoint and served else "")
    )
    _publish(namespace, before, after, served_before, served, summary, timer)
    announce(f":lock: {summary}")
    get_run_logger().info(summary)
    return {
        "certificate": certificate,
        "revision": after.revision,
        "not_after": rfc3339(after.not_after),
        "served_serial": served.serial if served else None,
    }


def _find(name: str) -> CertificateState:
    items = list_certificates()
    found = next((obj for obj in items if obj["metadata"]["name"] == name), None)
    if found is None:
        known = ", ".join(sorted(obj["metadata"]["name"] for obj in items)) or "none"
        raise Refused("certificate", f"no Certificate {name!r} in this namespace (known: {known})")
    state = certificate_state(found)
    if state.issuing == "True":
        raise Refused(
            "certificate",
            f"{name} is already being issued by cert-manager ({state.issuing_reason})",
        )
    return state


def _endpoint(settings: PlatformSettings, state: CertificateState) -> tuple[str, str]:
    """(address to connect to, name the certificate must be valid for)."""
    if not state.dns_names:
        raise Refused("verify_tls", f"{state.name} has no dnsNames to verify a handshake against")
    server_name = state.dns_names[0]
    return settings.tls_endpoints.get(state.name, f"{server_name}:443"), server_name


def _served_now(
    endpoint: tuple[str, str] | None, settings: PlatformSettings, cert: CertificateState
) -> ServedCertificate | str:
    """What the endpoint serves before the renewal (or why it could not be read)."""
    if endpoint is None:
        return "not checked"
    request = find_certificate_request(cert.name, cert.revision)
    state = fetch_served_certificate(
        *endpoint, ca_pem=_ca_of(request), ca_bundle=settings.tls_ca_bundle, return_state=True
    )
    if state.is_completed():
        served: ServedCertificate = state.result()
        return served
    return f"unreachable: {state.message}"


def _verify_served(
    endpoint: tuple[str, str],
    after: CertificateState,
    request: dict[str, Any] | None,
    deadline_seconds: float,
    settings: PlatformSettings,
) -> ServedCertificate:
    status = (request or {}).get("status") or {}
    if not status.get("certificate"):
        raise CertificateRenewalFailed("no issued certificate in its CertificateRequest")
    issued = certificate_facts(status["certificate"])
    served = wait_for_served_certificate(
        *endpoint,
        serial=issued.serial,
        deadline_seconds=deadline_seconds,
        ca_pem=_ca_of(request),
        ca_bundle=settings.tls_ca_bundle,
    )
    if served.not_after != rfc3339(after.not_after):
        raise CertificateRenewalFailed(
            f"{endpoint[0]} serves notAfter {served.not_after}, the Certificate says "
            f"{rfc3339(after.not_after)}"
        )
    return served


def _ca_of(request: dict[str, Any] | None) -> str | None:
    """The CA the issuer returned with a certificate (what cert-manager writes to the
    Secret's ca.crt), read from the CertificateRequest: the runbook never reads the TLS
    Secret, so the private key never enters its process."""
    ca = ((request or {}).get("status") or {}).get("ca")
    return base64.b64decode(ca).decode() if ca else None


def _failure(namespace: str, after: CertificateState, request: dict[str, Any] | None) -> str:
    """cert-manager's own account of the failure: the CertificateRequest's Ready reason."""
    if request is None:
        why = f"{after.issuing_reason}: {after.issuing_message}"
        where = "no CertificateRequest found"
    else:
        ready: dict[str, Any] = next(
            (c for c in request["status"].get("conditions", []) if c.get("type") == "Ready"), {}
        )
        why = f"{ready.get('reason', '-')}: {ready.get('message', '-')}"
        where = f"CertificateRequest {request['metadata']['name']} Ready=False"
    return (
        f"cert-manager could not issue it ({where}, {why}); failed issuance attempts: "
        f"{after.failed_attempts}; the TLS Secret {after.secret_name} was not touched and "
        f"still holds revision {after.revision} (notAfter {rfc3339(after.not_after)})"
    )


def _request_outcome(certificate: str, revision: int) -> str:
    """What the CertificateRequest of this renewal says, for a failure report."""
    state = find_certificate_request(certificate, revision, return_state=True)
    request = state.result() if state.is_completed() else None
    if request is None:
        return f"no CertificateRequest for revision {revision}"
    ready: dict[str, Any] = next(
        (c for c in request["status"].get("conditions", []) if c.get("type") == "Ready"), {}
    )
    return (
        f"CertificateRequest {request['metadata']['name']}: Ready={ready.get('status', '-')} "
        f"({ready.get('reason', '-')}: {ready.get('message', '-')})"
    )


def _describe(served: ServedCertificate | str | None) -> str:
    if served is None:
        return "-"
    if isinstance(served, str):
        return served
    return f"serial {served.serial}, notAfter {served.not_after}"


def _plan(
    namespace: str,
    state: CertificateState,
    endpoint: tuple[str, str] | None,
    served: ServedCertificate | str,
) -> Plan:
    steps = [
        f"cmctl renew {state.name} -n {namespace} (Issuing=True, reason ManuallyTriggered, "
        "by a status update; the current certificate stays served meanwhile)",
        "Wait until Issuing is gone, Ready is True, revision is "
        f"{state.revision + 1} and notAfter is later",
    ]
    if endpoint is not None:
        steps.append(
            f"TLS handshake with {endpoint[0]} as {endpoint[1]}: the new serial must be served"
        )
    return Plan(
        title=f"Renew certificate {state.name}",
        target=f"certificate/{namespace}/{state.name}",
        steps=tuple(steps),
        facts={
            "dnsNames": ", ".join(state.dns_names) or "-",
            "revision": str(state.revision),
            "notAfter": rfc3339(state.not_after),
            "renewalTime": rfc3339(state.renewal_time),
            "Ready": f"{state.ready} ({state.ready_reason or '-'})",
            "failed issuance attempts": str(state.failed_attempts),
            "served now": _describe(served),
            "TLS Secret": f"{state.secret_name} (never deleted)",
        },
        fingerprint=_fingerprint(state),
    )


def _fingerprint(state: CertificateState) -> dict[str, str]:
    return certificate_fingerprint(state.name, state.revision, rfc3339(state.not_after))


def _publish(
    namespace: str,
    before: CertificateState,
    after: CertificateState | None,
    served_before: ServedCertificate | str,
    served_after: ServedCertificate | None,
    summary: str,
    timer: StepTimer,
) -> None:
    rows: list[dict[str, Any]] = [
        {
            "": "before",
            "revision": before.revision,
            "notAfter": rfc3339(before.not_after),
            "served": _describe(served_before),
        },
        {
            "": "after",
            "revision": after.revision if after else "-",
            "notAfter": rfc3339(after.not_after) if after else "-",
            "served": _describe(served_after),
        },
    ]
    create_markdown_artifact(
        markdown="\n\n".join(
            [
                f"## Certificate renewal: {before.name} in {namespace}",
                summary,
                markdown_table(rows),
                "### Steps",
                timer.markdown(),
            ]
        ),
        key="cert-renewal-report",
        description=summary[:500],
    )
