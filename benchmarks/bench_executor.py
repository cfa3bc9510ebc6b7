"""Part 4: the executor and start-up.

- Items per second for one run through the sandbox provider, against the provider's bound: with
  SANDBOX_LATENCY_MS=0 (what the executor and its per-item checkpoint cost; no account limit), with
  100 ms a call under the default account limit (PROVIDER_RATE_PER_S 50: 25 items a second, an item
  being two calls), and with 100 ms a call, no account limit (PROVIDER_RATE_PER_S and
  PROVIDER_RENDERED_RATE_PER_S 0) and MAX_CALLS_IN_FLIGHT 16 and 64: the bound is then the calls in
  flight over the latency, an item being two calls one after the other (in flight / (2 x 0.1 s)).
  The rate is taken between the first and the last item recorded (items.updated_at), so the
  executor's first heartbeat does not count; the run's own start-to-end time is given beside it.
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

from app.config import Settings

INTERRUPTED = 10_000


def provider_bound(env: dict[str, str]) -> float | None:
    """The items a second the provider allows: an item is two calls one after the other, so at most
    MAX_CALLS_IN_FLIGHT / (2 x latency) items a second, and PROVIDER_RATE_PER_S / 2 (defaults as
    Settings has them); None when neither bounds anything (no latency, no account limit)."""
    defaults = Settings.model_fields
    latency_s = int(env.get("SANDBOX_LATENCY_MS", defaults["sandbox_latency_ms"].default)) / 1000
    in_flight = int(env.get("MAX_CALLS_IN_FLIGHT", defaults["max_calls_in_flight"].default))
    rate = float(env.get("PROVIDER_RATE_PER_S", defaults["provider_rate_per_s"].default))
    bounds = [in_flight / (2 * latency_s)] if latency_s else []
    if rate:
        bounds.append(rate / 2)
    return min(bounds) if bounds else None


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
            "select query, calls, mean_exec_time from pg_stat_statements where query ~ "
            "'collection_(next_work|take_slot|heartbeat|record_item|record_discovery|configure_rates|"
            "throttle|give_back_work|release_work)\\('"
        )
        await conn.close()
        per_item, mean_ms = {}, {}
        for row in calls:
            name = row["query"].split("public.", 1)[1].split("(", 1)[0]
            per_item[name] = round(row["calls"] / max(1, items["n"]), 3)
            mean_ms[name] = round(row["mean_exec_time"], 2)
        span = float(items["span_s"] or 0)
        items_per_s = (items["n"] - 1) / span if span > 0 else None
        bound = provider_bound(env)
        result = {
            "label": label,
            "env": env,
            "status": run["status"],
            "items": items["n"],
            "failed_items": items["failed"],
            "items_per_s": round(items_per_s, 1) if items_per_s else None,
            "bound_items_per_s": round(bound, 1) if bound else None,
            "efficiency": round(items_per_s / bound, 3) if bound and items_per_s else None,
            "run_wall_s": round(wall, 2),
            "items_per_s_wall": round(items["n"] / wall, 1),
            "sql_calls_per_item": per_item,
            "sql_mean_ms": mean_ms,
        }
        against = f" of a bound of {bound:.0f} ({result['efficiency']:.0%})" if result["efficiency"] else ""
        log(
            f"  {label:18s} {items['n']} items {result['items_per_s']} items/s{against} "
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
    unlimited = {"PROVIDER_RATE_PER_S": "0", "PROVIDER_RENDERED_RATE_PER_S": "0"}
    runs = [
        await one_run(ctx, "latency-0ms", 20, SANDBOX_LATENCY_MS="0", **unlimited),
        await one_run(ctx, "latency-100ms", 4, SANDBOX_LATENCY_MS="100"),
        # About 5 s of work at each bound (80 and 320 items a second; a category has about 50 items).
        await one_run(
            ctx, "latency-100ms-x16", 8, SANDBOX_LATENCY_MS="100", MAX_CALLS_IN_FLIGHT="16", **unlimited
        ),
        await one_run(
            ctx, "latency-100ms-x64", 32, SANDBOX_LATENCY_MS="100", MAX_CALLS_IN_FLIGHT="64", **unlimited
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
            r.get("bound_items_per_s"),
            f"{r['efficiency']:.0%}" if r.get("efficiency") else "-",
            r["run_wall_s"],
            ", ".join(
                f"{k} {v:g}" + (f" ({r['sql_mean_ms'][k]:g} ms)" if k in r.get("sql_mean_ms", {}) else "")
                for k, v in r["sql_calls_per_item"].items()
            ),
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
                [
                    "run",
                    "settings",
                    "items",
                    "items/s",
                    "bound items/s",
                    "of the bound",
                    "start→end s",
                    "SQL calls per item (mean ms in Postgres)",
                ],
                run_rows,
                "Part 4: executor, one run through the sandbox (MAX_CALLS_IN_FLIGHT 64 and "
                "PROVIDER_RATE_PER_S 50 unless set; bound: in flight / (2 x latency) and rate / 2)",
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
