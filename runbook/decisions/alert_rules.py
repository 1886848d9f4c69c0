"""The alert's own query, for RESOLVE: an alert is over when the expression its rule
fires on yields nothing (Prometheus returns no series once the comparison is false)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def alert_expression(rule_documents: Iterable[Mapping[str, Any]], alertname: str) -> str | None:
    """The `expr` of the alerting rule named `alertname` in Prometheus rule files (as
    parsed YAML: `groups[].rules[]`), whitespace-normalised; None when no rule has it.
    Recording rules (`record:`) are not alerts and never match."""
    for document in rule_documents:
        for group in document.get("groups") or []:
            for rule in group.get("rules") or []:
                if rule.get("alert") == alertname and rule.get("expr"):
                    return " ".join(str(rule["expr"]).split())
    return None


def alert_query_clear(value: float | None) -> bool:
    """Verified: the expression yields no series (None) or 0 (a rule written as a count)."""
    return value is None or value == 0
