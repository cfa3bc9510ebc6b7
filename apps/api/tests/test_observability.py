"""Request ids, structured access logs without secrets, security headers, body limits, CORS and
Prometheus metrics."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace

from app import observability
from app.main import create_app
from conftest import World, create_run, make_settings


class TestRequestIds:
    async def test_each_response_carries_a_request_id_and_a_valid_one_is_kept(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        admin = await world.admin()
        first = await client.get("/collection/settings", headers=admin.headers)
        second = await client.get("/collection/settings", headers=admin.headers)
        assert first.headers["x-request-id"] != second.headers["x-request-id"]
        # Random, not a counter: ids say nothing about how many requests came between.
        assert abs(int(first.headers["x-request-id"], 16) - int(second.headers["x-request-id"], 16)) > 2**64
        kept = await client.get("/healthz", headers={"X-Request-Id": "trace-123.abc"})
        assert kept.headers["x-request-id"] == "trace-123.abc"
        replaced = await client.get("/healthz", headers={"X-Request-Id": "bad id\\n<script>"})
        assert replaced.headers["x-request-id"] != "bad id\\n<script>"
        assert len(replaced.headers["x-request-id"]) == 32


class TestAccessLog:
    async def test_access_lines_are_structured_and_never_carry_the_token(
        self, client: httpx.AsyncClient, world: World, caplog: pytest.LogCaptureFixture
    ) -> None:
        admin = await world.admin()
        caplog.set_level(logging.DEBUG)
        response = await client.get("/collection/runs?limit=5", headers=admin.headers)
        await client.get("/collection/runs", headers={"Authorization": "Bearer not.a.token"})
        access = [r for r in caplog.records if r.name == "app.access"]
        assert access, "an access line per request"
        fields = access[0].fields  # type: ignore[attr-defined]
        assert fields["route"] == "/collection/runs" and fields["status"] == 200
        assert fields["method"] == "GET" and fields["duration_ms"] >= 0
        assert response.headers["x-request-id"]
        everything = "\n".join(r.getMessage() + str(getattr(r, "fields", "")) for r in caplog.records)
        assert admin.token not in everything
        assert admin.token.split(".")[2] not in everything
        assert "not.a.token" not in everything


@pytest.fixture
def served_log() -> Iterator[io.StringIO]:
    """The logging `collection-api serve` sets up, writing into a string; put back afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, observability._access_writer
    stream = io.StringIO()
    yield stream
    root.handlers[:], level, observability._access_writer = saved
    root.setLevel(level)


LOGFMT_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def logfmt_fields(line: str) -> dict[str, str]:
    return {k: json.loads(v) if v.startswith('"') else v for k, v in LOGFMT_FIELD.findall(line)}


class TestServedAccessLines:
    async def test_one_logfmt_line_per_request_with_its_request_id_and_no_token(
        self, client: httpx.AsyncClient, world: World, served_log: io.StringIO
    ) -> None:
        observability.configure_logging("INFO", "text", served_log)
        admin = await world.admin()
        listed = await client.get("/collection/runs?limit=5", headers=admin.headers)
        # A percent-encoded line break and quote in the path: the caller's, and decoded by then.
        forged = await client.get("/collection/x%0A2026 INFO app.access forged=%22yes", headers=admin.headers)
        await asyncio.sleep(observability.ACCESS_FLUSH_S * 3)
        lines = served_log.getvalue().splitlines()
        assert len(lines) == 2, lines
        first, second = (logfmt_fields(line) for line in lines)
        assert lines[0].split()[2:4] == ["INFO", "app.access"]
        assert first["route"] == "/collection/runs" and first["status"] == "200"
        assert first["method"] == "GET" and float(first["duration_ms"]) >= 0
        assert first["request_id"] == listed.headers["x-request-id"]
        assert second["path"] == '/collection/x\n2026 INFO app.access forged="yes'
        assert second["status"] == "404" and second["request_id"] == forged.headers["x-request-id"]
        assert admin.token not in served_log.getvalue()

    async def test_json_lines_carry_the_same_fields(
        self, client: httpx.AsyncClient, world: World, served_log: io.StringIO
    ) -> None:
        observability.configure_logging("INFO", "json", served_log)
        admin = await world.admin()
        response = await client.get("/collection/settings", headers=admin.headers)
        await asyncio.sleep(observability.ACCESS_FLUSH_S * 3)
        [line] = served_log.getvalue().splitlines()
        entry = json.loads(line)
        assert entry["logger"] == "app.access" and entry["level"] == "INFO"
        assert entry["route"] == "/collection/settings" and entry["status"] == 200
        assert entry["request_id"] == response.headers["x-request-id"]

    async def test_access_lines_come_out_before_any_later_line_and_at_once_when_many(
        self,
        client: httpx.AsyncClient,
        world: World,
        served_log: io.StringIO,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        observability.configure_logging("INFO", "text", served_log)
        await client.get("/healthz")
        logging.getLogger("app.test").warning("a later line")
        lines = served_log.getvalue().splitlines()
        assert [("route=/healthz" in lines[0]), ("a later line" in lines[1])] == [True, True]

        monkeypatch.setattr(observability, "ACCESS_FLUSH_S", 3600.0)
        monkeypatch.setattr(observability, "ACCESS_BUFFER_LINES", 3)
        before = len(served_log.getvalue().splitlines())
        for _ in range(3):
            await client.get("/healthz")
        assert len(served_log.getvalue().splitlines()) == before + 3  # written without waiting

    async def test_below_info_there_are_no_access_lines(
        self, client: httpx.AsyncClient, served_log: io.StringIO
    ) -> None:
        observability.configure_logging("WARNING", "text", served_log)
        await client.get("/healthz")
        await asyncio.sleep(observability.ACCESS_FLUSH_S * 3)
        assert served_log.getvalue() == ""


class TestHeaders:
    async def test_api_responses_carry_security_headers_and_are_not_cached(
        self, client: httpx.AsyncClient
    ) -> None:
        response = await client.get("/collection/runs")
        assert response.status_code == 401
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["cache-control"] == "no-store"

    @pytest.mark.parametrize("path", ["/docs", "/admin/"])
    async def test_html_pages_also_keep_their_referrer_and_window(
        self, client: httpx.AsyncClient, path: str
    ) -> None:
        response = await client.get(path)
        assert response.status_code == 200
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["cross-origin-opener-policy"] == "same-origin"


class TestBodyLimits:
    async def test_an_oversized_body_is_413_json_and_changes_nothing(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.admin()
        body = '{"category_ids": ["' + "x" * (70 * 1024) + '"]}'
        response = await client.post(
            "/collection/runs",
            content=body,
            headers={**admin.headers, "Content-Type": "application/json"},
        )
        assert response.status_code == 413
        assert response.json()["error"] == "payload_too_large"
        assert await db.fetchval("select count(*) from collection_runs") == 0

    async def test_a_wrong_content_type_is_a_4xx(self, client: httpx.AsyncClient, world: World, db) -> None:
        admin = await world.admin()
        response = await client.post(
            "/collection/runs",
            content="category_ids=a",
            headers={**admin.headers, "Content-Type": "application/x-www-form-urlencoded"},
        )
        assert 400 <= response.status_code < 500
        assert await db.fetchval("select count(*) from collection_runs") == 0


@pytest.fixture
async def cors_client(migrated_dsn: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(
        make_settings(migrated_dsn, tmp_path, cors_origins=["https://dash.example.com"])
    )
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            yield c


class TestCors:
    async def test_only_configured_origins_are_allowed(self, cors_client: httpx.AsyncClient) -> None:
        preflight = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        }
        allowed = await cors_client.options(
            "/collection/runs", headers={"Origin": "https://dash.example.com", **preflight}
        )
        assert allowed.headers["access-control-allow-origin"] == "https://dash.example.com"
        refused = await cors_client.options(
            "/collection/runs", headers={"Origin": "https://evil.example", **preflight}
        )
        assert "access-control-allow-origin" not in refused.headers

    async def test_no_cors_headers_without_configured_origins(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/healthz", headers={"Origin": "https://dash.example.com"})
        assert "access-control-allow-origin" not in response.headers


class TestMetrics:
    async def test_metrics_count_requests_per_route_and_runs_per_status(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        admin = await world.admin()
        run = await create_run(client, admin)
        await client.post(f"/collection/runs/{run['id']}/start", headers=admin.headers)
        await create_run(client, admin)
        text = (await client.get("/metrics")).text
        assert 'collection_runs{status="running"} 1.0' in text
        assert 'collection_runs{status="pending"} 1.0' in text
        assert (
            'http_request_duration_seconds_count{method="POST",route="/collection/runs",status="201"} 2.0'
            in text
        )
        assert "collection_items_processed_total" in text and "collection_cents_charged_total" in text

    async def test_a_made_up_method_is_one_bounded_label(self, client: httpx.AsyncClient) -> None:
        for method in ("FOO", "BAR"):
            assert (await client.request(method, "/collection/runs")).status_code in (401, 405)
        text = (await client.get("/metrics")).text
        assert 'method="OTHER",route="/collection/runs"' in text
        assert 'method="FOO"' not in text and 'method="BAR"' not in text

    async def test_metrics_need_the_token_when_one_is_configured(
        self, migrated_dsn: str, tmp_path: Path
    ) -> None:
        app = create_app(make_settings(migrated_dsn, tmp_path, metrics_token="scrape-secret"))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                assert (await c.get("/metrics")).status_code == 401
                ok = await c.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
                assert ok.status_code == 200 and "http_request_duration_seconds" in ok.text


class TestChunkedBodyLimit:
    async def test_a_body_without_length_is_counted_as_it_streams(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.admin()

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"category_ids": ["'
            for _ in range(80):
                yield b"x" * 1024
            yield b'"]}'

        response = await client.post(
            "/collection/runs",
            content=chunks(),
            headers={**admin.headers, "Content-Type": "application/json"},
        )
        assert response.status_code == 413
        assert response.json()["error"] == "payload_too_large"
        assert await db.fetchval("select count(*) from collection_runs") == 0


class RecordingTracer(trace.Tracer):
    """An OpenTelemetry tracer that keeps the names of the spans started (the API alone, no SDK)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def start_span(self, name: str, *args: Any, **kwargs: Any) -> trace.Span:
        self.names.append(name)
        return trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)

    @contextmanager
    def start_as_current_span(self, name: str, *args: Any, **kwargs: Any) -> Iterator[trace.Span]:
        span = self.start_span(name)
        with trace.use_span(span, end_on_exit=True):
            yield span


class RecordingTracerProvider(trace.TracerProvider):
    def __init__(self) -> None:
        self.names: list[str] = []

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return RecordingTracer(self.names)


class TestOpenTelemetry:
    def test_fastapis_own_telemetry_is_on_only_when_the_environment_sets_opentelemetry_up(self) -> None:
        off = {"tracing": False, "metrics": False, "logs": False}
        assert observability.fastapi_telemetry({}) == off
        assert observability.fastapi_telemetry({"PATH": "/usr/bin", "OTELLO": "x"}) == off
        assert observability.fastapi_telemetry({"OTEL_SERVICE_NAME": "collection-api"}) is None
        assert observability.fastapi_telemetry({"FASTAPI_OTEL_AUTO_CONFIGURE": "true"}) is None

    async def test_a_traced_read_goes_through_fastapis_handler_and_answers_the_same(
        self, monkeypatch: pytest.MonkeyPatch, world: World, migrated_dsn: str, tmp_path: Path
    ) -> None:
        provider = RecordingTracerProvider()
        monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)  # as if an SDK had been set up
        admin = await world.admin()
        answers = []
        for traced in (False, True):
            if traced:
                monkeypatch.setenv("OTEL_SERVICE_NAME", "collection-api")
            app = create_app(make_settings(migrated_dsn, tmp_path))
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                    if not traced:
                        run = await create_run(client, admin)
                    provider.names.clear()
                    response = await client.get(f"/collection/runs/{run['id']}", headers=admin.headers)
            assert response.status_code == 200, response.text
            answers.append(response.json())
            if traced:
                # FastAPI's server span and the spans of its own handler's steps.
                assert provider.names[0] == "GET" and "fastapi.endpoint" in provider.names
            else:
                assert provider.names == []  # FastAPI's telemetry off, the direct path taken
        assert answers[0] == answers[1]
