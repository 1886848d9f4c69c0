"""The release runbooks' figure: how fast a failed rollout is rolled back.

From the moment the emulator's controller marks the Deployment `ProgressDeadlineExceeded`
(its `history` timestamp) to the rollback's first write (its `writes` timestamp, the JSON
patch that restores the recorded pod template). Target: median ≤ 2 s.

ours:     the deploy flow, which watches the Deployment (`wait_for_rollout`).
baseline: the same tasks, detecting the failure by polling every 2 s with sleeps (what a
          `while ! kubectl rollout status …; do sleep 2; done` loop does).
The rollout fails after a random delay (the same sequence for both), so the failure lands
at a random point of the poll cycle, as it would in life.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

from prefect import flow

from bench.common import platform_and_prefect, report
from runbook.decisions.deployment import deployment_view
from runbook.decisions.rollout import RolloutPhase, rollout_outcome
from tasks.kubernetes import (
    list_deployment_revisions,
    read_deployment,
    restore_pod_template,
    set_deployment_image,
)

POLL_SECONDS = 2.0
TARGET = "frontend"


@flow(name="bench-polling-deploy")
def polling_deploy(image: str) -> None:
    """Baseline: set the image, poll every 2 s, restore the recorded template on failure."""
    recorded = list_deployment_revisions(TARGET)[-1]
    generation = deployment_view(set_deployment_image(TARGET, TARGET, image)).generation
    while True:
        time.sleep(POLL_SECONDS)
        verdict = rollout_outcome(read_deployment(TARGET), generation)
        if verdict.phase is RolloutPhase.FAILED:
            restore_pod_template(TARGET, recorded["template"], "bench: polling rollback")
            return
        if verdict.phase is RolloutPhase.COMPLETE:
            raise AssertionError("the bench rollout was meant to fail")


def _gap(platform: Any, since: float) -> float:
    """Seconds from the ProgressDeadlineExceeded after `since` to the first restore."""
    failed = next(
        e.at
        for e in platform.kube.history
        if e.at >= since and e.name == TARGET and e.what == "ProgressDeadlineExceeded"
    )
    restored = next(
        w.at
        for w in platform.kube.writes
        if w.at >= failed and w.name == TARGET and isinstance(w.body, list)
    )
    return restored - failed


def _measure(platform: Any, run: Any, delays: list[float]) -> list[float]:
    gaps = []
    for n, delay in enumerate(delays):
        platform.kube.rollout_delay = delay
        platform.kube.clear_writes()
        since = time.time()
        run(f"bench-bad-{n}")
        gaps.append(_gap(platform, since))
    return gaps


def main(samples: int = 7) -> None:
    from flows.deploy import deploy

    threading.excepthook = lambda args: None
    delays = [round(random.Random(n).uniform(0.2, 2.2), 2) for n in range(samples)]
    with platform_and_prefect() as platform:
        platform.kube.fail_rollouts_for_image(":bench-bad")

        def ours(version: str) -> None:
            state = deploy(version=version, components=[TARGET], return_state=True)
            assert state.is_failed() and "rolled back" in (state.message or ""), state.message

        def baseline(version: str) -> None:
            polling_deploy(f"complianceagent/frontend:{version}")

        watched = _measure(platform, ours, delays)
        polled = _measure(platform, baseline, delays)
    report(
        "ProgressDeadlineExceeded → first rollback write",
        watched,
        polled,
        "s",
        "median ≤ 2 s",
    )


if __name__ == "__main__":
    main()
