"""Part 4: the executor and start-up.

- Items per second for one run through the sandbox provider: with SANDBOX_LATENCY_MS=0 (what the
  executor and its per-item checkpoint cost; provider rate limit off) and with 100 ms a call (bound by
  the items in flight: ITEMS_IN_FLIGHT_PER_RUN, default 4, and PROVIDER_RATE_PER_S, default 50).
  The rate is taken between the first and the last item recorded (items.updated_at), so the
  executor's claim tick does not count; the run's own start-to-end time is given beside it.
- Start-up: process start -> /healthz 200 and -> the recovery log line, with 0 and with 10,000
  interrupted runs (running and paused) in the table.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import httpx
from common import api_server, load_average, log, table
from fixtures import Identity, identity, interrupted_runs

INTERRUPTED = 10_000


async def one_run(ctx: Any, label: str, categories: int, **env: str) -> dict[str, Any]:
    server = api_server(ctx.pg, f"executor-{label}", **env).start()
    try:
        server.wait_ready()
        conn = await asyncpg.connect(ctx.pg.dsn)
        org: Identity = await identity(conn, f"bench-exec-{label}", f"bench-exec-{label}@local.test")
        token = ctx.sign(org.user_id, f"bench-exec-{label}@local.test")
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as client:
            cats = [f"bench-{label}-{i}" for i in range(categories)]
            created = await client.post("/collection/runs", json={"name": label, "category_ids": cats})
            assert created.status_code == 201, created.text
            run_id = created.json()["id"]
            started = time.perf_counter()
            assert (await client.post(f"/collection/runs/{run_id}/start")).status_code == 200
            await conn.execute("select pg_stat_statements_reset()")
            while True:
                run = (await client.get(f"/collection/runs/{run_id}")).json()
                if run["status"] in ("completed", "failed", "cancelled", "paused"):
                    break
                if time.perf_counter() - started > 300:
                    raise RuntimeError(f"run {run_id} did not finish: {run}")
                await asyncio.sleep(0.05)
            wall = time.perf_counter() - started
        items = await conn.fetchrow(
            "select count(*) as n, count(*) filter (where status = 'failed') as failed, "
            "extract(epoch from max(updated_at) - min(updated_at)) as span_s "
            "from public.collection_run_items where run_id = $1",
            uuid.UUID(run["id"]),
        )
        calls = await conn.fetch(
            "select query, calls from pg_stat_statements where query ~ 'collection_(reserve|record_item|"
            "record_discovery|pending_items|release_reservation|heartbeat|claim_runs|finish_run|"
            "run_categories_of)'"
        )
        await conn.close()
        per_item = {}
        for row in calls:
            name = row["query"].split("public.", 1)[1].split("(", 1)[0]
            per_item[name] = round(row["calls"] / max(1, items["n"]), 3)
        span = float(items["span_s"] or 0)
        result = {
            "label": label,
            "env": env,
            "status": run["status"],
            "items": items["n"],
            "failed_items": items["failed"],
            "items_per_s": round((items["n"] - 1) / span, 1) if span > 0 else None,
            "run_wall_s": round(wall, 2),
            "items_per_s_wall": round(items["n"] / wall, 1),
            "sql_calls_per_item": per_item,
        }
        log(
            f"  {label:18s} {items['n']} items {result['items_per_s']} items/s "
            f"(start to end {wall:.1f} s: {result['items_per_s_wall']}/s) status {run['status']}"
        )
        return result
    finally:
        server.stop()


def recovery_line_seen(path: Any) -> bool:
    try:
        return "start-up recovery:" in path.read_text(errors="replace")
    except OSError:
        return False


def stamp(line: str) -> float:
    day, clock = line.split(" ")[:2]
    hms, ms = clock.split(",")
    h, m, sec = (int(x) for x in hms.split(":"))
    return h * 3600 + m * 60 + sec + int(ms) / 1000


async def start_once(ctx: Any, label: str) -> dict[str, Any]:
    server = api_server(ctx.pg, f"startup-{label.replace(' ', '-').replace(',', '')}").start()
    healthz = recovery = None
    try:
        deadline = time.perf_counter() + 120
        async with httpx.AsyncClient(timeout=1) as client:
            while (healthz is None or recovery is None) and time.perf_counter() < deadline:
                if recovery is None and recovery_line_seen(server.log_path):
                    recovery = time.perf_counter() - server.started_at
                if healthz is None:
                    try:
                        if (await client.get(server.url + "/healthz")).status_code == 200:
                            healthz = time.perf_counter() - server.started_at
                    except httpx.HTTPError:
                        pass
                await asyncio.sleep(0.01)
        lines = server.log_path.read_text(errors="replace").splitlines()
    finally:
        server.stop()
    waiting = next((ln for ln in lines if "Waiting for application startup" in ln), "")
    found = next((ln for ln in lines if "start-up recovery:" in ln), "")
    complete = next((ln for ln in lines if "Application startup complete" in ln), "")
    return {
        "healthz_s": healthz,
        "recovery_log_s": recovery,
        "lifespan_to_recovery_ms": round((stamp(found) - stamp(waiting)) * 1000)
        if waiting and found
        else None,
        "lifespan_ms": round((stamp(complete) - stamp(waiting)) * 1000) if waiting and complete else None,
        "recovery_line": found.split(" INFO ", 1)[-1].replace(" request_id=-", "")[:120],
    }


async def startup(ctx: Any, label: str, times: int = 3) -> dict[str, Any]:
    """The median of `times` starts."""
    starts = [await start_once(ctx, label) for _ in range(times)]

    def median(key: str) -> Any:
        values = sorted(s[key] for s in starts if s[key] is not None)
        return values[len(values) // 2] if values else None

    result = {
        "label": label,
        "starts": times,
        "healthz_s": round(median("healthz_s"), 3) if median("healthz_s") else None,
        "recovery_log_s": round(median("recovery_log_s"), 3) if median("recovery_log_s") else None,
        "lifespan_to_recovery_ms": median("lifespan_to_recovery_ms"),
        "lifespan_ms": median("lifespan_ms"),
        "recovery_line": starts[-1]["recovery_line"],
    }
    log(
        f"  start-up, {label:24s} /healthz {result['healthz_s']} s, "
        f"recovery line {result['recovery_log_s']} s (lifespan start -> recovery logged "
        f"{result['lifespan_to_recovery_ms']} ms; lifespan {result['lifespan_ms']} ms)"
    )
    return result


async def run(ctx: Any) -> dict[str, Any]:
    log("part 4: executor items/s and start-up time")
    runs = [
        await one_run(ctx, "latency-0ms", 20, SANDBOX_LATENCY_MS="0", PROVIDER_RATE_PER_S="0"),
        await one_run(ctx, "latency-100ms", 4, SANDBOX_LATENCY_MS="100"),
        await one_run(
            ctx,
            "latency-100ms-x16",
            8,
            SANDBOX_LATENCY_MS="100",
            ITEMS_IN_FLIGHT_PER_RUN="16",
            PROVIDER_RATE_PER_S="0",
        ),
    ]
    starts = [await startup(ctx, "no interrupted runs")]
    conn = await asyncpg.connect(ctx.pg.dsn)
    org = await identity(conn, "bench-interrupted", "bench-interrupted@local.test")
    await interrupted_runs(conn, org, INTERRUPTED)
    await conn.close()
    starts.append(await startup(ctx, f"{INTERRUPTED:,} interrupted runs"))
    return {"runs": runs, "startup": starts, "load_average": load_average()}


def tables(result: dict[str, Any]) -> str:
    run_rows = [
        [
            r["label"],
            ", ".join(f"{k}={v}" for k, v in r["env"].items()),
            r["items"],
            r["items_per_s"],
            r["run_wall_s"],
            ", ".join(f"{k} {v:g}" for k, v in r["sql_calls_per_item"].items()),
        ]
        for r in result["runs"]
    ]
    start_rows = [
        [
            s["label"],
            s["healthz_s"],
            s["recovery_log_s"],
            s["lifespan_to_recovery_ms"],
            s["lifespan_ms"],
            s["recovery_line"],
        ]
        for s in result["startup"]
    ]
    return "\n".join(
        [
            table(
                ["run", "settings", "items", "items/s", "start→end s", "SQL calls per item"],
                run_rows,
                "Part 4: executor, one run (ITEMS_IN_FLIGHT_PER_RUN 4 unless set)",
            ),
            table(
                [
                    "start-up",
                    "→ /healthz 200 s",
                    "→ recovery log s",
                    "lifespan → recovery ms",
                    "lifespan ms",
                    "recovery line",
                ],
                start_rows,
                "Part 4: server start-up, median of 3 (Postgres already running; "
                "process start = before Python imports)",
            ),
        ]
    )
