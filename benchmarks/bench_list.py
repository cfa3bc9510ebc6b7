"""Part 2: GET /collection/runs with 1,000,000 runs in the table (100,000 in the caller's org): p50/p99
of the first page, of the page at a deep offset (BENCH_DEEP_OFFSET, 90,000), of the first page
filtered by status, and of the page at the same depth through `cursor` (keyset), through the real
server (wrk, c=1), with the SQL function's own time beside each (`collection_list_runs`, the app's own
operation `LIST_RUNS`, no HTTP).
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import quote

import asyncpg
from common import DURATION, load_average, log, table, wrk  # noqa: I001  (common puts apps/api/src on sys.path)

from app import operations as ops
from app.database import init_connection
from app.services.collection import encode_cursor

DEEP_OFFSET = int(os.environ.get("BENCH_DEEP_OFFSET", "90000"))
PAGE = 20


def pages(after: tuple[datetime, uuid.UUID]) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, the API's query string, the arguments of LIST_RUNS the API passes for it)."""
    first = {"limit": PAGE, "offset": 0, "status": None, "after_created_at": None, "after_id": None}
    return [
        ("first page", f"limit={PAGE}", first),
        (f"offset {DEEP_OFFSET:,}", f"limit={PAGE}&offset={DEEP_OFFSET}", {**first, "offset": DEEP_OFFSET}),
        ("status=failed, first page", f"limit={PAGE}&status=failed", {**first, "status": "failed"}),
        (
            f"cursor at {DEEP_OFFSET:,}",
            f"limit={PAGE}&cursor={quote(encode_cursor(*after))}",
            {**first, "after_created_at": after[0], "after_id": after[1]},
        ),
    ]


async def sql_time(conn: asyncpg.Connection, org: uuid.UUID, args: dict[str, Any]) -> float:
    """The database's own time for one page: p50 of 15 calls (after 3 to warm), ms, no HTTP. The
    connection has no codecs, so the page comes back as text and is not decoded here."""
    op = ops.LIST_RUNS
    bound = op.bind(None, {"org_id": org, **args}).values()
    samples = []
    for i in range(18):
        started = time.perf_counter()
        await conn.fetchval(op.sql, *bound)
        if i >= 3:
            samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return round(samples[len(samples) // 2], 3)


async def deep_keyset(dsn: str, org: uuid.UUID) -> tuple[datetime, uuid.UUID]:
    """The run just before the deep offset's page, as the API reads it: a cursor naming it starts the
    same page."""
    op = ops.LIST_RUNS
    args = {"org_id": org, "limit": 1, "offset": DEEP_OFFSET - 1, "status": None}
    conn = await asyncpg.connect(dsn)
    try:
        await init_connection(conn)  # the app's codecs: the page's JSON decoded as the pool does
        value = await conn.fetchval(
            op.sql, *op.bind(None, {**args, "after_created_at": None, "after_id": None}).values()
        )
    finally:
        await conn.close()
    run = op.read(value).runs[0]
    return run.created_at, run.id


async def run(ctx: Any) -> dict[str, Any]:
    ctx.api.ensure_running()
    org = ctx.big.org_id
    after = await deep_keyset(ctx.pg.dsn, org)
    conn = await asyncpg.connect(ctx.pg.dsn)
    try:
        db_ms = {label: await sql_time(conn, org, args) for label, _, args in pages(after)}
    finally:
        await conn.close()
    rows = []
    for label, query, _ in pages(after):
        result = wrk(ctx.api.url, "list_runs.lua", 1, DURATION, BENCH_TOKEN=ctx.big_token, BENCH_QUERY=query)
        rows.append(
            {
                "query": label,
                "url": f"/collection/runs?{query}",
                "http": result.as_dict(),
                "db_p50_ms": db_ms[label],
            }
        )
        log(
            f"  {label:28s} p50 {result.p50_ms:7.2f} ms p99 {result.p99_ms:7.2f} ms "
            f"({result.rps:6.0f}/s, non-2xx {result.non_2xx}) SQL {db_ms[label]:.2f} ms"
        )
    return {"rows": rows, "check": await check_pages(ctx, after), "load_average": load_average()}


async def check_pages(ctx: Any, after: tuple[datetime, uuid.UUID]) -> dict[str, Any]:
    """The cursor page equals the offset page; the total is flagged as an estimate."""
    import httpx

    headers = {"Authorization": f"Bearer {ctx.big_token}"}
    async with httpx.AsyncClient(base_url=ctx.api.url, headers=headers, timeout=30) as client:
        by_offset = (
            await client.get("/collection/runs", params={"limit": PAGE, "offset": DEEP_OFFSET})
        ).json()
        by_cursor = (
            await client.get("/collection/runs", params={"limit": PAGE, "cursor": encode_cursor(*after)})
        ).json()
    return {
        "cursor_page_equals_offset_page": [r["id"] for r in by_cursor["runs"]]
        == [r["id"] for r in by_offset["runs"]],
        "total": by_offset["total"],
        "total_estimated": by_offset.get("total_estimated"),
        "actual_rows_in_org": ctx.big_rows,
    }


def tables(result: dict[str, Any]) -> str:
    body = [
        [r["query"], r["http"]["p50_ms"], r["http"]["p99_ms"], r["http"]["rps"], r["db_p50_ms"]]
        for r in result["rows"]
    ]
    title = (
        f"Part 2: GET /runs, {result['table_rows']:,} runs ({result['org_rows']:,} in the org), c=1, "
        "and collection_list_runs on its own"
    )
    headers = ["page", "p50 ms", "p99 ms", "req/s", "SQL p50 ms"]
    check = result.get("check", {})
    note = (
        f"\ntotal returned: {check.get('total'):,} (estimated: {check.get('total_estimated')}; actual "
        f"{check.get('actual_rows_in_org'):,}); cursor page = offset page: "
        f"{check.get('cursor_page_equals_offset_page')}"
        if check
        else ""
    )
    return table(headers, body, title) + note
