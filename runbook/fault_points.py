"""The fault matrix's hook: `fault_point(step)` at a runbook's step boundaries.

With `RUNBOOK_TEST_KILL_AT=<step>` in the sandbox, the process SIGKILLs itself there, as
an OOM kill or a lost node would: nothing after it runs, no `finally`, no undo. That is
how the tests make a run die deterministically at a chosen boundary, then check that
`reconcile` puts the platform back. Without the variable, or outside the sandbox, it
does nothing.

With `RUNBOOK_TEST_TERM_AT=<step>` it sends itself SIGTERM there instead: what a runner
does to a run cancelled from the UI or the API, and what Kubernetes does to an evicted
pod. The flow's own undo must run then (no reconcile needed).
"""

from __future__ import annotations

import logging
import os
import signal

KILL_AT_VARIABLE = "RUNBOOK_TEST_KILL_AT"
TERM_AT_VARIABLE = "RUNBOOK_TEST_TERM_AT"


def fault_point(step: str) -> None:
    """SIGKILL (or SIGTERM) this process at `step` if the fault matrix asked for it
    (sandbox only)."""
    if step not in (os.environ.get(KILL_AT_VARIABLE), os.environ.get(TERM_AT_VARIABLE)):
        return
    if os.environ.get("RUNBOOK_ENVIRONMENT", "sandbox") != "sandbox":
        return  # never outside the sandbox, whatever else the environment says
    kill = os.environ.get(KILL_AT_VARIABLE) == step
    how = "SIGKILL" if kill else "SIGTERM"
    logging.getLogger("runbook").warning("fault point %r: %s", step, how)
    # Once per process: the undo a SIGTERM starts may pass the same boundary again
    # (secret rotation's undo restarts the pods through the same step).
    os.environ.pop(KILL_AT_VARIABLE if kill else TERM_AT_VARIABLE, None)
    os.kill(os.getpid(), signal.SIGKILL if kill else signal.SIGTERM)
