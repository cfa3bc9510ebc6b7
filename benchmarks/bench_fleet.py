"""Part 5: a fleet of server processes sharing one provider account.

1, 2 and 4 `collection-api serve` processes on the bench's database (DATABASE_URL, as replicas on one
Supabase database are run), the Oxylabs provider pointed at the test suite's fake Oxylabs
(apps/api/tests/oxylabs_fake.py, on loopback in this process) acting as an account that allows LIMIT
jobs a second (RENDERED of them rendered) over any trailing second and answers 429 past it, each call
taking LATENCY_S. Every process has PROVIDER_RATE_PER_S = LIMIT. Three organisations: one with three
runs, two with one (PRODUCTS products per category, one category per run).

What the fake saw gives every figure: the accepted rate (from the first second to the second before
the last call) over the limit, the share of calls refused with 429, the busiest second, and each
organisation's share of the calls while all three had work (from the last one's first item to the
first one's last call).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import Any

import asyncpg
import httpx
from common import REPO, TMP, Proc, api_server, load_average, log, table
from fixtures import identity

# The fake Oxylabs lives with the tests (as the REST bridge does, see rest_bridge.py).
sys.path.insert(0, str(REPO / "apps" / "api" / "tests"))
from oxylabs_fake import (  # noqa: E402
    PASSWORD,
    USERNAME,
    Call,
    FakeOxylabs,
    accepted_rate,
    busiest_second,
    contention,
    serve_fake_oxylabs,
)

LIMIT = int(os.environ.get("BENCH_FLEET_LIMIT", "50"))
RENDERED = int(os.environ.get("BENCH_FLEET_RENDERED", "13"))
PRODUCTS = int(os.environ.get("BENCH_FLEET_PRODUCTS", "60"))
PROCESSES = tuple(int(n) for n in os.environ.get("BENCH_FLEET_PROCESSES", "1,2,4").split(","))
LATENCY_S = (0.2, 0.4)
ORGS = {"a": 3, "b": 1, "c": 1}  # organisation -> runs (one category each)
RUN_TIMEOUT_S = 180.0


def start_servers(ctx: Any, fake: FakeOxylabs, count: int) -> list[Proc]:
    servers = [
        api_server(
            ctx.pg,
            f"fleet-{count}-{n + 1}",
            DATABASE_URL=ctx.pg.dsn,
            SUPABASE_JWT_SECRET=ctx.secret,
            SUPABASE_JWT_ISSUER="collection-api-local",
            WORKER_ID=f"fleet-{count}-{n + 1}",
            OXYLABS_USERNAME=USERNAME,
            OXYLABS_PASSWORD=PASSWORD,
            OXYLABS_BASE_URL=fake.base_url,
            OXYLABS_TIMEOUT_S="10",
            PROVIDER_RATE_PER_S=str(LIMIT),
            PROVIDER_RENDERED_RATE_PER_S=str(RENDERED),
        ).start()
        for n in range(count)
    ]
    for server in servers:
        server.wait_ready()
    return servers


def stop_servers(servers: list[Proc]) -> None:
    """Ctrl-C to all at once, then wait for each (SIGKILL after 20 s)."""
    for server in servers:
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGINT)
    for server in servers:
        if server.process is None:
            continue
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


async def one_fleet(ctx: Any, fake: FakeOxylabs, count: int) -> dict[str, Any]:
    conn = await asyncpg.connect(ctx.pg.dsn)
    # A fresh account: no booked slots, throttles or executors left from the previous point.
    await conn.execute("delete from public.collection_rate_limits")
    await conn.execute("delete from public.collection_executors")
    fake.reset()
    fake.configure(
        jobs_per_s=LIMIT, rendered_jobs_per_s=RENDERED, latency_s=LATENCY_S, products_per_category=PRODUCTS
    )
    servers = start_servers(ctx, fake, count)
    try:
        categories: dict[str, str] = {}  # category -> org
        runs: list[tuple[int, uuid.UUID, dict[str, str]]] = []
        async with httpx.AsyncClient(base_url=servers[0].url, timeout=30) as client:
            for org, how_many in ORGS.items():
                email = f"bench-fleet-{count}-{org}@local.test"
                who = await identity(conn, f"bench-fleet-{count}-{org}", email)
                headers = {"Authorization": f"Bearer {ctx.sign(who.user_id, email)}"}
                for n in range(how_many):
                    category = f"fleet-{count}-{org}-{n + 1}"
                    created = await client.post(
                        "/collection/runs",
                        json={"name": category, "category_ids": [category]},
                        headers=headers,
                    )
                    assert created.status_code == 201, created.text
                    categories[category] = org
                    runs.append((n, uuid.UUID(created.json()["id"]), headers))
            runs.sort(key=lambda r: r[0])  # each org's first run leading
            started = time.perf_counter()
            answers = await asyncio.gather(
                *(
                    client.post(f"/collection/runs/{run_id}/start", headers=headers)
                    for _, run_id, headers in runs
                )
            )
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        run_ids = [run_id for _, run_id, _ in runs]
        while not await conn.fetchval(
            "select bool_and(status in ('completed', 'failed', 'cancelled', 'paused'))"
            " from public.collection_runs where id = any($1::uuid[])",
            run_ids,
        ):
            if time.perf_counter() - started > RUN_TIMEOUT_S:
                raise RuntimeError(f"the fleet of {count} did not finish its runs in {RUN_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.1)
        wall = time.perf_counter() - started
        statuses = Counter(
            await conn.fetchval(
                "select array_agg(status) from public.collection_runs where id = any($1::uuid[])", run_ids
            )
        )
        items = await conn.fetchval(
            "select count(*) from public.collection_run_items"
            " where run_id = any($1::uuid[]) and status = 'done'",
            run_ids,
        )
        throttles = await conn.fetchval(
            "select coalesce(sum(throttles), 0) from public.collection_rate_limits"
            " where name like 'provider%'"
        )
    finally:
        stop_servers(servers)
        await conn.close()

    calls = fake.calls

    def org_of(call: Call) -> str | None:
        category = fake.category_of(call)
        return None if category is None else categories.get(category)

    # Every call the fake saw, for a closer look (seconds from the first, source, query, outcome, org).
    (TMP / f"fleet-{count}-calls.tsv").write_text(
        "".join(f"{c.at - calls[0].at:.4f}\t{c.source}\t{c.query}\t{c.outcome}\t{org_of(c)}\n" for c in calls)
    )

    refused = sum(not call.accepted for call in calls)
    start, end = calls[0].at + 1.0, calls[-1].at - 1.0
    rate = accepted_rate(calls, start, end)
    shared = contention(calls, org_of, lambda call: call.source == "amazon_product")
    pages = Counter(c.query for c in calls if c.accepted and c.source == "amazon_product")
    result = {
        "processes": count,
        "limit_per_s": LIMIT,
        "calls": len(calls),
        "refused": refused,
        "refused_share": round(refused / len(calls), 4),
        "busiest_second": busiest_second(calls),
        "accepted_per_s": round(rate, 2),
        "rate_over_limit": round(rate / LIMIT, 3),
        "measured_s": round(end - start, 1),
        "all_busy_s": round(shared.end - shared.start, 1),
        "org_calls_all_busy": shared.calls,
        "org_shares_all_busy": {org: round(share, 3) for org, share in shared.shares().items()},
        "fairness": round(shared.fairness, 3),
        "items_done": items,
        "products_fetched_twice": sum(1 for n in pages.values() if n > 1),
        "throttles": throttles,
        "runs": dict(statuses),
        "wall_s": round(wall, 1),
    }
    log(
        f"  {count} process(es): {rate:.1f} of {LIMIT} calls/s ({rate / LIMIT:.0%}), "
        f"{refused}/{len(calls)} refused ({refused / len(calls):.1%}), busiest second "
        f"{result['busiest_second']}, shares while all had work "
        f"{' / '.join(f'{s:.0%}' for s in result['org_shares_all_busy'].values())} "
        f"(fairness {shared.fairness:.2f}), {items} items in {wall:.1f} s"
    )
    return result


async def run(ctx: Any) -> dict[str, Any]:
    log(
        f"part 5: a fleet sharing one account ({LIMIT} jobs/s, {RENDERED} rendered, "
        f"{LATENCY_S[0] * 1000:.0f}-{LATENCY_S[1] * 1000:.0f} ms a call): "
        f"{', '.join(map(str, PROCESSES))} processes"
    )
    with serve_fake_oxylabs() as fake:
        rows = [await one_fleet(ctx, fake, count) for count in PROCESSES]
    return {
        "limit_per_s": LIMIT,
        "rendered_per_s": RENDERED,
        "products_per_category": PRODUCTS,
        "latency_s": list(LATENCY_S),
        "orgs": {f"org {org}": runs for org, runs in ORGS.items()},
        "rows": rows,
        "load_average": load_average(),
    }


def tables(result: dict[str, Any]) -> str:
    rows = [
        [
            r["processes"],
            f"{r['accepted_per_s']:.1f} / {r['limit_per_s']}",
            f"{r['rate_over_limit']:.0%}",
            f"{r['refused_share']:.1%} ({r['refused']}/{r['calls']})",
            r["busiest_second"],
            " / ".join(f"{share:.0%}" for share in r["org_shares_all_busy"].values()),
            r["fairness"],
            r["all_busy_s"],
            r["items_done"],
            r["products_fetched_twice"],
            r["wall_s"],
        ]
        for r in result["rows"]
    ]
    orgs = ", ".join(f"{org}: {runs} run(s)" for org, runs in result["orgs"].items())
    return table(
        [
            "processes",
            "accepted/s / limit",
            "of the limit",
            "429 share",
            "busiest second",
            "org a / b / c while all had work",
            "least / most",
            "all busy s",
            "items",
            "fetched twice",
            "wall s",
        ],
        rows,
        f"Part 5: a fleet on one account ({result['limit_per_s']} jobs/s over any second, "
        f"{result['rendered_per_s']} rendered; {orgs}; {result['products_per_category']} products a run; "
        f"{result['latency_s'][0] * 1000:.0f}-{result['latency_s'][1] * 1000:.0f} ms a call)",
    )
