"""The framework limit: a bare FastAPI app on the same server stack as `collection-api serve`
(uvicorn, same loop and HTTP settings, one worker) making the same SQL function calls as each
endpoint, through a pool created by the app's own `create_pool` (same size, codecs, statement cache,
connection reset), with no auth, no middleware, no models and no logic.

The calls are the app's own operations (`app.operations`: each one's statement and its arguments bound
by name, in the function's order), run straight on the pool: no Store, no transport, no row models.

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
from app import operations as ops  # noqa: E402
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


def args(op: ops.Operation[Any], **given: Any) -> list[Any]:
    """The call's arguments in the function's order (the app's own binding, by name)."""
    return list(op.bind(None, given).values())


@app.get("/collection/runs/{run_id}")
async def get_run(run_id: UUID, request: Request) -> Response:
    op = ops.GET_RUN
    row = await request.app.state.pool.fetchrow(op.sql, *args(op, org_id=ORG_ID, run_id=run_id))
    if row is None:
        return json_response({"detail": "not found"}, 404)
    return json_response(dict(row))


@app.get("/collection/runs")
async def list_runs(request: Request, limit: int = 20, offset: int = 0) -> Response:
    op = ops.LIST_RUNS
    page = await request.app.state.pool.fetchval(
        op.sql,
        *args(
            op, org_id=ORG_ID, limit=limit, offset=offset, status=None, after_created_at=None, after_id=None
        ),
    )
    return json_response(page)


@app.post("/collection/estimate")
async def estimate(body: Categories, request: Request) -> Response:
    op = ops.ESTIMATE_INPUTS
    inputs = await request.app.state.pool.fetchval(
        op.sql, *args(op, org_id=ORG_ID, category_ids=body.category_ids)
    )
    return json_response(inputs)


@app.post("/collection/runs")
async def create_run(body: NewRun, request: Request) -> Response:
    # The same two calls as the API's create (estimate inputs, then the guarded insert).
    pool = request.app.state.pool
    estimate = ops.ESTIMATE_INPUTS
    await pool.fetchval(estimate.sql, *args(estimate, org_id=ORG_ID, category_ids=body.category_ids))
    create = ops.CREATE_RUN
    row = await pool.fetchrow(
        create.sql,
        *args(
            create,
            org_id=ORG_ID,
            created_by=USER_ID,
            name=body.name,
            category_ids=body.category_ids,
            estimated_cost_cents=500 * len(body.category_ids),
            total_items=50 * len(body.category_ids),
            provider="sandbox",
        ),
    )
    return json_response(dict(row), 201)


@app.post("/collection/runs/{run_id}/cancel")
async def cancel_run(run_id: UUID, request: Request) -> Response:
    op = ops.TRANSITION_RUN
    row = await request.app.state.pool.fetchrow(
        op.sql, *args(op, org_id=ORG_ID, run_id=run_id, action="cancel", actor=USER_ID, reason=None)
    )
    return json_response({"ok": True, "status": row["status"]})


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


if __name__ == "__main__":
    # The settings `collection-api serve` gives uvicorn (apps/api/src/app/cli.py).
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(os.environ["PORT"]),
        log_level="info",
        log_config=None,
        access_log=False,
        proxy_headers=True,
    )
