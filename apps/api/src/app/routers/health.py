"""Probes for orchestrators: liveness and readiness."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.config import Settings
from app.deps import Service
from app.errors import CollectionError, NotAuthenticated
from app.models import CollectionRunStatus
from app.observability import Metrics
from app.store import Store

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Database unreachable or migrations missing"}})
async def readyz(request: Request) -> JSONResponse:
    """The database answers and every migration is applied."""
    store: Store = request.app.state.store
    problem = await store.readiness()
    if problem is None:
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": False, "detail": problem}, status_code=503, headers={"Retry-After": "2"})


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, service: Service) -> Response:
    """Prometheus metrics (see the README for each one)."""
    settings: Settings = request.app.state.settings
    if settings.metrics_token is not None:
        expected = f"Bearer {settings.metrics_token.get_secret_value()}"
        if not hmac.compare_digest(request.headers.get("authorization", ""), expected):
            raise NotAuthenticated()
    elif not settings.is_local:
        return JSONResponse({"detail": "Not Found", "error": "not_found"}, status_code=404)
    registry: Metrics = request.app.state.metrics
    try:
        counts = await service.run_status_counts()
    except CollectionError:
        counts = None  # the database is down: serve the process's own metrics anyway
    if counts is not None:
        for status in CollectionRunStatus:
            registry.runs.labels(status.value).set(counts.get(status, 0))
    registry.flush()  # the request latencies not yet in the histogram
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
