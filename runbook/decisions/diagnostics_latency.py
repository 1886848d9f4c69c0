"""High API latency: p99 and error rate (from Prometheus, or from two scrapes of the
backend's own `/metrics`), CPU, and the deploys of the last hours → scale or roll back.
Pure, over plain data.

The page's resolution, in order of what the evidence supports:
1. a deploy in the last hours is the usual suspect: roll back to the revision before it;
2. "Scale backend pods if CPU > 80%" (when CPU is not measured, scaling is still offered
   for a p99 over the threshold, and the proposal says CPU was not measured);
3. missing indexes: the slowest statements (pg_stat_statements) are evidence, not an action.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass
from typing import Any

from runbook.decisions.diagnostics import (
    ERROR_RATE,
    P99_SECONDS,
    SCALE_CPU_PERCENT,
    Level,
    Proposal,
    human_seconds,
    worst,
)
from runbook.decisions.scaling import REPLICA_BOUNDS

# One sample of the Prometheus text format: name, optional {labels}, value.
_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)"
)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text exposition → {(name, labels): value}; comments skipped."""
    samples: Samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match or line.startswith("#"):
            continue
        labels = frozenset(_LABEL.findall(match["labels"] or ""))
        try:
            samples[(match["name"], labels)] = float(match["value"])
        except ValueError:
            continue
    return samples


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' `histogram_quantile`: cumulative (upper bound, count) pairs → the
    q-quantile, interpolated linearly inside its bucket; None with no observations. A
    quantile in the +Inf bucket is the highest finite bound, as Prometheus answers."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower_bound
            if count == lower_count:
                return upper
            return lower_bound + (upper - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = upper, count
    return buckets[-1][0]


@dataclass(frozen=True)
class TrafficWindow:
    """What the API served in a window: requests, p99, error rate, CPU (None: unknown)."""

    source: str
    seconds: float
    requests: float
    p99_seconds: float | None
    error_rate: float | None
    cpu_percent: float | None

    @property
    def level(self) -> Level:
        return worst(P99_SECONDS.level(self.p99_seconds), ERROR_RATE.level(self.error_rate))

    @property
    def summary(self) -> str:
        p99 = "-" if self.p99_seconds is None else f"{self.p99_seconds * 1000:.0f} ms"
        errors = "-" if self.error_rate is None else f"{self.error_rate:.1%}"
        cpu = "not measured" if self.cpu_percent is None else f"{self.cpu_percent:.0f}%"
        return (
            f"p99 {p99}, 5xx {errors} of {self.requests:.0f} requests over "
            f"{human_seconds(self.seconds)}, CPU {cpu} ({self.source})"
        )


def _sum(samples: Samples, name: str, **match: str) -> float:
    return sum(v for (n, labels), v in samples.items() if n == name and _has(labels, match))


def _has(labels: frozenset[tuple[str, str]], match: dict[str, str]) -> bool:
    have = dict(labels)
    return all(re.fullmatch(pattern, have.get(k, "")) for k, pattern in match.items())


def window_from_scrapes(before: str, after: str, seconds: float) -> TrafficWindow:
    """Two scrapes of `/metrics`, `seconds` apart → the window between them (counter
    deltas: what Prometheus' `rate()` would compute without Prometheus)."""
    first, second = parse_metrics(before), parse_metrics(after)
    bounds = {
        dict(labels)["le"]
        for (name, labels) in second
        if name == "http_request_duration_seconds_bucket"
    }
    buckets = [
        (
            float(le),
            _sum(second, "http_request_duration_seconds_bucket", le=re.escape(le))
            - _sum(first, "http_request_duration_seconds_bucket", le=re.escape(le)),
        )
        for le in bounds
    ]
    requests = _sum(second, "http_requests_total") - _sum(first, "http_requests_total")
    errors = _sum(second, "http_requests_total", status="5..") - _sum(
        first, "http_requests_total", status="5.."
    )
    cpu = None
    if any(n == "process_cpu_seconds_total" for n, _ in second):
        used = _sum(second, "process_cpu_seconds_total") - _sum(first, "process_cpu_seconds_total")
        cpu = 100.0 * used / seconds
    return TrafficWindow(
        source="two scrapes of the backend's /metrics (no Prometheus configured)",
        seconds=seconds,
        requests=requests,
        p99_seconds=histogram_quantile(0.99, buckets),
        error_rate=errors / requests if requests > 0 else None,
        cpu_percent=cpu,
    )


# --- recent deploys ------------------------------------------------------------------------


def parse_time(text: str) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None


def recent_revisions(
    revisions: list[dict[str, Any]], now: dt.datetime, hours: float
) -> list[dict[str, Any]]:
    """Revisions (from `list_deployment_revisions`) created in the last `hours`."""
    since = now - dt.timedelta(hours=hours)
    return [r for r in revisions if (created := parse_time(r["created"])) and created >= since]


def propose_rollback(
    deployment: str,
    current_revision: int,
    revisions: list[dict[str, Any]],
    now: dt.datetime,
    hours: float,
) -> Proposal | None:
    """Roll back when the running revision was rolled out in the last `hours` and an
    older revision exists: the rollback runbook shows current → target and asks itself."""
    recent = {r["revision"] for r in recent_revisions(revisions, now, hours)}
    older = [r for r in revisions if r["revision"] < current_revision]
    current = next((r for r in revisions if r["revision"] == current_revision), None)
    if current is None or current_revision not in recent or not older:
        return None
    target = older[-1]
    created = parse_time(current["created"])
    age = human_seconds((now - created).total_seconds()) if created else "?"
    images = ", ".join(current["images"].values())
    return Proposal(
        kind="rollback",
        title=f"Roll back deployment/{deployment} to revision {target['revision']}",
        reason=f"revision {current_revision} ({images}) was rolled out {age} ago",
        target=f"deployment/{deployment}",
        steps=(
            f"the rollback runbook: kubectl rollout undo deployment/{deployment} "
            f"--to-revision={target['revision']} (it shows current → target and asks for "
            "its own approval)",
        ),
        facts={
            "current revision": f"{current_revision}: {images} ({age} old)",
            "target revision": f"{target['revision']}: {', '.join(target['images'].values())}",
        },
        action={"component": "backend", "to_revision": target["revision"]},
    )


def backend_replicas_wanted(replicas: int) -> int:
    """Half again as many backend replicas, at least one more, within the bounds."""
    bounds = REPLICA_BOUNDS["backend"]
    return max(bounds.floor, min(bounds.ceiling, replicas + max(1, math.ceil(replicas / 2))))


def propose_scale(window: TrafficWindow, replicas: int, deployment: str) -> Proposal | None:
    """Scale the backend when CPU > 80% (the page), or when p99 is over its threshold and
    CPU is not measured; never above the backend's ceiling."""
    cpu = window.cpu_percent
    slow = P99_SECONDS.level(window.p99_seconds) in (Level.WARNING, Level.CRITICAL)
    if cpu is not None and cpu <= SCALE_CPU_PERCENT:
        return None
    if cpu is None and not slow:
        return None
    wanted = backend_replicas_wanted(replicas)
    if wanted <= replicas:
        return None
    why = (
        f"CPU {cpu:.0f}% > {SCALE_CPU_PERCENT:.0f}%"
        if cpu is not None
        else "p99 over threshold and CPU not measured"
    )
    return Proposal(
        kind="scale",
        title=f"Scale deployment/{deployment} from {replicas} to {wanted} replicas",
        reason=f"{why}: {window.summary}",
        target=f"deployment/{deployment}",
        steps=(f"kubectl scale deployment/{deployment} --replicas={wanted} (the scale runbook)",),
        facts={
            "traffic": window.summary,
            "replicas now": str(replicas),
            "replicas after": str(wanted),
            "bounds": f"{REPLICA_BOUNDS['backend'].floor}-{REPLICA_BOUNDS['backend'].ceiling}",
        },
        action={"component": "backend", "replicas": wanted},
    )


def slow_statement_rows(statements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pg_stat_statements rows for the evidence table (query text already normalised by
    the extension: constants are `$1`, `$2`…)."""
    return [
        {
            "mean ms": f"{s['mean_exec_time']:.1f}",
            "calls": s["calls"],
            "total ms": f"{s['total_exec_time']:.0f}",
            "query": " ".join(str(s["query"]).split())[:160],
        }
        for s in statements
    ]
