"""What every diagnosis of the page's "Common Issues" hands back, and the thresholds of the
page's "Key Metrics" table it judges by. Pure: plain data in, plain data out.

A diagnosis is evidence (read-only numbers from the real systems), a level, and a ranked
list of proposals. A proposal carries the exact action it stands for (`action`: the pids
with their backend_start, the key names, the replica count…): the runbook shows it to the
approver and, once approved, carries out that and nothing re-queried.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Level(StrEnum):
    OK = "ok"
    WARNING = "warning"
    CRITICAL = "critical"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Threshold:
    """A row of the page's Key Metrics table: warning above `warning`, critical above
    `critical` (both in the metric's unit)."""

    warning: float
    critical: float

    def level(self, value: float | None) -> Level:
        if value is None:
            return Level.UNKNOWN
        if value > self.critical:
            return Level.CRITICAL
        if value > self.warning:
            return Level.WARNING
        return Level.OK


# The page's Key Metrics table (Monitoring > Key Metrics).
P99_SECONDS = Threshold(warning=0.5, critical=2.0)
ERROR_RATE = Threshold(warning=0.01, critical=0.05)
CPU_PERCENT = Threshold(warning=70, critical=90)
DB_CONNECTIONS_PERCENT = Threshold(warning=80, critical=95)
QUEUE_DEPTH = Threshold(warning=1000, critical=10000)
# Common Issues > High API Latency: "Scale backend pods if CPU > 80%".
SCALE_CPU_PERCENT = 80.0
# Redis memory, used vs maxmemory: the page's "Memory Usage" row.
REDIS_MEMORY_PERCENT = Threshold(warning=80, critical=95)


def worst(*levels: Level) -> Level:
    """The most serious of `levels` (unknown only when nothing is known)."""
    order = [Level.CRITICAL, Level.WARNING, Level.OK]
    for level in order:
        if level in levels:
            return level
    return Level.UNKNOWN


@dataclass(frozen=True)
class Proposal:
    """One remediation, as the approver sees it and as the runbook then carries it out.

    `kind` names the action (`terminate-idle-sessions`, `delete-cache-keys`,
    `raise-maxmemory`, `scale`, `rollback`); `action` holds its exact arguments.
    """

    kind: str
    title: str
    reason: str
    target: str
    steps: tuple[str, ...]
    facts: dict[str, str] = field(default_factory=dict)
    action: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Diagnosis:
    """What a diagnose-* runbook returns: evidence, a verdict, ranked proposals, and what
    was carried out (None when nothing was)."""

    issue: str
    level: Level
    summary: str
    evidence: dict[str, Any]
    proposals: list[Proposal]
    carried_out: dict[str, Any] | None = None


def human_bytes(n: float) -> str:
    """`1536` → `1.5 KiB`."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    """`754` → `12 min 34 s`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
