"""A local HTTP receiver that records every notification the runbooks send.

It answers like the services the notifications go to: PagerDuty Events v2 for paths under
``/v2/enqueue`` (202 with a ``dedup_key``), a chat webhook's plain ``ok`` for anything
else. Tests read what arrived from ``received`` or block on ``wait_for``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

from sandbox.services import LOOPBACK, ThreadedHTTPService

PAGERDUTY_PREFIX = "/v2/enqueue"


@dataclass(frozen=True)
class ReceivedNotification:
    """One POST as it arrived, and the status the receiver answered it with."""

    at: datetime
    path: str  # as requested, query string included
    headers: dict[str, str]  # names lower-cased: HTTP header names are case-insensitive
    body: bytes
    json: Any | None  # the parsed body, or None when it is not JSON
    status: int = 200

    def summary(self, limit: int = 200) -> str:
        text = self.body[:limit].decode(errors="replace")
        return f"{self.at:%H:%M:%S.%f} POST {self.path} -> {self.status}: {text}"


class _Handler(BaseHTTPRequestHandler):
    server_version = "notification-receiver/1"
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        pass  # `received` is the log

    def do_POST(self) -> None:
        receiver: NotificationReceiver = self.server.service  # type: ignore[attr-defined]
        receiver._record_and_answer(self)

    def do_GET(self) -> None:
        # Lets callers probe that the receiver is up; not a notification, so not recorded.
        _send(self, 200, b"ok", "text/plain")


class NotificationReceiver(ThreadedHTTPService):
    """Records every POST on any path; ``fail_next`` makes it refuse some first."""

    handler_class = _Handler
    thread_name = "notification-receiver"

    def __init__(self, host: str = LOOPBACK, port: int = 0) -> None:
        super().__init__(host=host, port=port)
        self._received: list[ReceivedNotification] = []
        self._failures: deque[int] = deque()
        self._changed = threading.Condition()

    @property
    def received(self) -> list[ReceivedNotification]:
        """A snapshot of everything received so far, oldest first."""
        with self._changed:
            return list(self._received)

    def clear(self) -> None:
        """Forget what was received and any failures still queued."""
        with self._changed:
            self._received.clear()
            self._failures.clear()

    def fail_next(self, times: int = 1, status: int = 503) -> None:
        """Answer the next ``times`` POSTs with ``status`` (they are still recorded)."""
        with self._changed:
            self._failures.extend([status] * times)

    def wait_for(
        self,
        predicate: Callable[[ReceivedNotification], bool] | None = None,
        timeout: float = 10.0,
    ) -> ReceivedNotification:
        """Return the first notification (already received or arriving) matching ``predicate``.

        Without a predicate, the first notification of any kind.
        """
        matches = predicate or (lambda _: True)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for notification in self._received:
                    if matches(notification):
                        return notification
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            received = list(self._received)
        listing = "\n".join(f"  {n.summary()}" for n in received) or "  (nothing)"
        raise TimeoutError(
            f"No notification matching {getattr(predicate, '__name__', predicate)!s} arrived "
            f"at {self.url} within {timeout:g}s. Received {len(received)}:\n{listing}"
        )

    def _record_and_answer(self, handler: BaseHTTPRequestHandler) -> None:
        body = _read_body(handler)
        try:
            parsed: Any | None = json.loads(body) if body else None
        except ValueError:
            parsed = None

        with self._changed:
            injected = self._failures.popleft() if self._failures else None
        if injected is not None:
            status = injected
            answer: bytes = json.dumps({"status": "error", "message": "injected failure"}).encode()
            content_type = "application/json"
        elif handler.path.startswith(PAGERDUTY_PREFIX):
            status, answer = _pagerduty_answer(parsed)
            content_type = "application/json"
        else:
            status, answer, content_type = 200, b"ok", "text/plain"

        notification = ReceivedNotification(
            at=datetime.now(UTC),
            path=handler.path,
            headers={name.lower(): value for name, value in handler.headers.items()},
            body=body,
            json=parsed,
            status=status,
        )
        # Recorded before answering: a sender that got its answer finds it in `received`.
        with self._changed:
            self._received.append(notification)
            self._changed.notify_all()
        _send(handler, status, answer, content_type)


def _pagerduty_answer(event: Any) -> tuple[int, bytes]:
    if not isinstance(event, dict):
        # What Events v2 says to a body that is not a JSON object.
        refusal = {
            "status": "invalid event",
            "message": "Event object is invalid",
            "errors": ["Event body must be a JSON object"],
        }
        return 400, json.dumps(refusal).encode()
    dedup_key = event.get("dedup_key") or uuid.uuid4().hex
    accepted = {"status": "success", "message": "Event processed", "dedup_key": dedup_key}
    return 202, json.dumps(accepted).encode()


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks: list[bytes] = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                handler.rfile.readline()  # the blank line after the last chunk
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()  # CRLF after each chunk
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length > 0 else b""


def _send(handler: BaseHTTPRequestHandler, status: int, payload: bytes, content_type: str) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)
