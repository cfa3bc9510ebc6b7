"""The framework limit: a bare FastAPI app on the same server stack as `collection-api serve`
(uvicorn, same loop and HTTP settings, one worker) making the same SQL function calls as each
endpoint, through a pool created by the app's own `create_pool` (same size, codecs, statement cache,
connection reset), with no auth, no middleware, no models and no logic.

Same URL paths as the real API, so the same wrk scripts drive both. The organisation and user are
fixed (BENCH_ORG_ID, BENCH_USER_ID).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import uvicorn
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "api" / "src"))
from app.config import Settings  # noqa: E402
from app.database import create_pool  # noqa: E402

ORG_ID = UUID(os.environ["BENCH_ORG_ID"])
USER_ID = UUID(os.environ["BENCH_USER_ID"])


def settings() -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=SecretStr(os.environ["BENCH_DSN"]),
        supabase_jwt_secret=SecretStr("bare-app-verifies-no-token-" + "x" * 16),
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.pool = await create_pool(settings())
    try:
        yield
    finally:
        await app.state.pool.close()


app = FastAPI(lifespan=lifespan)


def json_response(body: Any, status_code: int = 200) -> Response:
    return Response(json.dumps(body, default=str), status_code=status_code, media_type="application/json")


class Categories(BaseModel):
    category_ids: list[str]


class NewRun(BaseModel):
    name: str = "bench"
    category_ids: list[str]


@app.get("/collection/runs/{run_id}")
async def get_run(run_id: UUID, request: Request) -> Response:
    row = await request.app.state.pool.fetchrow(
        "select * from public.collection_get_run($1, $2)", ORG_ID, run_id
    )
    if row is None:
        return json_response({"detail": "not found"}, 404)
    return json_response(dict(row))


@app.get("/collection/runs")
async def list_runs(request: Request, limit: int = 20, offset: int = 0) -> Response:
    page = await request.app.state.pool.fetchval(
        "select public.collection_list_runs($1, $2, $3, $4)", ORG_ID, limit, offset, None
    )
    return json_response(page)


@app.post("/collection/estimate")
async def estimate(body: Categories, request: Request) -> Response:
    inputs = await request.app.state.pool.fetchval(
        "select public.collection_estimate_inputs($1, $2)", ORG_ID, body.category_ids
    )
    return json_response(inputs)


@app.post("/collection/runs")
async def create_run(body: NewRun, request: Request) -> Response:
    # The same two calls as the API's create (estimate inputs, then the guarded insert).
    pool = request.app.state.pool
    await pool.fetchval("select public.collection_estimate_inputs($1, $2)", ORG_ID, body.category_ids)
    row = await pool.fetchrow(
        "select * from public.collection_create_run($1, $2, $3, $4, $5, $6, $7)",
        ORG_ID,
        USER_ID,
        body.name,
        body.category_ids,
        500 * len(body.category_ids),
        50 * len(body.category_ids),
        "sandbox",
    )
    return json_response(dict(row), 201)


@app.post("/collection/runs/{run_id}/cancel")
async def cancel_run(run_id: UUID, request: Request) -> Response:
    row = await request.app.state.pool.fetchrow(
        "select * from public.collection_transition_run($1, $2, $3, $4, $5)",
        ORG_ID,
        run_id,
        "cancel",
        USER_ID,
        None,
    )
    return json_response({"ok": True, "status": row["status"]})


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


if __name__ == "__main__":
    # The arguments `collection-api serve` passes to uvicorn.run (apps/api/src/app/cli.py).
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(os.environ["PORT"]),
        log_level="info",
        log_config=None,
        access_log=False,
        proxy_headers=True,
    )
