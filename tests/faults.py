"""A real network fault between a runbook and a server: a TCP proxy on loopback that
forwards bytes both ways, and on demand slows a direction down, cuts every connection for
a while (an outage) after so many bytes went up, or drops the one connection that has
brought so many bytes down (a server session dying mid-transfer).

The client under test (boto3) and the server (moto) are untouched; only the wire between
them misbehaves, exactly as a flaky network or an S3 outage would.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType
from typing import Self

from sandbox.services import LOOPBACK


class FaultyProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.uploaded = 0  # bytes from clients to the server, all connections together
        self.up_rate: float | None = None  # bytes/s from clients to the server
        self.down_rate: float | None = None  # bytes/s from the server to clients
        self.drop_connection_after_download: int | None = None
        self.dropped = 0  # connections dropped by drop_connection_after_download
        self._cut_after: int | None = None
        self._outage_seconds = 0.0
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.2)
        self._running = True
        self._thread = threading.Thread(target=self._accept, daemon=True, name="faulty-proxy")

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._listener.getsockname()[1]}"

    def cut_after(self, uploaded_bytes: int, outage_seconds: float) -> None:
        """Once `uploaded_bytes` more have gone up, drop every connection and refuse new
        ones for `outage_seconds`; then forward again."""
        with self._lock:
            self._cut_after = self.uploaded + uploaded_bytes
            self._outage_seconds = outage_seconds

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    # -- life cycle ------------------------------------------------------------------

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._running = False
        self._thread.join(timeout=5)
        self._listener.close()
        self._close_all()

    # -- forwarding ------------------------------------------------------------------

    def _accept(self) -> None:
        while self._running:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.down:
                client.close()  # the outage: connections are dropped at once
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            for source, sink, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(source, sink, up), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, up: bool) -> None:
        downloaded = 0
        try:
            while True:
                data = source.recv(64 * 1024)
                if not data:
                    break
                if up:
                    self._account(len(data))
                    if self.down:
                        break
                else:
                    downloaded += len(data)
                    limit = self.drop_connection_after_download
                    if limit is not None and downloaded >= limit:
                        self.drop_connection_after_download = None
                        self.dropped += 1
                        break
                rate = self.up_rate if up else self.down_rate
                if rate:
                    time.sleep(len(data) / rate)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _account(self, size: int) -> None:
        with self._lock:
            self.uploaded += size
            if self._cut_after is not None and self.uploaded >= self._cut_after:
                self._cut_after = None
                self._down_until = time.monotonic() + self._outage_seconds
                cut = True
            else:
                cut = False
        if cut:
            self._close_all()

    def _close_all(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
