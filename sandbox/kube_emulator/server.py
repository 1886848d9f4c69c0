"""The socket side: a threading HTTP/1.1 server handing requests to `RestApi` and streaming
watches as chunked, newline-delimited JSON."""

from __future__ import annotations

import contextlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .rest import Response, RestApi, WatchPlan


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client's connection pool reuses sockets
    disable_nagle_algorithm = True  # small answers must not wait for delayed ACKs
    server: EmulatorHTTPServer

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the write log is the record that matters; stderr noise is not

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        result = self.server.api.handle(
            method,
            self.path,
            self.headers.get("Content-Type", ""),
            raw,
            user_agent=self.headers.get("User-Agent", ""),
        )
        try:
            if isinstance(result, WatchPlan):
                self._stream(result)
            else:
                self._send(result)
        except OSError:  # the client went away, or the emulator is stopping
            self.close_connection = True

    def _send(self, response: Response) -> None:
        payload = response.payload()
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(payload)))
        for key, value in response.headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

    def _stream(self, plan: WatchPlan) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for line in self.server.api.watch_lines(plan):
            chunk = line + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))  # unbuffered: sent now
        self.wfile.write(b"0\r\n\r\n")


class EmulatorHTTPServer(ThreadingHTTPServer):
    """Tracks open connections so `close_connections` can end idle keep-alives on stop."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], api: RestApi) -> None:
        self.api = api
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the other side
                connection.shutdown(socket.SHUT_RDWR)
