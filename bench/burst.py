"""A burst of API-launched runs, on each of the Prefect server's databases.

For SQLite (the embedded default) and PostgreSQL (the production setup; here a database
of its own on the sandbox's real PostgreSQL): a `prefect server start` process, the
runbooks served by `deployments.local --serve-only` as `make up` serves them, then
`BURST` (100) `POST /api/deployments/{id}/create_flow_run` of health-check sent at once
from 10 client threads, after `SINGLES` (10) launched one at a time on the idle server.
Measured from outside, over the REST API:
- one at a time: POST sent → Running, median (what a person pressing Run waits);
- runs lost: a POST that failed (a 503 — SQLite's "database is locked" — is retried 5
  times with backoff, as Prefect's own client does; the retries are counted), or a run
  not Completed within the deadline (target 0);
- time until all complete: first POST sent → the last run's end_time;
- launch latency: each POST sent → that run's start_time (when the server moved it to
  Running; the same host clock), p50 and p95. The served process runs at most
  SERVE_LIMIT runs at once, so in a burst most of this is waiting in line.
Run: `.venv/bin/python -m bench burst` (about 3-5 minutes on 2 cores).
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from deployments.local import (
    FAST_RUNNER,
    PROJECT_ROOT,
    SERVE_LIMIT,
    _start_server,
    _stop,
    _wait_for_http,
)
from sandbox.platform import Sandbox

BURST = int(os.environ.get("BENCH_BURST", "100"))
CLIENTS = 10
SINGLES = 10  # runs launched one at a time on the idle server, before the burst
# A 503 is the server's "retry": Prefect's own client (CLI, run_deployment, automations)
# retries it 5 times with backoff; the bench's clients do the same, and count them.
RETRIES = 5
DEADLINE_SECONDS = 600
DEPLOYMENT = "health-check/health-check"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _deployment_id(api: str) -> str:
    with httpx.Client(base_url=api, timeout=60) as client:
        give_up = time.monotonic() + 180
        while (answer := client.get(f"/deployments/name/{DEPLOYMENT}")).status_code != 200:
            assert time.monotonic() < give_up, "health-check never registered"
            time.sleep(0.5)
        return str(answer.json()["id"])


class _Launcher:
    """`POST create_flow_run` as Prefect's own client sends it: a 503 is retried with
    backoff (counted); any other failure is counted by kind and loses the run."""

    def __init__(self, api: str, deployment_id: str) -> None:
        self.url = f"{api}/deployments/{deployment_id}/create_flow_run"
        self.answered_503 = 0
        self.failures: Counter[str] = Counter()
        self._counting = threading.Lock()  # the burst launches from several threads

    def launch(self, _: int = 0) -> tuple[str | None, float]:
        """(the run's id or None when lost, when the first POST was sent)."""
        with httpx.Client(timeout=60) as client:
            sent = time.time()
            for attempt in range(RETRIES + 1):
                try:
                    reply = client.post(self.url, json={"parameters": {}})
                except httpx.HTTPError as error:
                    self._count_failure(type(error).__name__)
                    return None, sent
                if reply.status_code == 503 and attempt < RETRIES:
                    with self._counting:
                        self.answered_503 += 1
                    time.sleep(2**attempt * (0.5 + random.random()))
                    continue
                if reply.status_code != 201:
                    self._count_failure(f"HTTP {reply.status_code}")
                    return None, sent
                return str(reply.json()["id"]), sent
        return None, sent

    def _count_failure(self, kind: str) -> None:
        with self._counting:
            self.failures[kind] += 1


def _singles(api: str, deployment_id: str) -> dict[str, Any]:
    """POST → Running of one run at a time on the idle server (what a person pressing
    Run sees), each waited for until it ends before the next."""
    launcher = _Launcher(api, deployment_id)
    latencies = []
    with httpx.Client(base_url=api, timeout=60) as client:
        for _ in range(SINGLES):
            run_id, sent = launcher.launch()
            if run_id is None:
                continue
            give_up = time.monotonic() + 120
            while time.monotonic() < give_up:
                run = client.get(f"/flow_runs/{run_id}").json()
                if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    break
                time.sleep(0.2)
            if run.get("start_time"):
                latencies.append(_seconds(run["start_time"]) - sent)
    return {
        "latencies": latencies,
        "answered_503": launcher.answered_503,
        "failures": dict(launcher.failures),
    }


def _burst(api: str, deployment_id: str) -> dict[str, Any]:
    launcher = _Launcher(api, deployment_id)
    launch = launcher.launch

    started = time.time()
    with ThreadPoolExecutor(CLIENTS) as pool:
        launched = list(pool.map(launch, range(BURST)))
    sent_at = {run_id: sent for run_id, sent in launched if run_id}
    failed_posts = BURST - len(sent_at)

    runs: dict[str, dict] = {}
    give_up = time.monotonic() + DEADLINE_SECONDS
    with httpx.Client(base_url=api, timeout=60) as client:
        while time.monotonic() < give_up:
            ids = list(sent_at)
            runs = {}
            for i in range(0, len(ids), 200):
                page = client.post(
                    "/flow_runs/filter",
                    json={"flow_runs": {"id": {"any_": ids[i : i + 200]}}, "limit": 200},
                ).json()
                runs.update({r["id"]: r for r in page})
            if all(
                r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
                for r in runs.values()
            ) and len(runs) == len(sent_at):
                break
            time.sleep(1)
    completed = [r for r in runs.values() if r["state_type"] == "COMPLETED"]
    latencies = [
        _seconds(r["start_time"]) - sent_at[r["id"]] for r in runs.values() if r.get("start_time")
    ]
    ends = [_seconds(r["end_time"]) for r in completed if r.get("end_time")]
    return {
        "launched": len(sent_at),
        "lost": failed_posts + (len(sent_at) - len(completed)),
        "all_complete_s": (max(ends) - started) if ends else float("nan"),
        "p50_s": statistics.median(latencies) if latencies else float("nan"),
        "p95_s": _percentile(latencies, 0.95) if latencies else float("nan"),
        "post_failures": dict(launcher.failures),
        "answered_503": launcher.answered_503,
    }


def run_on(database: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-burst-") as home, Sandbox() as platform:
        port = _free_port()
        api = f"http://127.0.0.1:{port}/api"
        env = {
            **os.environ,
            "PREFECT_HOME": home,
            "PREFECT_API_URL": api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            **FAST_RUNNER,
        }
        if database == "postgres":
            from sandbox.prefect_database import create_prefect_database

            env["PREFECT_API_DATABASE_CONNECTION_URL"] = create_prefect_database(platform.postgres)
        else:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = (
                f"sqlite+aiosqlite:///{Path(home) / 'prefect.db'}"
            )
        # The server's own log ("database is locked" under SQLite) is not the bench's output.
        server = _start_server("127.0.0.1", port, env, quiet=True)
        served = None
        try:
            _wait_for_http(f"{api}/health", 240, server)
            served = subprocess.Popen(
                [sys.executable, "-m", "deployments.local", "--serve-only"],
                env={**env, **platform.env},
                cwd=PROJECT_ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deployment_id = _deployment_id(api)
            singles = _singles(api, deployment_id)
            return {**_burst(api, deployment_id), "singles": singles}
        finally:
            if served is not None:
                _stop(served)
            _stop(server)


def main() -> None:
    print(f"\n== API-launched health-check runs: {SINGLES} one at a time, then a burst of {BURST}")
    print("   database    one-at-a-time POST→Running p50 | burst: lost  all complete  p50    p95")
    results = {}
    for database in ("sqlite", "postgres"):
        r = results[database] = run_on(database)
        singles = r["singles"]
        single = statistics.median(singles["latencies"]) if singles["latencies"] else float("nan")
        print(
            f"   {database:<10} {single:>25.2f} s       | {int(r['lost']):>10}  "
            f"{r['all_complete_s']:>9.1f} s  {r['p50_s']:>5.1f} s  {r['p95_s']:>5.1f} s"
            f"   (launched {int(r['launched'])}; 503s retried: {r['answered_503']};"
            f" failed POSTs: {r['post_failures'] or 'none'})",
            flush=True,
        )
        print(
            f"   {'':<10} one at a time: n={len(singles['latencies'])}, "
            f"max {max(singles['latencies'], default=float('nan')):.2f} s, 503s retried: "
            f"{singles['answered_503']}, failed POSTs: {singles['failures'] or 'none'}",
            flush=True,
        )
    sqlite, postgres = results["sqlite"], results["postgres"]
    print(
        "   postgres/sqlite: all complete "
        f"{postgres['all_complete_s'] / sqlite['all_complete_s']:.2f}, "
        f"burst p50 {postgres['p50_s'] / sqlite['p50_s']:.2f}"
    )
    print(
        "   targets: lost 0; POST→Running median ≤ 3 s one at a time on an idle server"
        f" (limit={SERVE_LIMIT} runs at once: in a burst, runs queue behind it)"
    )


if __name__ == "__main__":
    main()
