"""Part 2: GET /collection/runs with 1,000,000 runs in the table (100,000 in the caller's org):
p50/p99 of the first page and of deep pages, before and after migrations 20261125000500 and 000600
(estimated total above 10,000, deep offsets walked in the index, keyset `cursor`), through the real
server (wrk, c=1), and the SQL function's own time in the database beside each.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any
from urllib.parse import quote

import asyncpg
from common import DURATION, load_average, log, table, wrk

DEEP_OFFSET = int(os.environ.get("BENCH_DEEP_OFFSET", "90000"))
PAGE = 20
FIX_MIGRATIONS = ("20261125000500", "20261125000600")  # the "before" schema stops short of these


def queries(cursor: str | None) -> list[tuple[str, str]]:
    found = [
        ("first page", f"limit={PAGE}"),
        (f"offset {DEEP_OFFSET:,}", f"limit={PAGE}&offset={DEEP_OFFSET}"),
        ("status=failed, first page", f"limit={PAGE}&status=failed"),
    ]
    if cursor is not None:
        found.append((f"cursor at {DEEP_OFFSET:,}", f"limit={PAGE}&cursor={quote(cursor)}"))
    return found


async def sql_times(dsn: str, org: uuid.UUID, after: tuple[Any, uuid.UUID] | None) -> dict[str, float]:
    """The database's own time for each page (p50 of 15 calls), no HTTP."""
    conn = await asyncpg.connect(dsn)
    calls: dict[str, tuple[str, tuple[Any, ...]]] = {
        "first page": ("select public.collection_list_runs($1, $2, 0, null)", (org, PAGE)),
        f"offset {DEEP_OFFSET:,}": (
            "select public.collection_list_runs($1, $2, $3, null)",
            (org, PAGE, DEEP_OFFSET),
        ),
        "status=failed, first page": ("select public.collection_list_runs($1, $2, 0, 'failed')", (org, PAGE)),
    }
    if after is not None:
        calls[f"cursor at {DEEP_OFFSET:,}"] = (
            "select public.collection_list_runs_after($1, $2, $3, $4, null)",
            (org, PAGE, after[0], after[1]),
        )
    times = {}
    try:
        for label, (sql, args) in calls.items():
            samples = []
            for i in range(18):
                started = time.perf_counter()
                await conn.fetchval(sql, *args)
                if i >= 3:
                    samples.append((time.perf_counter() - started) * 1000)
            samples.sort()
            times[label] = round(samples[len(samples) // 2], 3)
    finally:
        await conn.close()
    return times


async def deep_keyset(dsn: str, org: uuid.UUID) -> tuple[Any, uuid.UUID]:
    """The run just before the deep offset's page: a cursor naming it starts the same page."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "select created_at, id from public.collection_runs where org_id = $1 "
            "order by created_at desc, id desc offset $2 limit 1",
            org,
            DEEP_OFFSET - 1,
        )
    finally:
        await conn.close()
    assert row is not None
    return row["created_at"], row["id"]


async def run_phase(ctx: Any, phase: str) -> dict[str, Any]:
    from app.services.collection import encode_cursor

    ctx.api.ensure_running()
    after = await deep_keyset(ctx.pg.dsn, ctx.big.org_id) if phase == "after" else None
    cursor = encode_cursor(*after) if after else None
    db_ms = await sql_times(ctx.pg.dsn, ctx.big.org_id, after)
    rows = []
    for label, query in queries(cursor):
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
            f"  {phase:6s} {label:28s} p50 {result.p50_ms:7.2f} ms p99 {result.p99_ms:7.2f} ms ({result.rps:6.0f}/s) db {db_ms[label]:.2f} ms"
        )
    return {"phase": phase, "rows": rows, "load_average": load_average()}


async def check_pages(ctx: Any) -> dict[str, Any]:
    """The cursor page equals the offset page; the total is flagged as an estimate."""
    import httpx

    from app.services.collection import encode_cursor

    after = await deep_keyset(ctx.pg.dsn, ctx.big.org_id)
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
    before = {r["query"]: r for r in result["before"]["rows"]} if result.get("before") else {}
    after = {r["query"]: r for r in result["after"]["rows"]}
    body = []
    for label, a in after.items():
        b = before.get(label)
        body.append(
            [
                label,
                b["http"]["p50_ms"] if b else None,
                b["http"]["p99_ms"] if b else None,
                b["db_p50_ms"] if b else None,
                a["http"]["p50_ms"],
                a["http"]["p99_ms"],
                a["db_p50_ms"],
            ]
        )
    title = (
        f"Part 2: GET /runs, {result['table_rows']:,} runs ({result['org_rows']:,} in the org), c=1 — "
        f"before / after {' + '.join(FIX_MIGRATIONS)}"
    )
    headers = ["page", "before p50 ms", "p99 ms", "SQL ms", "after p50 ms", "p99 ms", "SQL ms"]
    check = result.get("check", {})
    note = (
        f"\ntotal returned after: {check.get('total'):,} (estimated: {check.get('total_estimated')}; actual "
        f"{check.get('actual_rows_in_org'):,}); cursor page = offset page: {check.get('cursor_page_equals_offset_page')}"
        if check
        else ""
    )
    return table(headers, body, title) + note
