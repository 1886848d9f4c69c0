"""Secret rotation's figure: what the four-step protocol and the checks cost on top of the
restarts the rotation needs anyway. Target: median ratio ≤ 1.2.

ours:     the `secret-rotation` flow for the API key, end to end (createSecret, finishSecret,
          restart backend and celery-workers, health check, new key accepted / old refused).
baseline: the two restart rollouts alone (`restart_deployments` of backend and
          celery-workers, in a flow), measured in the same run, alternating with ours.

Rollouts in the emulator take `ROLLOUT_SECONDS` (real ones take 30 s to minutes; the
fixed overhead in seconds is printed too, since the ratio depends on that choice).
`python -m bench rotation`.
"""

from __future__ import annotations

import statistics
import time

from prefect import flow

from bench.common import platform_and_prefect, report
from flows.restart import restart_deployments

ROLLOUT_SECONDS = 10.0
WORKLOADS = ["backend", "celery-workers"]


@flow(name="bench-restarts-only")
def restarts_only() -> None:
    """Baseline: the two `kubectl rollout restart`s and their rollouts, nothing else."""
    restart_deployments(WORKLOADS)


def main(samples: int = 3) -> None:
    from flows.secret_rotation import secret_rotation

    ours: list[float] = []
    baseline: list[float] = []
    with platform_and_prefect() as platform:
        platform.kube.rollout_delay = ROLLOUT_SECONDS
        restarts_only()  # warm-up: imports, clients, the locks' limits
        for _ in range(samples):
            started = time.perf_counter()
            state = secret_rotation(secret="api-key", return_state=True)
            ours.append(time.perf_counter() - started)
            assert state.is_completed(), state.message
            started = time.perf_counter()
            restarts_only()
            baseline.append(time.perf_counter() - started)
    report(
        f"API key rotation end to end vs the two restart rollouts alone "
        f"(rollouts take {ROLLOUT_SECONDS:g} s)",
        ours,
        baseline,
        "s",
        "median ratio ≤ 1.2",
    )
    overhead = statistics.median(ours) - statistics.median(baseline)
    print(f"   fixed overhead of the rotation: {overhead:.2f} s", flush=True)


if __name__ == "__main__":
    main()
