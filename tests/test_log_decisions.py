"""Log search decisions, on literal log lines."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from runbook.decisions.logs import (
    FIELD_MATCH_PATTERN,
    NUMERIC_CONDITION_PATTERN,
    FieldMatch,
    LogQuery,
    NumericCondition,
    matches,
    parse_field_match,
    parse_log_line,
    parse_numeric_condition,
    search,
)
from runbook.decisions.refusal import Refused

SLOW = (
    '2026-03-01T10:00:02.123456789Z {"ts": "2026-03-01T10:00:02.123Z", "level": "info", '
    '"method": "GET", "path": "/api/v1/scans", "status": 200, "duration_ms": 1500.5, '
    '"user_id": "user123", "msg": "request done"}'
)
ERROR = (
    '2026-03-01T10:00:01.5Z {"ts": "2026-03-01T10:00:01.500Z", "level": "ERROR", '
    '"method": "GET", "path": "/health/db", "status": 503, "duration_ms": 3.2, '
    '"msg": "request failed: postgresql://app:hunter2@db:5432/app refused"}'
)
FAST = (
    '2026-03-01T10:00:00Z {"ts": "2026-03-01T10:00:00.000Z", "level": "info", "method": '
    '"GET", "path": "/health", "status": 200, "duration_ms": 1, "user_id": "user9", "msg": "ok"}'
)
TRACE = "2026-03-01T10:00:03Z Traceback (most recent call last): user_id=user123"
ALEMBIC = "2026-03-01T10:00:04Z WARNING  [alembic.runtime.migration] slow lock"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("user_id=user123", FieldMatch("user_id", "user123")),
        ('user_id:"user123"', FieldMatch("user_id", "user123")),
        (" http.status = 503 ", FieldMatch("http.status", "503")),
        ("msg=request failed: x", FieldMatch("msg", "request failed: x")),
    ],
)
def test_field_match_syntax(text, expected):
    assert parse_field_match(text) == expected
    assert re.match(FIELD_MATCH_PATTERN, text)  # the form's own check agrees


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("duration_ms>1000", NumericCondition("duration_ms", ">", 1000)),
        ("duration_ms:>1000", NumericCondition("duration_ms", ">", 1000)),
        ("status >= 500", NumericCondition("status", ">=", 500)),
        ("duration_ms<=2.5", NumericCondition("duration_ms", "<=", 2.5)),
        ("retries!=0", NumericCondition("retries", "!=", 0)),
        ("delta=-3", NumericCondition("delta", "=", -3)),
    ],
)
def test_numeric_condition_syntax(text, expected):
    assert parse_numeric_condition(text) == expected
    assert re.match(NUMERIC_CONDITION_PATTERN, text)


@pytest.mark.parametrize(
    "text", ["duration_ms>", "duration_ms>fast", ">1000", "duration_ms 1000", "duration_ms=>1"]
)
def test_bad_numeric_condition_is_refused_naming_the_parameter(text):
    with pytest.raises(Refused, match=r"^numeric_condition: expected FIELD OPERATOR NUMBER"):
        parse_numeric_condition(text)
    assert not re.match(NUMERIC_CONDITION_PATTERN, text)


@pytest.mark.parametrize("text", ["user123", "=user123", "user_id=", "user id=x"])
def test_bad_field_match_is_refused_naming_the_parameter(text):
    with pytest.raises(Refused, match=r"^field_match: expected FIELD=VALUE"):
        parse_field_match(text)
    assert not re.match(FIELD_MATCH_PATTERN, text)


def test_a_stamped_json_line_is_read_with_its_time_fields_and_level():
    line = parse_log_line("backend-a", SLOW)
    assert line.at == dt.datetime(2026, 3, 1, 10, 0, 2, 123456, tzinfo=dt.UTC)
    assert line.record is not None and line.record["duration_ms"] == 1500.5
    assert line.level == "info"
    assert parse_log_line("p", ERROR).level == "error"  # "ERROR" normalised


def test_a_plain_line_has_no_fields_and_a_level_only_when_it_starts_with_one():
    trace = parse_log_line("p", TRACE)
    assert (trace.record, trace.level) == (None, None)
    assert parse_log_line("p", ALEMBIC).level == "warning"
    unstamped = parse_log_line("p", "{not json")
    assert (unstamped.at, unstamped.record, unstamped.text) == (None, None, "{not json")


def test_min_level_keeps_that_level_and_above_and_drops_lines_without_one():
    query = LogQuery(min_level="warning")
    assert [matches(parse_log_line("p", x), query) for x in (SLOW, ERROR, TRACE, ALEMBIC)] == [
        False,
        True,
        False,
        True,
    ]


def test_field_match_and_numeric_condition_look_only_at_json_fields():
    user = LogQuery(field_match=FieldMatch("user_id", "user123"))
    slow = LogQuery(condition=NumericCondition("duration_ms", ">", 1000))
    lines = [parse_log_line("p", x) for x in (SLOW, ERROR, FAST, TRACE)]
    assert [matches(x, user) for x in lines] == [True, False, False, False]  # not the trace
    assert [matches(x, slow) for x in lines] == [True, False, False, False]
    status = LogQuery(field_match=FieldMatch("status", "503"))
    assert [matches(x, status) for x in lines] == [False, True, False, False]


def test_text_matches_any_line_case_insensitively():
    query = LogQuery(text="USER123")
    lines = [parse_log_line("p", x) for x in (SLOW, ERROR, TRACE)]
    assert [matches(x, query) for x in lines] == [True, False, True]


def test_a_non_numeric_field_never_satisfies_a_numeric_condition():
    condition = NumericCondition("duration_ms", ">", 1)
    assert [condition.holds(v) for v in ("12", "fast", None, True, [5], 2)] == [
        True,
        False,
        False,
        False,
        False,
        True,
    ]


def test_search_merges_pods_in_time_order_counts_every_match_and_keeps_the_latest():
    logs = {"backend-a": f"{SLOW}\n{TRACE}\n", "backend-b": f"{FAST}\n{ERROR}\n"}

    found = search(logs, LogQuery(), max_matches=2)

    assert (found.lines_scanned, found.matched, found.truncated) == (4, 4, True)
    assert found.counts_by_level == {"info": 2, "error": 1, "none": 1}
    assert [(m.pod, m.time) for m in found.matches] == [
        ("backend-a", "2026-03-01T10:00:02.123456Z"),
        ("backend-a", "2026-03-01T10:00:03Z"),
    ]
    assert found.pods == ("backend-a", "backend-b")


def test_published_lines_are_redacted_and_drop_the_columns_they_have():
    found = search({"backend-b": ERROR}, LogQuery(min_level="error"), max_matches=10)

    (match,) = found.matches
    assert "hunter2" not in match.line and "[redacted]" in match.line
    assert match.line.startswith("method=GET path=/health/db status=503 duration_ms=3.2 msg=")
    assert (match.level, match.pod) == ("error", "backend-b")
    assert "hunter2" not in found.excerpt()


def test_a_huge_line_is_cut():
    found = search({"p": "x" * 5000}, LogQuery(), max_matches=1)
    assert len(found.matches[0].line) == 400
