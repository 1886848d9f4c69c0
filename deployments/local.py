"""`make up`: the whole thing on one machine, one command.

1. a Prefect server on SQLite with its UI on http://127.0.0.1:4200 (state in .local/;
   lock leases in its memory, Prefect's default: a restart of this server forgets them,
   see README > Production for the Redis lease storage),
2. the sandbox platform (PostgreSQL, Redis, moto, the Kubernetes emulator, the backend
   stand-in, a notification receiver), and
3. every deployment in prefect.yaml, served by one process with its schedules live,
   pointed at the sandbox.

Ctrl-C stops all three. `--serve-only` runs step 3 alone against whatever PREFECT_API_URL
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
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = PROJECT_ROOT / ".local"

# Launch latency: the runner checks for new runs every second (Prefect's default is 10 s).
FAST_RUNNER = {"PREFECT_RUNNER_POLL_FREQUENCY": "1"}


def serve_catalog() -> None:
    """Serve every prefect.yaml deployment from this process (blocks until stopped)."""
    from prefect import serve

    from deployments.catalog import load_catalog, to_runner_deployment

    deployments = [to_runner_deployment(spec) for spec in load_catalog()]
    serve(*deployments, limit=10)


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


def run_everything(host: str, port: int) -> None:
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
    print("Starting the Prefect server (SQLite in .local/prefect; ~25 s the first time)…")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
        env=prefect_env,
        cwd=PROJECT_ROOT,
        # Own session: Ctrl-C reaches only us, and we stop the children in order
        # (runner, sandbox, then the server the runner reports to).
        start_new_session=True,
    )
    try:
        print("Starting the sandbox platform…")
        with Sandbox() as platform:
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
                    f"  Prefect UI:        http://{host}:{port}\n"
                    f"  Kubernetes API:    {platform.kube.url}\n"
                    f"  Backend API:       {platform.backend.url if platform.backend else '-'}\n"
                    f"  Notifications to:  {platform.receiver.url}\n"
                    "  Lock leases:       in the server's memory (a server restart leaks held\n"
                    "                     locks; production keeps them in Redis, see README)\n"
                    "  Every runbook in prefect.yaml is served; Ctrl-C stops everything.\n",
                    flush=True,
                )
                served.wait()
            finally:
                _stop(served)
    except KeyboardInterrupt:
        print("\nStopping…")
    finally:
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
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4200)
    args = parser.parse_args()
    if args.serve_only:
        serve_catalog()
    else:
        run_everything(args.host, args.port)


if __name__ == "__main__":
    main()
