"""What every sandbox server shares: a start/stop lifecycle, free ports, a server subprocess.

`Service` is the context manager plus an ``atexit`` net that every server (and the HTTP
stand-ins, and the Kubernetes emulator) builds on. `ServerProcess` is the part that
PostgreSQL and Redis share: a server program on a free loopback port, started again on a
fresh port when someone took the one `free_port()` picked, and waited for until it answers.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

LOOPBACK = "127.0.0.1"

# How many times a server is retried on a fresh port when the one free_port() picked was
# taken by someone else in the meantime (free_port cannot reserve a port).
PORT_ATTEMPTS = 3


class SandboxDependencyError(RuntimeError):
    """A program the sandbox needs is not installed on this machine."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust the signal
    # Field 3, after the parenthesised command name (which may itself contain spaces).
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class Service:
    """Start/stop lifecycle shared by every server: context manager plus an atexit net."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        # start() cleans up after itself when it fails, so __exit__ is not needed then.
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _arm_atexit(self) -> None:
        atexit.unregister(self.stop)  # never register twice
        atexit.register(self.stop)

    def _disarm_atexit(self) -> None:
        atexit.unregister(self.stop)


class ServerProcess(Service):
    """A server program run as our child on a loopback port (PostgreSQL, Redis).

    Subclasses say how to reach the server once (`_answers`) and how to stop the process
    (`_stop_process`); starting it on a free port, retrying on a taken one and waiting until
    it answers is here.
    """

    startup_timeout: float

    def __init__(self, *, port: int | None, startup_timeout: float) -> None:
        self.startup_timeout = startup_timeout
        self._port = port
        self._port_fixed = port is not None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self._lock = threading.RLock()

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} has no port yet: call start() first")
        return self._port

    @contextmanager
    def _starting(self, prefix: str) -> Iterator[Path | None]:
        """The shape of every `start()`: under the lock; nothing to do (yields None) when
        it runs already; else a fresh directory to start in, and on any failure everything
        stopped and removed again before the error goes on."""
        with self._lock:
            if self.is_running:
                yield None
                return
            self._arm_atexit()
            try:
                self._tmp = Path(tempfile.mkdtemp(prefix=prefix))
                yield self._tmp
            except BaseException:
                self.stop()
                raise

    def _answers(self) -> bool:
        """One attempt to reach the server; False while it is not ready yet."""
        raise NotImplementedError

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Stop the server and remove its directory. Idempotent."""
        with self._lock:
            self._stop_process()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
            self._disarm_atexit()

    def _stop_process(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 5 s."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        else:
            proc.wait()  # reap it

    def _launch(
        self, what: str, command: Callable[[int], list[str]], log_path: Path, *, may_move: bool
    ) -> None:
        """Run ``command(port)`` until the server answers, its output appended to ``log_path``.

        When the server dies because the port was taken meanwhile and ``may_move``, it is
        tried again on a fresh port; otherwise the error quotes what it logged.
        """
        for attempt in range(PORT_ATTEMPTS):
            if self._port is None:
                self._port = free_port()
            log_offset = log_path.stat().st_size if log_path.exists() else 0
            with log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    command(self._port),
                    # A cwd the server's user can enter: runuser keeps root's, and postgres
                    # complains about not being able to chdir back there.
                    cwd=self._tmp,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_until_ready():
                return
            self._stop_process()
            with log_path.open(errors="replace") as log_file:
                log_file.seek(log_offset)
                new_log = log_file.read()
            if "Address already in use" in new_log and may_move and attempt + 1 < PORT_ATTEMPTS:
                self._port = None
                continue
            raise RuntimeError(
                f"{what} did not start on port {self._port} within "
                f"{self.startup_timeout:g}s:\n--- server log ---\n{new_log[-3000:]}"
            )

    def _wait_until_ready(self) -> bool:
        """Wait until `_answers`; False if the process died or the timeout passed."""
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            if self._answers():
                return True
            time.sleep(0.02)
        return False
