"""The run's logger inside a flow or task run; a plain logger when a task's `.fn` is
called directly (tests, scripts), so tasks never fail for want of a run context."""

from __future__ import annotations

import logging
from typing import Any

from prefect.exceptions import MissingContextError
from prefect.logging import get_logger, get_run_logger


def run_logger() -> logging.Logger | logging.LoggerAdapter[Any]:
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("runbook")
