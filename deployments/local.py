"""`make up`: the whole thing on one machine, one command.

1. a Prefect server with its UI on http://127.0.0.1:4200: on SQLite (state in .local/),
   or with `--prefect-db postgres` (`make up PREFECT_DB=postgres`) on a database of its
   own on the sandbox's real PostgreSQL (state lasts as long as the sandbox); lock
   leases in its memory, Prefect's default: a restart of this server forgets them (see
   README > Production for the Redis lease storage),
2. the sandbox platform (PostgreSQL, Redis, moto, the Kubernetes emulator, the backend
   stand-in, a notification receiver), and
3. every deployment in prefect.yaml, served by one process with its schedules live
   (and its alert triggers), pointed at the sandbox, and
4. the alert bridge (`python -m bridge`, http://127.0.0.1:9094/alertmanager): Alertmanager's
   webhook in, Prefect events out.

Ctrl-C stops them all. `--serve-only` runs step 3 alone against whatever PREFECT_API_URL
and RUNBOOK_* say (that is how the tests and the benchmarks start it, and how you would
serve the runbooks against a real cluster without a worker).

This module does not import Prefect at the top: the supervisor must set Prefect's
environment before Prefect reads it, in the child processes.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = PROJECT_ROOT / ".local"

# Launch latency: the runner checks for new runs every second (Prefect's default is 10 s).
FAST_RUNNER = {"PREFECT_RUNNER_POLL_FREQUENCY": "1"}
# Every served run sends a `prefect.flow-run.heartbeat` event this often (Prefect's minimum):
# a run that stops sending them lost its process or node, and reconcile's Proactive
# trigger (prefect.yaml) starts reconcile, which marks it Crashed and puts its targets back.
HEARTBEATS = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
# The served runbooks poll faster still: PREFECT_RUNNER_POLL_FREQUENCY takes whole seconds,
# the runner's `query_seconds` a fraction (an alert's incident waited 0.5 s on average).
SERVE_QUERY_SECONDS = 0.25
# At most this many runbook runs at once per served process; more wait their turn.
SERVE_LIMIT = 10
# Where Alertmanager delivers its webhook (bridge/app.py); the bridge's own default.
ALERT_BRIDGE_PORT = 9094


def serve_catalog(schedules: bool = True, without_triggers_of: Sequence[str] = ()) -> None:
    """Serve every prefect.yaml deployment from this process (blocks until stopped).

    A test session serves its schedules inactive (a nightly backup must not start in the
    middle of a test) and without the triggers of `without_triggers_of` (its own tests post
    alerts and must not start real incidents with them).
    """
    from dataclasses import replace

    # The flow-run processes the runner starts inherit this (an explicit value wins).
    for name, value in HEARTBEATS.items():
        os.environ.setdefault(name, value)

    from prefect import serve

    from deployments.catalog import load_catalog, to_runner_deployment
    from runbook.settings import load_settings

    # Refuse to start on settings every run would refuse (RUNBOOK_ENVIRONMENT unset, a bad
    # value): better no runbooks served than runbooks served with approvals off.
    load_settings()

    specs = [
        replace(
            spec,
            schedules=tuple(s if schedules else {**s, "active": False} for s in spec.schedules),
            triggers=() if spec.name in without_triggers_of else spec.triggers,
        )
        for spec in load_catalog()
    ]
    serve(
        *[to_runner_deployment(spec) for spec in specs],
        limit=SERVE_LIMIT,
        query_seconds=SERVE_QUERY_SECONDS,
    )


def _wait_for_http(url: str, timeout: float, process: subprocess.Popen[bytes]) -> None:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 (loopback URL we built)
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout:.0f}s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _start_server(
    host: str, port: int, env: dict[str, str], quiet: bool = False
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL if quiet else None,
        stderr=subprocess.DEVNULL if quiet else None,
        # Own session: Ctrl-C reaches only us, and we stop the children in order
        # (runner, sandbox, then the server the runner reports to).
        start_new_session=True,
    )


def run_everything(host: str, port: int, prefect_db: str = "sqlite") -> None:
    from sandbox.platform import Sandbox

    STATE_DIR.mkdir(exist_ok=True)
    api_url = f"http://{host}:{port}/api"
    prefect_env = {
        **os.environ,
        "PREFECT_HOME": str(STATE_DIR / "prefect"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": api_url,
        **FAST_RUNNER,
    }
    server: subprocess.Popen[bytes] | None = None
    if prefect_db == "sqlite":
        # Started first: its ~25 s start overlaps the sandbox's.
        print("Starting the Prefect server (SQLite in .local/prefect; ~25 s the first time)…")
        server = _start_server(host, port, prefect_env)
    # Alertmanager delivers the sandbox's alerts to the alert bridge, which posts them to
    # Prefect as events (bridge/app.py).
    bridge = subprocess.Popen(
        [sys.executable, "-m", "bridge"],
        env={**prefect_env, "ALERT_BRIDGE_PORT": str(ALERT_BRIDGE_PORT)},
        cwd=PROJECT_ROOT,
        start_new_session=True,
    )
    try:
        print("Starting the sandbox platform…")
        bridge_url = f"http://127.0.0.1:{ALERT_BRIDGE_PORT}/alertmanager"
        with Sandbox(alert_webhook_url=bridge_url) as platform:
            if server is None:
                from sandbox.prefect_database import create_prefect_database

                print("Starting the Prefect server on the sandbox's PostgreSQL…")
                prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"] = create_prefect_database(
                    platform.postgres
                )
                server = _start_server(host, port, prefect_env)
            _wait_for_http(f"{api_url}/health", 180, server)
            served = subprocess.Popen(
                [sys.executable, "-m", "deployments.local", "--serve-only"],
                env={**prefect_env, **platform.env},
                cwd=PROJECT_ROOT,
                start_new_session=True,
            )
            try:
                print(
                    "\n"
                    f"  Prefect UI:        http://{host}:{port}  (database: {prefect_db})\n"
                    f"  Kubernetes API:    {platform.kube.url}\n"
                    f"  Backend API:       {platform.backend.url if platform.backend else '-'}\n"
                    f"  Notifications to:  {platform.receiver.url}\n"
                    f"  Prometheus:        {platform.env['RUNBOOK_PROMETHEUS_URL']}\n"
                    f"  Alert bridge:      http://127.0.0.1:{ALERT_BRIDGE_PORT}/alertmanager\n"
                    "  Lock leases:       in the server's memory (a server restart leaks held\n"
                    "                     locks; production keeps them in Redis, see README)\n"
                    "  Every runbook in prefect.yaml is served; Ctrl-C stops everything.\n",
                    flush=True,
                )
                served.wait()
            finally:
                _stop(served)
                # Before the sandbox (and its PostgreSQL) goes: the server may be on it.
                _stop(server)
    except KeyboardInterrupt:
        print("\nStopping…")
    finally:
        _stop(bridge)
        if server is not None:
            _stop(server)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # Ctrl-C and `kill` both stop everything cleanly, even when started in the background
    # (where the shell hands us SIGINT ignored).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-only", action="store_true", help="only serve the deployments")
    parser.add_argument(
        "--schedules-inactive", action="store_true", help="serve with every schedule off"
    )
    parser.add_argument(
        "--no-triggers-of",
        action="append",
        default=[],
        metavar="DEPLOYMENT",
        help="serve this deployment without its event triggers (repeatable)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument(
        "--prefect-db",
        choices=["sqlite", "postgres"],
        default=os.environ.get("PREFECT_DB") or "sqlite",
        help="the Prefect server's database: embedded SQLite (default) or the sandbox's "
        "PostgreSQL (env PREFECT_DB)",
    )
    args = parser.parse_args()
    if args.serve_only:
        serve_catalog(not args.schedules_inactive, args.no_triggers_of)
    else:
        run_everything(args.host, args.port, args.prefect_db)


if __name__ == "__main__":
    main()
