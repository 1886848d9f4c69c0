"""Log search without Elasticsearch: which pod log lines match an operator's query.

The runbook page's Kibana queries, as filters over the lines `kubectl logs --timestamps`
prints: a minimum level (`level:error`), a text match, a field match
(`user_id:"user123"`) and a numeric condition (`duration_ms:>1000`); the time window is
the API's own `sinceSeconds`. JSON lines are matched field by field; any other line
(a stack trace, a framework's banner) only by text, and by level when it starts with one.
Pure functions over plain text, tested with literals.
"""

from __future__ import annotations

import datetime as dt
import json
import operator
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from runbook.decisions.refusal import Refused
from runbook.redaction import redact_row_data

Level = Literal["debug", "info", "warning", "error", "critical"]
LEVELS: tuple[Level, ...] = ("debug", "info", "warning", "error", "critical")
# What loggers write instead of our five names (Python, Go, Java, syslog conventions).
_LEVEL_ALIASES = {
    "trace": "debug",
    "notice": "info",
    "warn": "warning",
    "err": "error",
    "fatal": "critical",
    "crit": "critical",
    "panic": "critical",
}
# Fields a JSON log line keeps its level and time in, by convention.
_LEVEL_FIELDS = ("level", "levelname", "severity", "lvl")
_TIME_FIELDS = ("ts", "time", "timestamp", "@timestamp")
MAX_LINE_CHARS = 400  # of one line, as published; a match is evidence, not a dump

_FIELD = r"[A-Za-z_@][\w.@-]*"
# `name=value` or Kibana's `name:value` / `name:"value"`.
FIELD_MATCH_PATTERN = rf"^\s*{_FIELD}\s*[=:]\s*\S.*$"
_FIELD_MATCH = re.compile(rf"^\s*(?P<name>{_FIELD})\s*[=:]\s*(?P<value>\S.*?)\s*$")
# `name>1000`, `name >= 2.5`, Kibana's `name:>1000`.
NUMERIC_CONDITION_PATTERN = rf"^\s*{_FIELD}\s*:?\s*(>=|<=|==|!=|>|<|=)\s*-?\d+(\.\d+)?\s*$"
_NUMERIC = re.compile(
    rf"^\s*(?P<name>{_FIELD})\s*:?\s*(?P<op>>=|<=|==|!=|>|<|=)\s*(?P<value>-?\d+(?:\.\d+)?)\s*$"
)
_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "=": operator.eq,
    "==": operator.eq,
    "!=": operator.ne,
}
# The kubelet's `timestamps=true` prefix: RFC 3339 with up to nanoseconds, then a space.
_STAMPED = re.compile(
    r"^(?P<date>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(?P<frac>\d{1,9}))?"
    r"(?P<zone>Z|[+-]\d\d:\d\d) (?P<rest>.*)$"
)
_LEADING_LEVEL = re.compile(r"^\W{0,2}(?P<level>[A-Za-z]{3,8})\b")


# --- the operator's query ------------------------------------------------------------------


@dataclass(frozen=True)
class FieldMatch:
    """`user_id=user123`: the field (dotted for nested objects) equals the value as text."""

    name: str
    value: str

    def __str__(self) -> str:
        return f"{self.name}={self.value}"


@dataclass(frozen=True)
class NumericCondition:
    """`duration_ms>1000`: the field holds a number that compares so."""

    name: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.value:g}"

    def holds(self, actual: Any) -> bool:
        if isinstance(actual, bool):
            return False
        if isinstance(actual, str):
            try:
                actual = float(actual)
            except ValueError:
                return False
        return isinstance(actual, int | float) and _OPERATORS[self.op](actual, self.value)


def parse_field_match(text: str, parameter: str = "field_match") -> FieldMatch:
    """`user_id=user123`, `user_id:user123` or `user_id:"user123"`; else refused, naming
    `parameter`."""
    found = _FIELD_MATCH.match(text)
    if not found:
        raise Refused(parameter, f"expected FIELD=VALUE such as user_id=user123, got {text!r}")
    value = found["value"]
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return FieldMatch(found["name"], value)


def parse_numeric_condition(text: str, parameter: str = "numeric_condition") -> NumericCondition:
    """`duration_ms>1000` (also `>=`, `<`, `<=`, `=`, `!=`, and Kibana's `duration_ms:>1000`);
    else refused, naming `parameter`."""
    found = _NUMERIC.match(text)
    if not found:
        raise Refused(
            parameter,
            "expected FIELD OPERATOR NUMBER such as duration_ms>1000 "
            f"(operators > >= < <= = !=), got {text!r}",
        )
    return NumericCondition(found["name"], found["op"], float(found["value"]))


def normal_level(name: Any) -> Level | None:
    """`WARN`, `Warning`, `warning` → `warning`; None for what is not a level."""
    if not isinstance(name, str):
        return None
    lowered = name.strip().lower()
    lowered = _LEVEL_ALIASES.get(lowered, lowered)
    return next((level for level in LEVELS if level == lowered), None)


@dataclass(frozen=True)
class LogQuery:
    """What a line must satisfy; an unset criterion matches everything."""

    min_level: Level | None = None
    text: str | None = None
    field_match: FieldMatch | None = None
    condition: NumericCondition | None = None

    def describe(self) -> str:
        parts = [
            f"level ≥ {self.min_level}" if self.min_level else "",
            f'text "{self.text}"' if self.text else "",
            str(self.field_match) if self.field_match else "",
            str(self.condition) if self.condition else "",
        ]
        return ", ".join(p for p in parts if p) or "every line"


# --- lines ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogLine:
    """One line of a pod's log, read: the kubelet's time, the JSON object if it is one."""

    pod: str
    at: dt.datetime | None
    text: str
    record: Mapping[str, Any] | None
    level: Level | None


def _kubelet_time(match: re.Match[str]) -> dt.datetime:
    fraction = (match["frac"] or "").ljust(6, "0")[:6]  # datetime keeps microseconds
    zone = "+00:00" if match["zone"] == "Z" else match["zone"]
    return dt.datetime.fromisoformat(f"{match['date']}.{fraction}{zone}")


def parse_log_line(pod: str, raw: str) -> LogLine:
    """A line as `kubectl logs --timestamps` prints it (the prefix is optional)."""
    stamped = _STAMPED.match(raw)
    at, text = (_kubelet_time(stamped), stamped["rest"]) if stamped else (None, raw)
    record: dict[str, Any] | None = None
    if text.lstrip().startswith("{"):
        try:
            loaded = json.loads(text)
        except ValueError:
            loaded = None
        record = loaded if isinstance(loaded, dict) else None
    if record is not None:
        level = next((normal_level(record[f]) for f in _LEVEL_FIELDS if f in record), None)
    else:
        leading = _LEADING_LEVEL.match(text)
        level = normal_level(leading["level"]) if leading else None
    return LogLine(pod, at, text, record, level)


def field_value(record: Mapping[str, Any], name: str) -> Any:
    """`record[name]`, or the nested value for a dotted name (`http.status`)."""
    if name in record:
        return record[name]
    value: Any = record
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def matches(line: LogLine, query: LogQuery) -> bool:
    """Does `line` satisfy every criterion of `query`? Fields only exist in JSON lines."""
    if query.min_level is not None and (
        line.level is None or LEVELS.index(line.level) < LEVELS.index(query.min_level)
    ):
        return False
    if query.text and query.text.lower() not in line.text.lower():
        return False
    if query.field_match is not None:
        if line.record is None:
            return False
        actual = field_value(line.record, query.field_match.name)
        if actual is None or _as_text(actual) != query.field_match.value:
            return False
    if query.condition is not None:
        if line.record is None:
            return False
        return query.condition.holds(field_value(line.record, query.condition.name))
    return True


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if isinstance(value, str) else json.dumps(value)


# --- the search's outcome ------------------------------------------------------------------


@dataclass(frozen=True)
class LogMatch:
    """One matching line, fit to publish: redacted and cut to `MAX_LINE_CHARS`."""

    time: str  # RFC 3339 (the kubelet's), "-" when unknown
    pod: str
    level: str  # "-" when the line has none
    line: str

    def as_row(self) -> dict[str, str]:
        return {"time": self.time, "pod": self.pod, "level": self.level, "line": self.line}


@dataclass(frozen=True)
class LogSearch:
    """What a log search found: counts over every match, the latest `max_matches` lines."""

    query: str
    pods: tuple[str, ...]
    lines_scanned: int
    matched: int
    counts_by_level: dict[str, int]
    matches: tuple[LogMatch, ...] = field(default=())

    @property
    def truncated(self) -> bool:
        return self.matched > len(self.matches)

    def excerpt(self, lines: int = 20) -> str:
        """The last `lines` matches as plain text, for an incident's evidence."""
        return "\n".join(f"{m.time} {m.pod} {m.line}" for m in self.matches[-lines:])


def published_line(line: LogLine) -> str:
    """A line as the report shows it: a JSON object as `key=value` pairs (its time and
    level have their own columns), credentials and row data redacted, cut to length."""
    if line.record is not None:
        skip = {*_TIME_FIELDS, *_LEVEL_FIELDS}
        text = " ".join(f"{k}={_as_text(v)}" for k, v in line.record.items() if k not in skip)
    else:
        text = line.text
    text = redact_row_data(text)
    return text if len(text) <= MAX_LINE_CHARS else text[: MAX_LINE_CHARS - 1] + "…"


def search(
    logs: Mapping[str, str] | Iterable[tuple[str, str]], query: LogQuery, max_matches: int
) -> LogSearch:
    """Filter the pods' logs (`{pod: text}`) with `query`: every match counted by level,
    the latest `max_matches` kept in time order (lines of all pods merged)."""
    items = list(logs.items()) if isinstance(logs, Mapping) else list(logs)
    lines = [parse_log_line(pod, raw) for pod, text in items for raw in text.splitlines()]
    found = [line for line in lines if matches(line, query)]
    epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
    found.sort(key=lambda line: (line.at or epoch, line.pod))
    counts: Counter[str] = Counter(line.level or "none" for line in found)
    kept = found[len(found) - max_matches :] if max_matches else []
    return LogSearch(
        query=query.describe(),
        pods=tuple(pod for pod, _ in items),
        lines_scanned=len(lines),
        matched=len(found),
        counts_by_level={level: counts[level] for level in (*LEVELS, "none") if counts[level]},
        matches=tuple(
            LogMatch(
                time=line.at.isoformat().replace("+00:00", "Z") if line.at else "-",
                pod=line.pod,
                level=line.level or "-",
                line=published_line(line),
            )
            for line in kept
        ),
    )
