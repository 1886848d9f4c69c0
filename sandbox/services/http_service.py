"""The base of the in-process HTTP stand-ins (backend, notification receiver)."""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self

from .base import LOOPBACK, Service


class _ServiceHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its owner and does not shout about gone clients."""

    daemon_threads = True  # a handler still sleeping in a delay must not block stop()
    service: Any = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return  # the client gave up (e.g. its timeout fired during an injected delay)
        super().handle_error(request, client_address)


class ThreadedHTTPService(Service):
    """Serves ``handler_class`` on loopback from a daemon thread; base of the HTTP stand-ins.

    ``stop()`` then ``start()`` serves again on the same port.
    """

    handler_class: ClassVar[type[BaseHTTPRequestHandler]]
    thread_name: ClassVar[str] = "sandbox-http"

    def __init__(self, host: str = LOOPBACK, port: int = 0) -> None:
        self.host = host
        self._port = port
        self._httpd: _ServiceHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lifecycle_lock = threading.RLock()

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError(f"{type(self).__name__} has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def is_running(self) -> bool:
        return self._httpd is not None

    def start(self) -> Self:
        with self._lifecycle_lock:
            if self._httpd is not None:
                return self
            httpd = _ServiceHTTPServer((self.host, self._port), self.handler_class)
            httpd.service = self
            self._port = int(httpd.server_address[1])
            self._httpd = httpd
            self._thread = threading.Thread(
                target=httpd.serve_forever,
                kwargs={"poll_interval": 0.05},  # keeps stop() quick
                name=f"{self.thread_name}:{self._port}",
                daemon=True,
            )
            self._thread.start()
            self._arm_atexit()
            return self

    def stop(self) -> None:
        """Stop serving and close the listening socket. Idempotent."""
        with self._lifecycle_lock:
            httpd, self._httpd = self._httpd, None
            thread, self._thread = self._thread, None
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()
            if thread is not None:
                thread.join(timeout=5)
            self._disarm_atexit()
