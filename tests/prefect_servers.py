"""A Prefect server of a test's own: `prefect server start` on its own SQLite file and port,
for what the session's ephemeral server cannot show (a restart, the repossessor, basic
auth)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from prefect._internal.concurrency.services import _QueueServiceBase
from prefect.settings import PREFECT_API_URL, temporary_settings

from sandbox.services.base import LOOPBACK, free_port


class PrefectServer:
    """`prefect server start` on its own SQLite file and port; `restart()` keeps both."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}/api"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            **env,
        }
        self.env.pop("PREFECT_API_URL", None)
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                *(sys.executable, "-m", "prefect", "server", "start"),
                *("--host", LOOPBACK, "--port", str(self.port), "--no-scheduler", "--no-late-runs"),
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        give_up = time.monotonic() + 180
        while time.monotonic() < give_up:
            assert self._process.poll() is None, "the Prefect server exited while starting"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError("the Prefect server did not start within 180 s")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @contextmanager
    def pointed_at(self) -> Iterator[None]:
        """This process's Prefect client points at this server while inside.

        Prefect's in-process services (lock acquisition per lock name, events, API logs)
        keep the client they were started with for the life of the process: left running,
        a later test's `exclusive("database/…")` would still talk to this server after it
        stopped. They are drained on the way out, while the server still answers, and
        start afresh against the session's server on their next use."""
        try:
            with temporary_settings(updates={PREFECT_API_URL: self.url}):
                yield
        finally:
            _QueueServiceBase.drain_all(timeout=30)
