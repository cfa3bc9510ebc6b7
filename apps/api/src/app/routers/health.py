"""Probes for orchestrators: liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

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
