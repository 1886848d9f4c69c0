"""An HTTPS listener whose certificate follows a Kubernetes TLS Secret.

Every new connection is wrapped with the current `ssl.SSLContext`; before each handshake
the listener asks `material()` for the Secret's version and, when it changed, builds a
new context from the Secret's `tls.crt`/`tls.key` and swaps it in. Connections already
open keep the context they were made with; new handshakes see the new certificate — what
an ingress controller or a server watching its mounted Secret does. With no usable
certificate (the Secret deleted, or not yet issued) the handshake is refused: TLS is down.
"""

from __future__ import annotations

import os
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, Self

from sandbox.services import LOOPBACK, Service
from sandbox.services.http_service import _ServiceHTTPServer


@dataclass(frozen=True)
class TLSMaterial:
    """What a TLS Secret holds: a version that changes with it, the PEM chain and key."""

    version: str
    certificate_pem: bytes
    private_key_pem: bytes


def _context(material: TLSMaterial) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain reads files only: a private directory, removed at once.
    with tempfile.TemporaryDirectory(prefix="sandbox-tls-") as directory:
        cert_path = os.path.join(directory, "tls.crt")
        key_path = os.path.join(directory, "tls.key")
        with open(cert_path, "wb") as cert_file:
            cert_file.write(material.certificate_pem)
        with open(os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as key_file:
            key_file.write(material.private_key_pem)
        context.load_cert_chain(cert_path, key_path)
    return context


class _ReloadingContext:
    """The SSLContext of the Secret's current version, rebuilt when the version changes."""

    def __init__(self, material: Callable[[], TLSMaterial | None]) -> None:
        self._material = material
        self._lock = threading.Lock()
        self._version: str | None = None
        self._context: ssl.SSLContext | None = None
        self.reloads = 0

    def current(self) -> ssl.SSLContext | None:
        material = self._material()
        with self._lock:
            if material is None:
                self._version, self._context = None, None
            elif material.version != self._version:
                try:
                    self._context = _context(material)
                except (ssl.SSLError, ValueError):
                    self._context = None  # a Secret with no usable certificate: no TLS
                self._version = material.version
                self.reloads += 1
            return self._context


class _TLSHTTPServer(_ServiceHTTPServer):
    """Handshakes in the connection's own thread (a slow client never blocks accept)."""

    contexts: _ReloadingContext

    def finish_request(self, request: Any, client_address: Any) -> None:
        context = self.contexts.current()
        if context is None:
            request.close()
            return
        try:
            wrapped = context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # the client refused our certificate, or went away mid-handshake
        try:
            super().finish_request(wrapped, client_address)
        finally:
            wrapped.close()


class TLSListener(Service):
    """Serves `handler_class` for `service` over HTTPS with the Secret's certificate."""

    def __init__(
        self,
        handler_class: type[BaseHTTPRequestHandler],
        service: Any,
        material: Callable[[], TLSMaterial | None],
        host: str = LOOPBACK,
        port: int = 0,
    ) -> None:
        self.host, self._port = host, port
        self._handler_class, self._service = handler_class, service
        self.contexts = _ReloadingContext(material)
        self._httpd: _TLSHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        """`host:port`, what `RUNBOOK_TLS_ENDPOINTS` maps a Certificate to."""
        return f"{self.host}:{self._port}"

    def start(self) -> Self:
        if self._httpd is not None:
            return self
        httpd = _TLSHTTPServer((self.host, self._port), self._handler_class)
        httpd.service, httpd.contexts = self._service, self.contexts
        self._port = int(httpd.server_address[1])
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"tls-listener:{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        thread, self._thread = self._thread, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
