"""Every alerting drill end to end, as a newcomer runs it on `make up`: the served `drill`
deployment, started through the REST API, causes the issue for real (slow backend under
traffic, idle PostgreSQL sessions, a full Redis, a Celery backlog on the broker); a real
Prometheus (the sandbox's rule clock) fires the alert, a real Alertmanager sends it to the
alert bridge, prefect.yaml's alert trigger starts the served `incident-response`, which
starts the matching diagnose-* run; the operator acknowledges through the API; the
diagnosis names the cause in its `diagnosis-<issue>` artifact; the drill removes the
condition, the alert resolves the same way and closes the incident; the drill reports both
times. For the queue backlog the operator also approves the diagnosis's remediation in
its run's form, and the workers are really scaled.

The session serves incident-response without its triggers (other tests post alerts);
these tests put prefect.yaml's triggers on it for their own duration, as `make up` has them.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import psycopg
import pytest
import redis

from deployments.catalog import load_catalog, to_runner_deployment
from runbook.alert_events import FIRING, RESOLVED
from runbook.decisions.incidents import incident_id
from sandbox import conditions
from sandbox.drills import ALERTS
from sandbox.platform import Sandbox
from tests.alert_helpers import alert_events_of, monitoring, running_bridge
from tests.helpers import prefect_rest
from tests.test_served_e2e import _artifact, _start

pytestmark = pytest.mark.slow

FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
NEWCOMER = "newcomer"


def group_of(alertname: str) -> str:
    """Alertmanager's group key for an alert (the sandbox groups by alertname)."""
    return f'{{}}:{{alertname="{alertname}"}}'


ALL_GROUPS = [group_of(name) for names in ALERTS.values() for name in names]


@pytest.fixture
def alerting(platform: Sandbox, served_api: str) -> Iterator[None]:
    """Prometheus → Alertmanager → the bridge → Prefect, and incident-response served
    with prefect.yaml's alert triggers, for this test only. Afterwards the triggers are
    gone again and no incident run or diagnosis run it started is left waiting."""
    assert platform.backend is not None
    spec = next(s for s in load_catalog() if s.name == "incident-response")
    started = time.time()
    from tasks.incidents import release_incident

    # An earlier test's incident of these groups must not make ours a "late repeat".
    for group in ALL_GROUPS:
        release_incident(incident_id(group))
    with running_bridge(served_api) as bridge, monitoring(platform, bridge):
        to_runner_deployment(spec).apply()
        try:
            yield
        finally:
            to_runner_deployment(replace(spec, triggers=())).apply()
            with prefect_rest(served_api) as api:
                for run in _runs(api, "incident-response", started) + _runs(
                    api, "diagnose-%", started
                ):
                    if run["state"]["type"] not in FINAL:
                        api.post(
                            f"/flow_runs/{run['id']}/set_state",
                            json={"state": {"type": "CANCELLED"}, "force": True},
                        )
            for group in ALL_GROUPS:
                release_incident(incident_id(group))


def _runs(api: httpx.Client, flow_name: str, since: float) -> list[dict[str, Any]]:
    """Runs of `flow_name` (a LIKE pattern with `%`) created after `since`, oldest first."""
    by_name = {"like_": flow_name} if "%" in flow_name else {"any_": [flow_name]}
    runs = api.post("/flow_runs/filter", json={"flows": {"name": by_name}, "limit": 200}).json()
    return sorted((r for r in runs if _created(r) >= since - 1), key=lambda r: _created(r))


def _created(run: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(run["created"]).timestamp()


def _pause_key(run: dict[str, Any]) -> str | None:
    if run["state"]["type"] != "PAUSED":
        return None
    return str(run["state"]["state_details"].get("pause_key"))


def _form_description(api: httpx.Client, run: dict[str, Any]) -> str:
    """What the paused run's form shows above its fields (as the UI reads it)."""
    keyset = run["state"]["state_details"]["run_input_keyset"]
    found = api.get(f"/flow_runs/{run['id']}/input/{keyset['description']}")
    return str(found.json()) if found.status_code == 200 else ""


@dataclass(frozen=True)
class Case:
    issue: str
    check_diagnosis: Callable[[str], None]  # asserts the cause in `diagnosis-<issue>`
    # Approve the diagnosis's remediation in its run's form; then, once the diagnosis
    # run is over and while the drill still holds its condition, `observe` reads the
    # real system (what the drill's own undo would otherwise have done by the end).
    approve: bool = False
    observe: Callable[[Sandbox], Any] | None = None
    hold_seconds: int = 15


def _number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in:\n{text}"
    return float(found.group(1))


def _latency_found(artifact: str) -> None:
    assert "## Diagnosis: latency — critical" in artifact, artifact
    assert _number(r"p99 (\d+) ms", artifact) > 2000  # over HighLatency's 2 s


def _connections_found(artifact: str) -> None:
    # Judged as the alert judges: the drill's 18 of the pool's 20, not ok (max_connections
    # alone, 100 here, would say ok).
    assert re.search(r"## Diagnosis: connections — (warning|critical)", artifact), artifact
    (pool,) = _table(artifact, "The application's pool")
    assert int(pool["db_connections"]) >= 18 and pool["pool size"] == "20", pool
    (by_state,) = _table(artifact, "Client connections by state")
    assert int(by_state["idle"]) >= 18
    # Idle for seconds, over the sandbox's RUNBOOK_CONNECTIONS_IDLE_MINUTES (0.1): every
    # held session is proposed, none of them ours or a superuser's.
    proposed = _table(artifact, "Idle longer than the threshold")
    assert sum(row["application"] == "held-idle" for row in proposed) >= 18, proposed
    # `postgres` is the sandbox's superuser (its admin_dsn); the drill holds the app's user.
    assert "postgres" not in {row["user"] for row in proposed}, proposed
    spared = _table(artifact, "Idle but never ended")
    assert "our own session" in [row["why"] for row in spared], spared
    assert not {row["pid"] for row in spared} & {row["pid"] for row in proposed}
    (proposal,) = _table(artifact, "Proposals")
    assert proposal["proposal"].startswith(f"End {len(proposed)} sessions idle over 6 s on ")


def _table(artifact: str, section: str) -> list[dict[str, str]]:
    """The rows of the markdown table under the `### <section>…` heading."""
    body = next(part for part in artifact.split("\n### ") if part.startswith(section))
    lines = [line for line in body.splitlines() if line.startswith("|")]
    if not lines:
        return []
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
        for line in lines[2:]
    ]


def _redis_found(artifact: str) -> None:
    assert "## Diagnosis: redis-memory — critical" in artifact, artifact
    assert _number(r"maxmemory used \((\d+)%\)", artifact) >= 95  # full


def _backlog_found(artifact: str) -> None:
    assert "## Diagnosis: queue-backlog — warning" in artifact, artifact
    assert "1500 tasks waiting" in artifact


def _held_sessions(platform: Sandbox) -> int:
    """The drill's idle sessions PostgreSQL still has."""
    with psycopg.connect(platform.postgres.admin_dsn, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'held-idle'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _report_keys(platform: Sandbox) -> int:
    """The drill's cache values Redis still holds (its cache database, 1 in the sandbox)."""
    cache = conditions.redis_client(platform.redis.url, 1)
    try:
        return len(cache.keys("cache:report:*"))
    finally:
        cache.close()


CASES = [
    Case("latency", _latency_found),
    # Held 40 s: the approved termination must be what ends the sessions, long before the
    # drill would close them itself.
    Case("connections", _connections_found, approve=True, observe=_held_sessions, hold_seconds=40),
    Case("redis-memory", _redis_found, approve=True, observe=_report_keys, hold_seconds=40),
    Case("queue-backlog", _backlog_found, approve=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.issue for c in CASES])
def test_drill_alert_to_incident_to_diagnosis_to_resolution(
    platform: Sandbox, kube: Any, served_api: str, alerting: None, case: Case
) -> None:
    started = time.time()
    workers_before = _replicas(kube, "celery-workers")
    acknowledged: set[str] = set()
    approved: dict[str, Any] = {}
    with prefect_rest(served_api) as api:
        drill_run = (
            _start(
                api,
                "drill/drill",
                {
                    "issue": case.issue,
                    "detect_timeout_seconds": 60,
                    "hold_seconds": case.hold_seconds,
                    "recover_timeout_seconds": 90,
                },
            )
            .raise_for_status()
            .json()
        )

        # The newcomer follows: acknowledges each incident the drill's alerts open and,
        # where the case approves, then approves the diagnosis's proposal in its form.
        give_up = time.monotonic() + 160 + case.hold_seconds
        while True:
            drill = api.get(f"/flow_runs/{drill_run['id']}").raise_for_status().json()
            if drill["state"]["type"] in FINAL:
                break
            assert time.monotonic() < give_up, f"drill {case.issue} not finished"
            for run in _runs(api, "incident-response", started):
                if _pause_key(run) == "acknowledge" and run["id"] not in acknowledged:
                    api.post(
                        f"/flow_runs/{run['id']}/resume",
                        json={"run_input": {"acknowledged_by": NEWCOMER}},
                    ).raise_for_status()
                    acknowledged.add(run["id"])
            # As the runbook page orders it: acknowledged first, then mitigated.
            if case.approve and acknowledged and not approved:
                for run in _runs(api, f"diagnose-{case.issue}", started):
                    if _pause_key(run) and run["state"]["state_details"].get("run_input_keyset"):
                        approved = {"run": run, "plan": _form_description(api, run)}
                        api.post(
                            f"/flow_runs/{run['id']}/resume",
                            json={
                                "run_input": {
                                    "approve": True,
                                    "approver": NEWCOMER,
                                    "reason": f"drill: {case.issue}",
                                }
                            },
                        ).raise_for_status()
                        break
            if approved and case.observe and "observed" not in approved:
                diagnosis = api.get(f"/flow_runs/{approved['run']['id']}").json()
                if diagnosis["state"]["type"] in FINAL:
                    approved["observed"] = case.observe(platform)
                    approved["drill_state"] = drill["state"]["type"]
            time.sleep(0.3)
        assert drill["state"]["type"] == "COMPLETED", drill["state"]["message"]
        report = str(_artifact(api, drill_run["id"], "drill-report"))
        incidents = _runs(api, "incident-response", started)
        diagnoses = _runs(api, f"diagnose-{case.issue}", started)
        # The incident the drill followed: its report names it.
        followed = next(r for r in incidents if f"({r['id']})" in report)
        # Its alert really fired: Alertmanager's webhook reached Prefect through the bridge.
        alertname = followed["parameters"]["alertname"]
        assert alertname in ALERTS[case.issue]
        group = followed["parameters"]["group_key"]
        assert group == group_of(alertname)
        alert_events = _alert_events_since(served_api, group, started)
        assert [e["event"] for e in alert_events][:1] == [FIRING]
        assert alert_events[0]["payload"]["labels"]["runbook"] == f"diagnose-{case.issue}"
        assert followed["id"] in acknowledged
        # It started the matching diagnosis, which found the cause.
        assert diagnoses, f"no diagnose-{case.issue} run"
        for run in diagnoses:
            assert "started-by-incident-response" in run["tags"]
            assert run["parameters"]["remediate"] is True
            case.check_diagnosis(str(_artifact(api, run["id"], f"diagnosis-{case.issue}")))

        # The incident closed once the alert resolved; its post-mortem says who did what.
        _wait_until(lambda: _state(api, followed["id"]) in FINAL, 30)
        assert _state(api, followed["id"]) == "COMPLETED"
        post_mortem = str(_artifact(api, followed["id"], "post-mortem"))

    took = time.time() - started
    assert RESOLVED in [e["event"] for e in _alert_events_since(served_api, group, started)]
    assert f"Acknowledged by {NEWCOMER}" in post_mortem
    assert "Resolved by alertmanager" in post_mortem
    assert "**incident ended:** Completed" in report
    detect = _seconds(report, "time to detect")
    recover = _seconds(report, "time to recover")
    assert 0 < detect < recover, report
    if case.issue == "queue-backlog":
        _remediation_was_carried_out(platform, kube, approved, post_mortem, workers_before)
    elif case.issue == "connections":
        _sessions_were_ended(approved, post_mortem)
    elif case.issue == "redis-memory":
        _cache_keys_were_deleted(approved, post_mortem)
    else:
        assert "No mitigation carried out" in post_mortem
        assert _replicas(kube, "celery-workers") == workers_before
    print(
        f"\n{case.issue} drill: detect {detect:.1f} s, recover {recover:.1f} s, "
        f"test {took:.0f} s ({len(incidents)} incident(s): "
        f"{', '.join(r['parameters']['alertname'] for r in incidents)})"
    )


def _cache_keys_were_deleted(approved: dict[str, Any], post_mortem: str) -> None:
    """The approved deletion removed exactly the keys its plan listed, while the drill
    still held Redis full; the broker is another database and never part of a plan."""
    assert approved, "the diagnosis never paused for its remediation"
    plan = approved["plan"]
    listed = set(re.findall(r"cache:report:\d+", plan))
    assert listed and "celery" not in plan.replace("Celery broker", ""), plan
    assert approved["drill_state"] == "RUNNING"
    assert approved["observed"] == 20 - len(listed)  # the drill wrote 20
    assert "Mitigation: Delete" in post_mortem and f"approved by {NEWCOMER}" in post_mortem


def _sessions_were_ended(approved: dict[str, Any], post_mortem: str) -> None:
    """The approved termination ended every held session while the drill still held
    them, and the post-mortem records it with its approver."""
    assert approved, "the diagnosis never paused for its remediation"
    plan = approved["plan"]
    ended = int(_number(r"End (\d+) sessions idle", plan))
    assert ended >= 18, plan
    assert approved["drill_state"] == "RUNNING"  # still holding its sessions
    assert approved["observed"] == 0  # and PostgreSQL has none of them left
    assert f"Mitigation: End {ended} sessions idle" in post_mortem, post_mortem
    assert f"approved by {NEWCOMER}" in post_mortem


def _remediation_was_carried_out(
    platform: Sandbox, kube: Any, approved: dict[str, Any], post_mortem: str, before: int
) -> None:
    """The approved plan, as the form showed it, was done on the emulator and recorded."""
    assert approved, "the diagnosis never paused for its remediation"
    plan = approved["plan"]
    wanted = int(_number(r"to (\d+) replicas", plan))
    assert f"deployment/celery-workers from {before} to {wanted} replicas" in plan, plan
    assert wanted > before
    assert _replicas(kube, "celery-workers") == wanted
    scaled = [w for w in kube.writes if w.kind == "Deployment" and w.name == "celery-workers"]
    assert len(scaled) == 1, scaled
    assert redis.Redis.from_url(platform.redis.url).llen("celery") == 0  # backlog removed
    assert (
        f"Mitigation: Scale deployment/celery-workers from {before} to {wanted} replicas, "
        f"approved by {NEWCOMER}"
    ) in post_mortem, post_mortem
    assert approved["run"]["id"] in post_mortem


def _alert_events_since(api_url: str, group: str, since: float) -> list[dict[str, Any]]:
    """This drill's events of an alert group (earlier tests post the same alerts)."""
    return [
        e
        for e in alert_events_of(api_url, group)
        if dt.datetime.fromisoformat(e["occurred"]).timestamp() >= since - 1
    ]


def _replicas(kube: Any, name: str) -> int:
    from tests.release_helpers import live

    return int(live(kube, name)["spec"]["replicas"])


def _state(api: httpx.Client, run_id: str) -> str:
    return str(api.get(f"/flow_runs/{run_id}").raise_for_status().json()["state"]["type"])


def _wait_until(condition: Callable[[], bool], timeout: float) -> None:
    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, "condition not met in time"
        time.sleep(0.3)


def _seconds(report: str, row: str) -> float:
    """The number in `- **time to detect:** 23s (23.4 s)`."""
    line = next(line for line in report.splitlines() if f"**{row}:**" in line)
    return float(line.rsplit("(", 1)[1].removesuffix(" s)"))
