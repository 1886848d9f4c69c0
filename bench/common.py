"""What every benchmark needs: a real Prefect server, the sandbox, and a way to print."""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterator
from contextlib import contextmanager

from sandbox.platform import Sandbox


@contextmanager
def platform_and_prefect() -> Iterator[Sandbox]:
    """A sandbox platform and a Prefect server, with RUNBOOK_* pointed at the sandbox."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with Sandbox() as platform:
        saved = dict(os.environ)
        os.environ.update(platform.env)
        try:
            with prefect_test_harness(server_startup_timeout=180):
                yield platform
        finally:
            os.environ.clear()
            os.environ.update(saved)


def report(title: str, samples: list[float], baseline: list[float], unit: str, target: str) -> None:
    ours, base = statistics.median(samples), statistics.median(baseline)
    print(f"\n== {title}")
    print(f"   ours:     median {ours:.3f} {unit}  (n={len(samples)}, {_spread(samples, unit)})")
    print(f"   baseline: median {base:.3f} {unit}  (n={len(baseline)}, {_spread(baseline, unit)})")
    print(f"   ratio ours/baseline: {ours / base:.3f}   target: {target}", flush=True)


def _spread(values: list[float], unit: str) -> str:
    return f"min {min(values):.3f} max {max(values):.3f} {unit}"
