"""Small helpers for the markdown a runbook publishes about its run: tables and step
timings. No Prefect, no clients."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ") if value not in (None, "") else "-"


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as a markdown table (columns: the first row's keys unless given)."""
    if not rows:
        return "_none_"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class StepTimer:
    """How long each named step of a run took, and how it ended:
    `with timer.step("set image"): ...` records the step even when it raises."""

    steps: list[dict[str, Any]] = field(default_factory=list)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        outcome = "ok"
        try:
            yield
        except BaseException as exc:
            outcome = f"failed: {type(exc).__name__}"
            raise
        finally:
            seconds = time.perf_counter() - started
            self.steps.append({"step": name, "seconds": f"{seconds:.2f}", "outcome": outcome})

    def markdown(self) -> str:
        return markdown_table(self.steps, ("step", "seconds", "outcome"))
