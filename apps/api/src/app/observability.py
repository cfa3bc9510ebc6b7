"""Request ids, structured access logs, security headers and Prometheus metrics.

One pure-ASGI middleware does the per-request work (cheaper than BaseHTTPMiddleware, which runs the
rest of the app in a task of its own). Logs never carry headers, so a bearer token can never reach them.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import random
import re
import threading
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, TextIO

from fastapi.telemetry import TelemetryConfig
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
access_logger = logging.getLogger("app.access")

# A caller's own id is kept when it looks like an id; anything else is replaced.
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

# What OWASP's REST Security Cheat Sheet asks of every API response (with Content-Type, and HSTS from
# the TLS proxy in front): no sniffing, no framing, no caching.
API_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
)
# HTML pages (the console, the API docs) also keep their referrer and their window to themselves.
PAGE_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
)
# The admin console's pages: everything from our own origin, nothing inline.
CONSOLE_CSP = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
CONSOLE_HEADERS = (*PAGE_HEADERS, (b"content-security-policy", CONSOLE_CSP))


PENDING_OBSERVATIONS = 256
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


def fastapi_telemetry(environ: Mapping[str, str]) -> TelemetryConfig | None:
    """FastAPI's own OpenTelemetry when the environment sets OpenTelemetry up, otherwise off.

    FastAPI checks on every request whether a tracer, meter or logger provider has been configured
    (benchmarks/README.md has what that costs). Deciding once at start: on (FastAPI's
    defaults, None) when any `OTEL_*` variable is set, as `opentelemetry-instrument` and the SDK's
    environment configuration use, or `FASTAPI_OTEL_AUTO_CONFIGURE`; off otherwise. Our own
    Prometheus metrics and access lines do not depend on it."""
    if any(name.startswith(("OTEL_", "FASTAPI_OTEL_")) for name in environ):
        return None
    return {"tracing": False, "metrics": False, "logs": False}


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "http_request_duration_seconds",
            "Request latency by route template, method and status",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.runs = Gauge(
            "collection_runs", "Runs by status (all organisations)", ["status"], registry=self.registry
        )
        self.items = Counter(
            "collection_items_processed_total",
            "Items finished by this process's executor",
            ["status"],
            registry=self.registry,
        )
        self.cents_charged = Counter(
            "collection_cents_charged_total",
            "Cents the provider charged for this process's calls",
            registry=self.registry,
        )
        self.provider_errors = Counter(
            "collection_provider_errors_total",
            "Failed provider calls by source and class (free, charged, fatal)",
            ["source", "error_class"],
            registry=self.registry,
        )
        self.throttled = Counter(
            "collection_provider_throttled_total",
            "Calls the provider refused for the account's rate (HTTP 429), by source",
            ["source"],
            registry=self.registry,
        )
        self.workers = Gauge(
            "collection_executor_workers",
            "Calls this process keeps in flight at most now (its share of the account's rate x latency)",
            registry=self.registry,
        )
        # Request latencies wait here and go into the histogram together: its children take a lock
        # per bucket and per sum, taken for each request one at a time. Scrapes flush first.
        self._pending: list[tuple[str, str, int, float]] = []
        self._latency: dict[tuple[str, str, int], Any] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        pending = self._pending
        pending.append((method, route, status, seconds))
        if len(pending) >= PENDING_OBSERVATIONS:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        latency = self._latency
        for method, route, status, seconds in pending:
            key = (method, route, status)
            child = latency.get(key)
            if child is None:
                child = latency[key] = self.request_seconds.labels(method, route, str(status))
            child.observe(seconds)


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self._too_large = f"Request body larger than {max_body_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id, declared_length, chunked = _request_headers(scope["headers"])
        request_id = request_id or next_request_id()
        reset = request_id_var.set(request_id)
        path: str = scope["path"]
        added = [(b"x-request-id", request_id.encode()), *_response_headers(path)]
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *added]
            await send(message)

        try:
            if declared_length > self.max_body_bytes:
                # Refused before reading a byte of it, in the API's JSON error shape.
                body = {"detail": self._too_large, "error": "payload_too_large"}
                await _send_json(send_with_headers, 413, body)
            elif chunked:
                # A body sent without a length is counted as it arrives; one with a length cannot
                # run past it (uvicorn's HTTP/1.1 frames it), so needs no counting. An HTTP/2 server
                # in front of the app would need every body counted.
                await self.app(scope, self._within_limit(receive), send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method: str = scope["method"]
            # Any method a client sends is a label value only if HTTP knows it: bounded series.
            self.metrics.observe_request(
                method if method in HTTP_METHODS else "OTHER", template, status, elapsed
            )
            if access_logger.isEnabledFor(logging.INFO):
                client = (scope.get("client") or ("-",))[0]
                access_log(method, path, template, status, elapsed, client, request_id)
            request_id_var.reset(reset)

    def _within_limit(self, receive: Receive) -> Receive:
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, self._too_large)
            return message

        return receive_within_limit


def _response_headers(path: str) -> tuple[tuple[bytes, bytes], ...]:
    if path == "/admin" or path.startswith("/admin/"):
        return CONSOLE_HEADERS
    if path.startswith(("/docs", "/redoc", "/openapi.json")):
        return PAGE_HEADERS
    return API_HEADERS


def _request_headers(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, int, bool]:
    """The caller's request id (if it looks like one), the declared body length and whether the body
    comes chunked, in one pass."""
    request_id: str | None = None
    length = 0
    chunked = False
    for name, value in headers:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            request_id = candidate if REQUEST_ID_PATTERN.match(candidate) else None
        elif name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = 0
        elif name == b"transfer-encoding":
            chunked = True
    return request_id, length, chunked


# Request ids: 128 random bits from a generator of our own (seeded from the OS), as unique as a uuid4
# and several times cheaper; unlike a counter they say nothing about how many requests came between.
_request_ids = random.Random()


def next_request_id() -> str:
    return f"{_request_ids.getrandbits(128):032x}"


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        if _access_writer is not None:
            _access_writer.flush()  # the access lines before this line go out before it
        return True


class LogfmtFormatter(logging.Formatter):
    """`time level logger message key=value ... request_id=...`: readable and greppable."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        extra = " ".join(f"{k}={_logfmt(v)}" for k, v in fields.items())
        line = f"{self.formatTime(record)} {record.levelname} {record.name} {record.getMessage()}"
        if extra:
            line += " " + extra
        line += f" request_id={getattr(record, 'request_id', '-')}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# Printable ASCII but space, `"`, `=` and `\\`: written bare; anything else is quoted and escaped, so a
# value (a path is the caller's, percent-decoded) can never break a line or forge a field.
_LOGFMT_BARE = re.compile(r"[!#-<>-\[\]-~]+")


def _logfmt(value: object) -> str:
    text = str(value)
    return text if _LOGFMT_BARE.fullmatch(text) else json.dumps(text)


ACCESS_FLUSH_S = 0.1
ACCESS_BUFFER_LINES = 256
# (time, method, path, route, status, seconds, client, request id)
AccessEntry = tuple[float, str, str, str, int, float, str, str]


class AccessLineWriter:
    """Access lines onto the log handler's stream, in its format, buffered as nginx buffers its own.

    The same line `LogfmtFormatter`/`JsonFormatter` would write, without a `LogRecord`, a filter and a
    formatter per request, and with one write for many lines instead of a system call each (what each
    costs: benchmarks/README.md). A line waits at most
    `ACCESS_FLUSH_S` (or until `ACCESS_BUFFER_LINES` are pending); any other log line first writes out
    the access lines before it, so the stream stays in order; at exit the rest is written. Only a
    killed process can lose the last `ACCESS_FLUSH_S` of access lines.
    """

    def __init__(self, handler: logging.StreamHandler[Any], fmt: str) -> None:
        self._handler = handler
        self._json = fmt == "json"
        self._second = -1
        self._stamp = ""
        self._pending: list[AccessEntry] = []
        self._lock = threading.Lock()  # `flush` may come from another thread's log line

    def write(
        self, method: str, path: str, route: str, status: int, elapsed: float, client: str, request_id: str
    ) -> None:
        # Only kept here; formatted together at the flush, where one loop over many lines is cheaper
        # than a line formatted in each request.
        entry = (time.time(), method, path, route, status, elapsed, client, request_id)
        with self._lock:
            first = not self._pending
            self._pending.append(entry)
            full = len(self._pending) >= ACCESS_BUFFER_LINES
        if full:
            self.flush()
        elif first:
            asyncio.get_running_loop().call_later(ACCESS_FLUSH_S, self.flush)

    def _line(self, entry: AccessEntry) -> str:
        now, method, path, route, status, elapsed, client, request_id = entry
        second = int(now)
        if second != self._second:  # the formatter's `formatTime`, worked out once a second
            self._second, self._stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        stamp = f"{self._stamp},{int((now - second) * 1000):03d}"
        duration_ms = round(elapsed * 1000, 2)
        if self._json:
            return json.dumps(
                {
                    "time": stamp,
                    "level": "INFO",
                    "logger": access_logger.name,
                    "message": "access",
                    "request_id": request_id,
                    "method": method,
                    "path": path,
                    "route": route,
                    "status": status,
                    "duration_ms": duration_ms,
                    "client": client,
                }
            )
        return (
            f"{stamp} INFO {access_logger.name} access method={method} path={_logfmt(path)} "
            f"route={_logfmt(route)} status={status} duration_ms={duration_ms} client={_logfmt(client)} "
            f"request_id={request_id}"
        )

    def flush(self) -> None:
        if not self._pending:
            return
        # The handler's own lock, held from taking the lines to writing them: never inside another
        # thread's line, and two flushes write in the order they took their lines.
        self._handler.acquire()
        try:
            with self._lock:
                entries, self._pending = self._pending, []
            stream = self._handler.stream
            stream.write("".join(self._line(entry) + "\n" for entry in entries))
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: as logging does, never fail a request
            pass
        finally:
            self._handler.release()


_access_writer: AccessLineWriter | None = None


def access_log(
    method: str, path: str, route: str, status: int, elapsed: float, client: str, request_id: str
) -> None:
    """One access line. Straight to the stream once `configure_logging` set it up (how the server runs);
    otherwise through `logging` (embedding apps, tests), with the same fields."""
    if _access_writer is not None:
        _access_writer.write(method, path, route, status, elapsed, client, request_id)
        return
    fields = {
        "method": method,
        "path": path,
        "route": route,
        "status": status,
        "duration_ms": round(elapsed * 1000, 2),
        "client": client,
    }
    access_logger.info("access", extra={"fields": fields})


def configure_logging(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    global _access_writer
    handler: logging.StreamHandler[Any] = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs each request at INFO: in the Supabase REST mode that is every data operation.
    logging.getLogger("httpx").setLevel(max(root.level, logging.WARNING))
    if _access_writer is not None:
        _access_writer.flush()
    _access_writer = AccessLineWriter(handler, fmt)


@atexit.register
def _flush_access_lines() -> None:
    if _access_writer is not None:
        _access_writer.flush()
