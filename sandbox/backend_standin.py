"""A stand-in for the platform's backend API, serving its health endpoints for real.

``/health/db`` runs ``SELECT 1`` on the PostgreSQL it is given and ``/health/redis`` pings
the Redis it is given, so stopping either server makes the matching check fail the way it
would in production. Maintenance mode and "scaled to zero" come from callables so the
sandbox can wire them to whatever holds that state (e.g. the Kubernetes emulator's
Deployment env and replica count). Tests inject latency and failures per path.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import json
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, Self
from urllib.parse import unquote, urlsplit

import psycopg
import redis
from psycopg.conninfo import conninfo_to_dict
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.backoff import NoBackoff
from redis.retry import Retry

from sandbox.services import LOOPBACK, ThreadedHTTPService
from sandbox.tls_listener import TLSListener, TLSMaterial

# Prometheus client defaults, so dashboards and the p99 maths behave as in production.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
CHECK_TIMEOUT_SECONDS = 2
# Request logs: one JSON line per request, a bounded ring per pod (what its log file keeps).
LOG_LINES_PER_POD = 10_000
DEFAULT_POD = "backend-standin"

# The sandbox's control path (never a path of the real backend's API).
FAULTS_PATH = "/sandbox/faults"
MAX_FAULT_LATENCY_SECONDS = 30.0
MAX_CONTROL_BODY_BYTES = 4096

_JSON = "application/json"
_PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class PodSecrets:
    """What the backend's pods load when they start (from an ExternalSecret in a real
    cluster): the API key clients must send, and the database role and its password."""

    api_key: str
    database_user: str
    database_password: str


class Faults(BaseModel):
    """What ``PUT /sandbox/faults`` sets: applied to every request the backend serves
    (not ``/metrics``, not the control path itself)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_seconds: float = Field(
        ge=0, le=MAX_FAULT_LATENCY_SECONDS, description="Added before each answer."
    )
    error_rate: float = Field(
        ge=0, le=1, description="Share of requests answered 500 (0.25: every 4th)."
    )


NO_FAULTS = Faults(latency_seconds=0, error_rate=0)


def parse_faults(raw: bytes) -> Faults:
    """The body of ``PUT /sandbox/faults``; ValueError naming the field otherwise."""
    try:
        return Faults.model_validate_json(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "body"
        raise ValueError(f"{field}: {error['msg']}") from None


class _RequestMetrics:
    """Latency histogram and per-status counter, rendered in Prometheus text format."""

    def __init__(self, buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        self.buckets = buckets
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._bucket_counts = [0] * len(self.buckets)
            self._sum = 0.0
            self._count = 0
            self._by_status: Counter[int] = Counter()

    def observe(self, seconds: float, status: int) -> None:
        with self._lock:
            for i, upper in enumerate(self.buckets):
                if seconds <= upper:
                    self._bucket_counts[i] += 1
            self._sum += seconds
            self._count += 1
            self._by_status[status] += 1

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP http_request_duration_seconds Duration of HTTP requests in seconds.",
                "# TYPE http_request_duration_seconds histogram",
            ]
            lines += [
                f'http_request_duration_seconds_bucket{{le="{_prom_float(upper)}"}} {count}'
                for upper, count in zip(self.buckets, self._bucket_counts, strict=True)
            ]
            lines += [
                f'http_request_duration_seconds_bucket{{le="+Inf"}} {self._count}',
                f"http_request_duration_seconds_sum {self._sum!r}",
                f"http_request_duration_seconds_count {self._count}",
                "# HELP http_requests_total Total HTTP requests by status code.",
                "# TYPE http_requests_total counter",
            ]
            lines += [
                f'http_requests_total{{status="{status}"}} {count}'
                for status, count in sorted(self._by_status.items())
            ]
        return "\n".join(lines) + "\n"


class _InFlightGauge:
    """`http_requests_in_flight`: requests being served right now (a scrape is not one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            self.value += 1
        try:
            yield
        finally:
            with self._lock:
                self.value -= 1

    def render(self) -> str:
        return (
            "# HELP http_requests_in_flight Requests being served now (scrapes excluded).\n"
            "# TYPE http_requests_in_flight gauge\n"
            f"http_requests_in_flight {self.value}\n"
        )


def _prom_float(value: float) -> str:
    return repr(float(value))


class _Handler(BaseHTTPRequestHandler):
    server_version = "backend-standin/1"
    timeout = 30  # a silent client must not pin a handler thread forever

    def log_message(self, format: str, *args: Any) -> None:
        pass  # request logs would drown test output; `requests` and /metrics record them

    def _dispatch(self) -> None:
        standin: BackendStandIn = self.server.service  # type: ignore[attr-defined]
        standin._serve(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch


class BackendStandIn(ThreadedHTTPService):
    """The backend API's health surface, served over HTTP from a thread.

    Test knobs (safe to change while serving):

    - ``delay_seconds[path]``: sleep this long before answering ``path`` (the request
      counts in ``http_requests_in_flight`` meanwhile).
    - ``force_status[path]``: answer ``path`` with this status until removed.
    - ``fail_next(path, status, times)``: answer the next ``times`` requests with ``status``.
    - ``set_faults(Faults(...))`` / ``PUT /sandbox/faults``: latency and a 500 rate on
      every request served (the HTTP form only with ``sandbox_controls``).
    - ``maintenance_mode`` / ``replicas``: the callables given, reassignable.
    - ``restart_pods()``: the pods (re)start and call ``load_secrets`` (``pod_starts``
      counts them); until then, and if loading fails, no key is accepted.
    - ``requests``: how many requests each path received (also those refused).
    - ``log_clock``: unix time in ns stamped on request logs (skew it to write "old" logs).
    - ``reset()``: clear all of the above except the callables, and the request logs.

    Request logs: every request the backend serves (not ``/metrics`` scrapes, not those
    an ingress with no pods refuses) is one JSON line — ``ts``, ``level`` (error for 5xx,
    warning for 4xx, else info), ``method``, ``path`` (no query string), ``status``,
    ``duration_ms``, ``user_id`` when ``X-User-Id`` is sent, ``msg`` — written to one of
    the ``pods()`` in turn, as a Service spreads requests; ``pod_log(name)`` reads them.
    """

    handler_class = _Handler
    thread_name = "backend-standin"

    def __init__(
        self,
        database_dsn: str,
        redis_url: str,
        maintenance_mode: Callable[[], bool] = lambda: False,
        replicas: Callable[[], int] = lambda: 1,
        load_secrets: Callable[[], PodSecrets] | None = None,
        host: str = LOOPBACK,
        port: int = 0,
        tls_material: Callable[[], TLSMaterial | None] | None = None,
        pods: Callable[[], list[str]] = lambda: [DEFAULT_POD],
        sandbox_controls: bool = False,
    ) -> None:
        super().__init__(host=host, port=port)
        self.sandbox_controls = sandbox_controls
        self.faults = NO_FAULTS
        # Error budget of `faults.error_rate`: a request fails each time it reaches 1, so
        # the share of 500s is exact (a measurement from outside sees the rate asked).
        self._error_debt = 0.0
        # HTTPS on a second port, with the certificate of a TLS Secret (reloaded on change).
        self.tls = TLSListener(_Handler, self, tls_material, host) if tls_material else None
        self.database_dsn = database_dsn
        self.redis_url = redis_url
        self.maintenance_mode = maintenance_mode
        self.replicas = replicas
        self.delay_seconds: dict[str, float] = {}
        self.force_status: dict[str, int] = {}
        self.requests: Counter[str] = Counter()
        self._failures: dict[str, deque[int]] = {}
        self._knob_lock = threading.Lock()
        self._metrics = _RequestMetrics()
        self._in_flight = _InFlightGauge()
        self.load_secrets = load_secrets
        self._pod_secrets: PodSecrets | None = None
        self.pod_starts = 0
        # More metrics for /metrics (e.g. sandbox/platform_metrics.py), rendered per scrape.
        self.exporters: list[Callable[[], str]] = []
        self.pods = pods
        self.log_clock: Callable[[], int] = time.time_ns
        self._logs: dict[str, deque[tuple[int, str]]] = {}
        self._log_lock = threading.Lock()
        self._turn = itertools.count()

    def start(self) -> Self:
        super().start()
        if self.tls is not None:
            self.tls.start()
        return self

    def stop(self) -> None:
        if self.tls is not None:
            self.tls.stop()
        super().stop()

    # -- test knobs ------------------------------------------------------------------

    def fail_next(self, path: str, status: int = 503, times: int = 1) -> None:
        """Answer the next ``times`` requests to ``path`` with ``status`` (then recover)."""
        with self._knob_lock:
            self._failures.setdefault(path, deque()).extend([status] * times)

    def reset(self) -> None:
        """Forget injected delays/failures, request counts and metrics."""
        with self._knob_lock:
            self.delay_seconds.clear()
            self.force_status.clear()
            self._failures.clear()
            self.requests.clear()
            self.log_clock = time.time_ns
            self.faults = NO_FAULTS
            self._error_debt = 0.0
        self._metrics.reset()
        with self._log_lock:
            self._logs.clear()

    def metrics_text(self) -> str:
        """What ``GET /metrics`` would answer now."""
        exported = "".join(export() for export in self.exporters)
        return self._metrics.render() + self._in_flight.render() + exported

    @property
    def in_flight(self) -> int:
        """Requests being served now (what ``http_requests_in_flight`` says)."""
        return self._in_flight.value

    # -- serving ---------------------------------------------------------------------

    def set_faults(self, faults: Faults) -> None:
        """What ``PUT /sandbox/faults`` does (also usable in-process)."""
        with self._knob_lock:
            self.faults = faults
            self._error_debt = 0.0

    def _take_fault(self) -> tuple[float, bool]:
        """(latency, answer 500?) for the request being served."""
        with self._knob_lock:
            faults = self.faults
            self._error_debt += faults.error_rate
            failing = self._error_debt >= 1 - 1e-9
            if failing:
                self._error_debt -= 1
        return faults.latency_seconds, failing

    def _serve_control(self, handler: BaseHTTPRequestHandler) -> None:
        """``/sandbox/faults``: outside the backend (no counts, logs, metrics, pods)."""
        if handler.command == "GET":
            _drain_body(handler)
            _send(handler, 200, self.faults.model_dump())
            return
        if handler.command != "PUT":
            _drain_body(handler)
            _send(handler, 405, {"detail": "Method Not Allowed: GET or PUT"})
            return
        length = int(handler.headers.get("Content-Length") or 0)
        if length > MAX_CONTROL_BODY_BYTES:
            handler.close_connection = True  # the body stays unread: do not reuse
            _send(handler, 413, {"detail": f"body over {MAX_CONTROL_BODY_BYTES} bytes"})
            return
        try:
            faults = parse_faults(handler.rfile.read(length) if length else b"")
        except ValueError as exc:
            _send(handler, 400, {"detail": str(exc)})
            return
        self.set_faults(faults)
        _send(handler, 200, faults.model_dump())

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        started = time.perf_counter()
        path = urlsplit(handler.path).path
        if self.sandbox_controls and path == FAULTS_PATH:
            self._serve_control(handler)
            return
        _drain_body(handler)
        with self._knob_lock:
            self.requests[path] += 1

        if self.replicas() <= 0:
            # What an ingress with no endpoints answers: the backend never sees it, so it
            # is not in the backend's own metrics either.
            _send(handler, 503, {"status": "unavailable"})
            return

        if path == "/metrics":  # a scrape is neither in flight nor in the latency it reads
            status, body, content_type = self._answer(handler.command, path)
            _send(handler, status, body, content_type)
            return
        with self._in_flight.held():
            latency, failing = self._take_fault()
            delay = self.delay_seconds.get(path, 0.0) + latency
            if delay > 0:
                time.sleep(delay)
            if failing:
                status, body, content_type = 500, {"detail": "injected fault (sandbox)"}, _JSON
            else:
                status, body, content_type = self._answer(handler.command, path, handler.headers)
            # Recorded before sending so a scrape right after this response includes it.
            self._metrics.observe(time.perf_counter() - started, status)
            self._log_request(handler, path, status, time.perf_counter() - started, body)
            _send(handler, status, body, content_type)

    def _answer(self, method: str, path: str, headers: Any = None) -> tuple[int, Any, str]:
        injected = self._take_injected_status(path)
        if injected is not None:
            return injected, {"status": "error", "detail": f"injected failure ({injected})"}, _JSON

        if path == "/metrics":
            # Served in maintenance too: the drain before maintenance work reads it.
            if method != "GET":
                return 405, {"detail": "Method Not Allowed"}, _JSON
            return 200, self.metrics_text(), _PROMETHEUS_TEXT

        if self.maintenance_mode():
            if path == "/health/live":
                return 200, {"status": "alive"}, _JSON
            if path in ("/health", "/health/ready"):
                return 503, {"status": "maintenance"}, _JSON
            return 503, {"detail": "maintenance"}, _JSON

        routes: dict[str, Callable[[], tuple[int, Any]]] = {
            "/health": lambda: (200, {"status": "healthy"}),
            "/health/ready": lambda: (200, {"status": "ready"}),
            "/health/live": lambda: (200, {"status": "alive"}),
            "/health/db": self._check_database,
            "/health/redis": self._check_redis,
            "/api/v1/me": lambda: self._who_am_i(headers),
        }
        route = routes.get(path)
        if route is None:
            return 404, {"detail": "Not Found"}, _JSON
        if method != "GET":
            return 405, {"detail": "Method Not Allowed"}, _JSON
        status, body = route()
        return status, body, _JSON

    def _take_injected_status(self, path: str) -> int | None:
        with self._knob_lock:
            queued = self._failures.get(path)
            if queued:
                return queued.popleft()
            return self.force_status.get(path)

    def _check_database(self) -> tuple[int, dict[str, str]]:
        try:
            with psycopg.connect(
                self.database_dsn,
                connect_timeout=CHECK_TIMEOUT_SECONDS,
                autocommit=True,
                **self._database_login(),
            ) as conn:
                conn.execute("SELECT 1").fetchone()
        except Exception as exc:  # any failure is "disconnected" to a health probe
            return 503, {"status": "disconnected", "error": self._short_reason(exc)}
        return 200, {"status": "connected"}

    def _check_redis(self) -> tuple[int, dict[str, str]]:
        client = redis.Redis.from_url(
            self.redis_url,
            socket_timeout=CHECK_TIMEOUT_SECONDS,
            socket_connect_timeout=CHECK_TIMEOUT_SECONDS,
            # One attempt: a probe that retries hides the outage it should report.
            retry=Retry(NoBackoff(), 0),
        )
        try:
            client.ping()
        except Exception as exc:
            return 503, {"status": "disconnected", "error": self._short_reason(exc)}
        finally:
            client.close()
        return 200, {"status": "connected"}

    def _short_reason(self, exc: BaseException) -> str:
        """One line naming the failure, with connection strings and passwords removed."""
        text = " ".join(str(exc).split()) or "no detail"
        pod = self._pod_secrets
        extra = [pod.api_key, pod.database_password] if pod else []
        for secret in sorted(
            {*_secrets_in(self.database_dsn, self.redis_url), *extra}, key=len, reverse=True
        ):
            text = text.replace(secret, "***")
        return f"{type(exc).__name__}: {text}"[:200]

    # -- pods and their secrets -------------------------------------------------------

    def restart_pods(self) -> None:
        """The backend's pods (re)start: they load the secrets as they are now. A failed
        load leaves them without (every key refused, /health/db with no password)."""
        self.pod_starts += 1
        try:
            self._pod_secrets = self.load_secrets() if self.load_secrets else None
        except Exception:
            self._pod_secrets = None

    def _database_login(self) -> dict[str, Any]:
        """Who /health/db logs in as: the role and password the pods loaded, if any."""
        if self.load_secrets is None:
            return {}  # no secrets wired: the DSN's own credentials
        pod = self._pod_secrets
        if pod is None:
            return {"password": ""}
        return {"user": pod.database_user, "password": pod.database_password}

    def _who_am_i(self, headers: Any) -> tuple[int, dict[str, str]]:
        """An authenticated endpoint: 200 for the API key the pods loaded, 401 otherwise."""
        sent = (headers.get("X-API-Key") if headers is not None else None) or ""
        pod = self._pod_secrets
        if pod is None or not hmac.compare_digest(sent.encode(), pod.api_key.encode()):
            return 401, {"detail": "invalid or missing API key"}
        return 200, {"authenticated": "api-key"}

    # -- request logs ----------------------------------------------------------------

    def pod_log(self, pod: str) -> list[tuple[int, str]] | None:
        """The request log lines `pod` wrote, as (unix ns, line); None: not one of ours."""
        with self._log_lock:
            lines = self._logs.get(pod)
            return list(lines) if lines is not None else None

    def _log_request(
        self, handler: BaseHTTPRequestHandler, path: str, status: int, seconds: float, body: Any
    ) -> None:
        pods = self.pods()  # asked outside our lock: it may read the Kubernetes emulator
        if not pods:
            return
        at = self.log_clock()
        level = "error" if status >= 500 else "warning" if status >= 400 else "info"
        record: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at // 10**9))
            + f".{at // 10**6 % 1000:03d}Z",
            "level": level,
            "method": handler.command,
            "path": path,
            "status": status,
            "duration_ms": round(seconds * 1000, 1),
        }
        user = handler.headers.get("X-User-Id")
        if user:
            record["user_id"] = user[:128]
        detail = body.get("detail") or body.get("error") if isinstance(body, dict) else None
        record["msg"] = f"request failed: {detail}" if status >= 400 and detail else "request done"
        line = json.dumps(record)
        pod = pods[next(self._turn) % len(pods)]
        with self._log_lock:
            for gone in set(self._logs) - set(pods):
                del self._logs[gone]  # a deleted pod's logs go with it
            self._logs.setdefault(pod, deque(maxlen=LOG_LINES_PER_POD)).append((at, line))


def _secrets_in(database_dsn: str, redis_url: str) -> list[str]:
    """Strings that must never appear in an answer: the URLs and their passwords."""
    found = [database_dsn, redis_url]
    with contextlib.suppress(psycopg.ProgrammingError):
        found.append(str(conninfo_to_dict(database_dsn).get("password") or ""))
    with contextlib.suppress(ValueError):
        raw = urlsplit(redis_url).password or ""
        found += [raw, unquote(raw)]
    # Longest first so a password inside a URL cannot leave the rest of the URL behind.
    return sorted({s for s in found if s}, key=len, reverse=True)


def _drain_body(handler: BaseHTTPRequestHandler) -> None:
    # Unread request bodies make the kernel reset the connection on close, which the
    # client then sees instead of our answer.
    length = int(handler.headers.get("Content-Length") or 0)
    if length > 0:
        handler.rfile.read(length)


def _send(
    handler: BaseHTTPRequestHandler, status: int, body: Any, content_type: str = _JSON
) -> None:
    payload = (body if isinstance(body, str) else json.dumps(body)).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(payload)
