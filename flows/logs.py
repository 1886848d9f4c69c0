"""Runbook > Log Management: view and search logs.

    kubectl logs -l app=backend --tail=100 --timestamps
    level:error AND @timestamp:[now-1h TO now]     # Kibana: errors in the last hour
    user_id:"user123" AND action:*                  # a user's activity
    duration_ms:>1000                               # slow requests

`logs` reads the pods' logs through the Kubernetes API (there is no Elasticsearch here):
the pods of a component's Deployment (by its own selector, as `kubectl logs
deployment/NAME` finds them) or of a label selector, each log cut by the API to the time
window (`sinceSeconds`) and the last `tail_lines`, with timestamps. It then keeps the
lines that pass every filter given (`runbook.decisions.logs`: JSON lines field by field,
other lines by text), publishes the latest matches as a table, and returns a typed
summary (`LogSearch`: counts per level, the matches) that incident-response attaches.

A filter with bad syntax is refused before any call, naming the parameter. Read-only:
it changes nothing and takes no lock. Published lines are redacted (credentials, row data).
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger
from pydantic import AfterValidator, Field

from runbook.decisions.logs import (
    FIELD_MATCH_PATTERN,
    NUMERIC_CONDITION_PATTERN,
    Level,
    LogQuery,
    LogSearch,
    parse_field_match,
    parse_numeric_condition,
    search,
)
from runbook.decisions.release import Component
from runbook.report import markdown_table
from runbook.settings import K8S_NAME, load_settings
from tasks.kubernetes import read_deployment
from tasks.pod_logs import list_pods, read_pod_log

MAX_SINCE_MINUTES = 7 * 24 * 60  # a week: about what a node keeps of a container's log
MAX_TAIL_LINES = 50_000
MAX_MATCHES = 1_000
ARTIFACT_ROWS = 200  # a table longer than this is read by nobody; the summary counts all
# Pods whose containers have not started have no log to read yet.
READABLE_PHASES = frozenset({"Running", "Succeeded", "Failed"})


def _checked(parse: object) -> AfterValidator:
    """Run the decision's parser when the parameters are validated: bad syntax never
    reaches the flow body (the form's JSON schema pattern refuses it on the server too)."""

    def check(value: str | None) -> str | None:
        if value is not None:
            parse(value)  # type: ignore[operator]
        return value

    return AfterValidator(check)


FieldMatchText = Annotated[
    str | None,
    Field(max_length=300, json_schema_extra={"pattern": FIELD_MATCH_PATTERN}),
    _checked(parse_field_match),
]
NumericConditionText = Annotated[
    str | None,
    Field(max_length=100, json_schema_extra={"pattern": NUMERIC_CONDITION_PATTERN}),
    _checked(parse_numeric_condition),
]


@flow(name="logs", flow_run_name="logs-{component}-last-{since_minutes}m")
def logs(
    component: Component = "backend",
    label_selector: Annotated[
        str | None, Field(min_length=1, max_length=256, examples=["app=backend"])
    ] = None,
    container: Annotated[str | None, Field(pattern=K8S_NAME)] = None,
    since_minutes: Annotated[int, Field(ge=1, le=MAX_SINCE_MINUTES)] = 60,
    min_level: Level | None = None,
    text: Annotated[str | None, Field(min_length=1, max_length=200)] = None,
    field_match: FieldMatchText = None,
    numeric_condition: NumericConditionText = None,
    tail_lines: Annotated[int, Field(ge=1, le=MAX_TAIL_LINES)] = 1000,
    max_matches: Annotated[int, Field(ge=1, le=MAX_MATCHES)] = 100,
) -> LogSearch:
    """Search the pods' logs of a component: time window, level, text, field, number.

    The runbook page's Kibana searches, as parameters:
    errors in the last hour: min_level=error, since_minutes=60;
    a user's activity: field_match=user_id=user123;
    slow requests: numeric_condition=duration_ms>1000.

    Args:
        component: Whose pods to read (the Deployment's own selector): backend, frontend or
            celery-workers. Ignored when label_selector is given.
        label_selector: Read the pods matching this label selector instead, e.g. app=backend.
        container: Container to read in pods with more than one.
        since_minutes: Only lines written in the last this many minutes (1 to 10080).
        min_level: Only lines of this level or above (debug, info, warning, error, critical);
            lines that carry no level are then left out.
        text: Only lines containing this text (case-insensitive), JSON or not.
        field_match: Only JSON lines whose field has this value: FIELD=VALUE, e.g.
            user_id=user123 (dotted names reach into nested objects).
        numeric_condition: Only JSON lines whose field compares so: FIELD OP NUMBER with
            OP one of > >= < <= = !=, e.g. duration_ms>1000.
        tail_lines: Read at most the last this many lines of each pod (1 to 50000).
        max_matches: Keep at most this many matches, the latest (1 to 1000); all are counted.
    """
    logger = get_run_logger()

    # 1. Parse the filters: bad syntax is refused here, before any call.
    query = LogQuery(
        min_level=min_level,
        text=text,
        field_match=parse_field_match(field_match) if field_match else None,
        condition=parse_numeric_condition(numeric_condition) if numeric_condition else None,
    )

    # 2. Find the pods: the label selector given, else the Deployment's own selector.
    selector = label_selector or _deployment_selector(component)
    pods = [p for p in list_pods(selector) if p.get("status", {}).get("phase") in READABLE_PHASES]
    names = [p["metadata"]["name"] for p in pods]

    # 3. Read each pod's log, cut by the API to the window and the tail, with timestamps.
    texts = read_pod_log.map(
        names,
        tail_lines=unmapped(tail_lines),
        since_seconds=unmapped(since_minutes * 60),
        container=unmapped(container),
    ).result()

    # 4. Keep the lines that pass every filter.
    found = search(list(zip(names, texts, strict=True)), query, max_matches)

    # 5. Publish the matches and the counts.
    summary = _publish(found, selector, since_minutes)
    logger.info(summary)
    return found


def _deployment_selector(component: str) -> str:
    """`kubectl logs deployment/NAME` semantics: the Deployment's `matchLabels`."""
    name = load_settings().deployment_name(component)
    labels = read_deployment(name)["spec"]["selector"].get("matchLabels") or {}
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def _publish(found: LogSearch, selector: str, since_minutes: int) -> str:
    counts = ", ".join(f"{n} {level}" for level, n in found.counts_by_level.items()) or "none"
    summary = (
        f"{found.matched} of {found.lines_scanned} line(s) from {len(found.pods)} pod(s) "
        f"({selector}, last {since_minutes} min) match {found.query}; by level: {counts}"
    )
    rows = [m.as_row() for m in found.matches[-ARTIFACT_ROWS:]]
    if rows:
        create_table_artifact(rows, key="log-matches", description=summary)
    shown = (
        f"The latest {len(rows)} are in the table `log-matches`."
        if found.matched > len(rows)
        else "All are in the table `log-matches`."
        if rows
        else "No line matched."
    )
    create_markdown_artifact(
        markdown="\n\n".join(
            [
                "## Log search",
                summary,
                markdown_table(
                    [{"level": k, "matches": v} for k, v in found.counts_by_level.items()]
                ),
                f"Pods: {', '.join(found.pods) or 'none matched the selector'}. {shown}",
            ]
        ),
        key="logs-report",
        description=summary,
    )
    return summary
