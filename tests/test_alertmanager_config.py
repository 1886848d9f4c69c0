"""monitoring/alertmanager.yml is valid, and a real Alertmanager running it delivers one
group per alert rule with a critical alert muting the warning of the same metric (and only
that one): a condition over both thresholds opens one incident, not two."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox.receiver import NotificationReceiver
from sandbox.services.alertmanager import (
    ALERTMANAGER_CONFIG,
    AlertmanagerServer,
    alertmanager_config,
)


def _amtool() -> str:
    found = shutil.which("amtool") or "/usr/bin/amtool"
    if not Path(found).is_file():
        pytest.fail("amtool is missing: run scripts/setup.sh (Debian's `prometheus-alertmanager`)")
    return found


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_amtool(), "check-config", str(path)], capture_output=True, text=True, timeout=60
    )


def test_amtool_accepts_the_production_and_the_sandbox_configuration(tmp_path) -> None:
    sandbox = tmp_path / "sandbox.yml"
    sandbox.write_text(
        alertmanager_config(
            "http://127.0.0.1:9/alertmanager",
            group_wait="200ms",
            group_interval="5s",
            repeat_interval="4h",
        )
    )
    for path in (ALERTMANAGER_CONFIG, sandbox):
        result = _check_config(path)
        assert result.returncode == 0, result.stdout + result.stderr


def test_amtool_would_catch_a_broken_configuration(tmp_path) -> None:
    broken = tmp_path / "broken.yml"
    config = ALERTMANAGER_CONFIG.read_text()
    broken.write_text(config.replace("receiver: alert-bridge", "receiver: nobody"))
    assert _check_config(broken).returncode != 0


@pytest.fixture
def delivered() -> Iterator[tuple[AlertmanagerServer, NotificationReceiver]]:
    with (
        NotificationReceiver() as receiver,
        AlertmanagerServer(webhook_url=f"{receiver.url}/alertmanager") as alertmanager,
    ):
        yield alertmanager, receiver


def _alert(alertname: str, severity: str, metric: str, run: str, **labels: str) -> dict[str, Any]:
    return {
        "labels": {
            "alertname": alertname,
            "severity": severity,
            "metric": metric,
            "test": run,
            **labels,
        },
        "annotations": {"summary": alertname},
        "startsAt": dt.datetime.now(dt.UTC).isoformat(),
    }


def _delivered_alerts(receiver: NotificationReceiver, run: str) -> list[tuple[str, str]]:
    return sorted(
        (alert["labels"]["alertname"], alert["labels"].get("component", ""))
        for notification in receiver.received
        if notification.json
        for alert in notification.json["alerts"]
        if alert["labels"].get("test") == run
    )


def test_a_critical_alert_mutes_only_the_warning_of_its_own_metric(delivered) -> None:
    alertmanager, receiver = delivered
    run = uuid.uuid4().hex
    alerts = [
        _alert("HighLatency", "critical", "latency_p99", run),
        _alert("ElevatedLatency", "warning", "latency_p99", run),  # muted
        _alert("CpuUsageCritical", "critical", "cpu", run, component="frontend"),
        _alert("CpuUsageHigh", "warning", "cpu", run, component="frontend"),  # muted
        _alert("CpuUsageHigh", "warning", "cpu", run, component="backend"),  # another component
        _alert("QueueBacklogHigh", "warning", "queue_depth", run),  # no critical of its own
    ]

    httpx.post(f"{alertmanager.url}/api/v2/alerts", json=alerts, timeout=10).raise_for_status()

    # Every group is flushed once group_wait (200 ms) is over; the last expected group
    # arriving means the muted ones had their turn too.
    expected = [
        ("CpuUsageCritical", "frontend"),
        ("CpuUsageHigh", "backend"),
        ("HighLatency", ""),
        ("QueueBacklogHigh", ""),
    ]
    receiver.wait_for(lambda _: _delivered_alerts(receiver, run) == expected, timeout=20)
    states = httpx.get(
        f"{alertmanager.url}/api/v2/alerts", params={"filter": f'test="{run}"'}, timeout=10
    ).json()
    muted = sorted(
        (a["labels"]["alertname"], a["labels"].get("component", ""))
        for a in states
        if a["status"]["inhibitedBy"]
    )

    assert muted == [("CpuUsageHigh", "frontend"), ("ElevatedLatency", "")]
    assert _delivered_alerts(receiver, run) == expected
