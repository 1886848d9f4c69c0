"""Judgements about cert-manager Certificates: how bad is each one, does it need a manual
renewal, and has a renewal finished. Plain data in (the Certificate as the API serves it),
plain data out; tested with literal dicts."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from runbook.decisions.refusal import Refused

JSON = dict[str, Any]
DAY = 86400.0


def _time(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def rfc3339(at: dt.datetime | None) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if at else "-"


@dataclass(frozen=True)
class CertificateState:
    """What the runbook reads of a Certificate (`kubectl get certificate -o wide` and more)."""

    name: str
    dns_names: tuple[str, ...]
    secret_name: str
    revision: int
    not_after: dt.datetime | None
    renewal_time: dt.datetime | None
    ready: bool
    ready_reason: str
    ready_message: str
    issuing: str | None  # the Issuing condition's status ("True"/"False"), None if absent
    issuing_reason: str
    issuing_message: str
    failed_attempts: int
    last_failure: str | None


def certificate_state(obj: JSON) -> CertificateState:
    """Read a Certificate as the API serves it."""
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready, issuing = conditions.get("Ready") or {}, conditions.get("Issuing") or {}
    return CertificateState(
        name=obj["metadata"]["name"],
        dns_names=tuple(spec.get("dnsNames") or ()),
        secret_name=spec.get("secretName", ""),
        revision=int(status.get("revision") or 0),
        not_after=_time(status.get("notAfter")),
        renewal_time=_time(status.get("renewalTime")),
        ready=ready.get("status") == "True",
        ready_reason=ready.get("reason", ""),
        ready_message=ready.get("message", ""),
        issuing=issuing.get("status"),
        issuing_reason=issuing.get("reason", ""),
        issuing_message=issuing.get("message", ""),
        failed_attempts=int(status.get("failedIssuanceAttempts") or 0),
        last_failure=status.get("lastFailureTime"),
    )


class Severity(StrEnum):
    OK = "ok"
    WARNING = "warning"  # tell chat
    CRITICAL = "critical"  # page the on-call engineer


@dataclass(frozen=True)
class CertificateVerdict:
    severity: Severity
    days_left: float | None
    reason: str
    needs_renewal: bool  # past its renewal time, and cert-manager is not issuing it


def check_thresholds(warn_days: int, critical_days: int) -> None:
    """The critical threshold must be below the warning one, or nobody is ever warned."""
    if critical_days >= warn_days:
        raise Refused("critical_days", f"{critical_days} must be below warn_days ({warn_days})")


def judge_certificate(
    state: CertificateState, now: dt.datetime, warn_days: int, critical_days: int
) -> CertificateVerdict:
    """Critical when it is not Ready or expires within `critical_days` (or has no
    certificate at all), a warning within `warn_days`, else ok."""
    days_left = (state.not_after - now).total_seconds() / DAY if state.not_after else None
    needs_renewal = (
        state.renewal_time is not None and now >= state.renewal_time and state.issuing != "True"
    )
    if not state.ready:
        why = state.ready_message or state.ready_reason or "no Ready condition"
        severity, reason = Severity.CRITICAL, f"not Ready: {why}"
    elif days_left is None:
        severity, reason = Severity.CRITICAL, "Ready, but no notAfter: no certificate issued"
    elif days_left < 0:
        severity, reason = Severity.CRITICAL, f"expired {-days_left:.1f} days ago"
    elif days_left < critical_days:
        severity, reason = Severity.CRITICAL, f"expires in {days_left:.1f} days"
    elif days_left < warn_days:
        severity, reason = Severity.WARNING, f"expires in {days_left:.1f} days"
    else:
        severity, reason = Severity.OK, f"valid for {days_left:.0f} more days"
    if state.failed_attempts:
        reason += f"; {state.failed_attempts} failed issuance attempt(s)"
    if needs_renewal:
        reason += f"; past its renewal time {rfc3339(state.renewal_time)} and not being renewed"
    return CertificateVerdict(severity, days_left, reason, needs_renewal)


def report_row(state: CertificateState, verdict: CertificateVerdict) -> dict[str, Any]:
    """One row of the `certificates` table."""
    return {
        "certificate": state.name,
        "severity": verdict.severity.value,
        "notAfter": rfc3339(state.not_after),
        "days left": f"{verdict.days_left:.1f}" if verdict.days_left is not None else "-",
        "renewalTime": rfc3339(state.renewal_time),
        "ready": "True" if state.ready else f"False ({state.ready_reason or '-'})",
        "failed issuance attempts": state.failed_attempts,
        "revision": state.revision,
        "detail": verdict.reason,
    }


class IssuancePhase(StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class IssuanceProgress:
    phase: IssuancePhase
    detail: str


def issuance_progress(before: CertificateState, now: CertificateState) -> IssuanceProgress:
    """Where a renewal triggered on `before` stands. Done = Issuing gone, Ready True,
    revision up by one and a later notAfter; failed = cert-manager counted a failed
    attempt or set Issuing=False (its issuing controller does both when the
    CertificateRequest fails)."""
    if now.failed_attempts > before.failed_attempts or now.issuing == "False":
        return IssuanceProgress(
            IssuancePhase.FAILED,
            f"issuance failed ({now.issuing_reason or 'Failed'}): {now.issuing_message or '-'}",
        )
    later = (
        now.not_after is not None
        and before.not_after is not None
        and now.not_after > before.not_after
    ) or (before.not_after is None and now.not_after is not None)
    if now.issuing is None and now.ready and now.revision == before.revision + 1 and later:
        return IssuanceProgress(
            IssuancePhase.DONE,
            f"revision {before.revision} -> {now.revision}, notAfter "
            f"{rfc3339(before.not_after)} -> {rfc3339(now.not_after)}",
        )
    waiting = []
    if now.issuing is not None:
        waiting.append(f"Issuing={now.issuing}")
    if not now.ready:
        waiting.append(f"Ready=False ({now.ready_reason or '-'})")
    if now.revision != before.revision + 1:
        waiting.append(f"revision {now.revision} (want {before.revision + 1})")
    if not later:
        waiting.append(f"notAfter {rfc3339(now.not_after)} not later yet")
    return IssuanceProgress(IssuancePhase.PENDING, ", ".join(waiting) or "waiting")
