"""Certificate severity and renewal progress, judged on literal Certificates."""

from __future__ import annotations

import datetime as dt

import pytest

from runbook.decisions.certificates import (
    IssuancePhase,
    Severity,
    certificate_state,
    check_thresholds,
    issuance_progress,
    judge_certificate,
)
from runbook.decisions.refusal import Refused

NOW = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def cert(days_left=60.0, ready="True", renewal_in_days=30.0, **status):
    not_after = NOW + dt.timedelta(days=days_left)
    renewal = NOW + dt.timedelta(days=renewal_in_days)
    conditions = [{"type": "Ready", "status": ready, "reason": "Ready", "message": "m"}]
    conditions += status.pop("conditions", [])
    return {
        "metadata": {"name": "api-tls"},
        "spec": {"secretName": "tls", "dnsNames": ["api.example.com"]},
        "status": {
            "notAfter": not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "renewalTime": renewal.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "revision": 4,
            "conditions": conditions,
            **status,
        },
    }


@pytest.mark.parametrize(
    ("days_left", "severity"),
    [
        (60, Severity.OK),
        (21, Severity.OK),
        (20.9, Severity.WARNING),
        (7, Severity.WARNING),
        (6.9, Severity.CRITICAL),
        (-1, Severity.CRITICAL),
    ],
)
def test_severity_by_days_left(days_left, severity):
    verdict = judge_certificate(certificate_state(cert(days_left)), NOW, 21, 7)
    assert verdict.severity is severity


def test_not_ready_is_critical_whatever_the_days_left():
    verdict = judge_certificate(certificate_state(cert(80, ready="False")), NOW, 21, 7)
    assert verdict.severity is Severity.CRITICAL and verdict.reason.startswith("not Ready")


def test_renewal_needed_only_past_renewal_time_and_not_issuing():
    overdue = certificate_state(cert(10, renewal_in_days=-1))
    assert judge_certificate(overdue, NOW, 21, 7).needs_renewal
    issuing = certificate_state(
        cert(10, renewal_in_days=-1, conditions=[{"type": "Issuing", "status": "True"}])
    )
    assert not judge_certificate(issuing, NOW, 21, 7).needs_renewal
    assert not judge_certificate(certificate_state(cert(10)), NOW, 21, 7).needs_renewal


def test_thresholds_must_leave_room_for_a_warning():
    with pytest.raises(Refused, match="critical_days: 7 must be below warn_days"):
        check_thresholds(7, 7)
    check_thresholds(21, 7)


def test_issuance_progress():
    before = certificate_state(cert(10))
    issuing = certificate_state(cert(10, conditions=[{"type": "Issuing", "status": "True"}]))
    assert issuance_progress(before, issuing).phase is IssuancePhase.PENDING
    done = certificate_state(cert(90, revision=5))
    assert issuance_progress(before, done).phase is IssuancePhase.DONE
    same_date = certificate_state(cert(10, revision=5))
    assert issuance_progress(before, same_date).phase is IssuancePhase.PENDING
    failed = certificate_state(
        cert(
            10,
            failedIssuanceAttempts=1,
            conditions=[{"type": "Issuing", "status": "False", "reason": "Failed", "message": "x"}],
        )
    )
    progress = issuance_progress(before, failed)
    assert progress.phase is IssuancePhase.FAILED and "Failed" in progress.detail
