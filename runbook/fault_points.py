"""The fault matrix's hook: `fault_point(step)` at a runbook's step boundaries.

With `RUNBOOK_TEST_KILL_AT=<step>` in the sandbox, the process SIGKILLs itself there, as
an OOM kill or a lost node would: nothing after it runs, no `finally`, no undo. That is
how the tests make a run die deterministically at a chosen boundary, then check that
`reconcile` puts the platform back. Without the variable, or outside the sandbox, it
does nothing.
"""

from __future__ import annotations

import logging
import os
import signal

KILL_AT_VARIABLE = "RUNBOOK_TEST_KILL_AT"


def fault_point(step: str) -> None:
    """SIGKILL this process at `step` if the fault matrix asked for it (sandbox only)."""
    if os.environ.get(KILL_AT_VARIABLE) != step:
        return
    if os.environ.get("RUNBOOK_ENVIRONMENT", "sandbox") != "sandbox":
        return  # never outside the sandbox, whatever else the environment says
    logging.getLogger("runbook").warning("fault point %r: SIGKILL", step)
    os.kill(os.getpid(), signal.SIGKILL)
