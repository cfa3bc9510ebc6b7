"""`make bench`: every part in order on a private embedded Postgres, then the summary and the chart.

    python benchmarks/run.py [list] [http] [costs] [fleet] [executor]     (default: all five)

Environment: BENCH_DURATION (s per load point, default 5), BENCH_WARMUP (1), BENCH_TABLE_ROWS
(1,000,000), BENCH_ORG_ROWS (100,000), BENCH_DEEP_OFFSET (90,000), BENCH_KEEP_DATA=1 keeps
benchmarks/results/tmp/data, BENCH_BASELINE=<git ref> also measures the API as it was at that commit
(a before/after in one run, on the same database and schema). The fleet part: BENCH_FLEET_PROCESSES
(1,2,4), BENCH_FLEET_LIMIT (50 jobs/s), BENCH_FLEET_RENDERED (13), BENCH_FLEET_PRODUCTS (60 a run).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import bench_costs
import bench_executor
import bench_fleet
import bench_http
import bench_list
import report
from common import (
    API_CMD,
    BENCH,
    REPO,
    TMP,
    BenchPostgres,
    Proc,
    api_server,
    bare_server,
    clean_env,
    free_port,
    load_average,
    log,
    machine,
    write_json,
)
from fixtures import BIG_ORG_SLUG, Identity, identity, load_million, seed_runs

PARTS = ("list", "http", "costs", "fleet", "executor")
TABLE_ROWS = int(os.environ.get("BENCH_TABLE_ROWS", "1000000"))
ORG_ROWS = int(os.environ.get("BENCH_ORG_ROWS", "100000"))
BENCH_ORG_RUNS = 200


@dataclass
class Context:
    pg: BenchPostgres
    secret: str = ""
    bench: Identity | None = None
    big: Identity | None = None
    big_rows: int = 0
    run_id: uuid.UUID | None = None
    token: str = ""
    big_token: str = ""
    cursor: str = ""
    api: Proc | None = None
    bare: Proc | None = None
    baseline: Proc | None = None
    rest: Proc | None = None
    procs: list[Proc] = field(default_factory=list)

    def sign(self, user_id: uuid.UUID, email: str) -> str:
        from app.cli import sign_local_token

        return sign_local_token(self.secret, user_id, email, 24 * 3600)

    def postmaster_pid(self) -> int:
        return int((self.pg.pg.pgdata / "postmaster.pid").read_text().split()[0])

    def start(self, proc: Proc) -> Proc:
        self.procs.append(proc.start())
        proc.wait_ready()
        return proc


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port}") from None
            time.sleep(0.05)


def rest_servers(pg: BenchPostgres, secret: str) -> tuple[Proc, Proc]:
    """The loopback PostgREST bridge on the bench database, and `collection-api serve` in the REST mode
    through it (SUPABASE_URL + a service_role key, no DATABASE_URL; local tokens still verify)."""
    import jwt

    service_key = jwt.encode({"role": "service_role", "iss": "supabase"}, secret, algorithm="HS256")
    bridge_port = free_port()
    bridge = Proc(
        "rest-bridge",
        [sys.executable, str(BENCH / "rest_bridge.py")],
        clean_env(
            BENCH_DSN=pg.dsn, BENCH_JWT_SECRET=secret, BENCH_SERVICE_KEY=service_key, PORT=str(bridge_port)
        ),
        bridge_port,
    )
    port = free_port()
    rest = Proc(
        "api-rest",
        API_CMD,
        clean_env(
            SUPABASE_URL=f"http://127.0.0.1:{bridge_port}",
            SUPABASE_SERVICE_ROLE_KEY=service_key,
            SUPABASE_JWT_SECRET=secret,
            SUPABASE_JWT_ISSUER="collection-api-local",
            EXECUTOR_ENABLED="false",
            PORT=str(port),
        ),
        port,
    )
    return bridge, rest


def baseline_server(pg: BenchPostgres, ref: str) -> Proc:
    """The API as it was at git `ref` (BENCH_BASELINE=<commit>), on the same database and schema: a
    before/after of request-path work in one run. Its code must call the functions of today's schema
    as they are (079d666 calls GET /runs/{id}, GET /runs, POST /estimate, POST /runs and cancel's
    functions by position, which the baseline schema still answers)."""
    target = TMP / "baseline"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", ref, "apps/api/src"],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    proc = api_server(pg, "api-baseline")
    proc.cmd = [sys.executable, "-m", "app.cli", "serve"]
    proc.env["PYTHONPATH"] = str(target / "apps" / "api" / "src")
    # The copy has no repository around it; its readiness then finds today's baseline applied.
    proc.env["SUPABASE_DIR"] = str(REPO / "supabase")
    return proc


async def prepare(ctx: Context, big: bool) -> dict[str, Any]:
    from app import operations as ops
    from app.config import packaged
    from app.database import init_connection
    from app.migrate import apply_migrations
    from app.services.collection import encode_cursor

    info: dict[str, Any] = {}
    conn = await asyncpg.connect(ctx.pg.dsn)
    try:
        # The schema the servers apply at start-up (the package's supabase/), applied here first so
        # that the data can be loaded before any server starts.
        await apply_migrations(conn, packaged("supabase"), local_bootstrap=True, seed=True)
        await conn.execute("create extension if not exists pg_stat_statements")
        ctx.bench = await identity(conn, "bench")
        await seed_runs(conn, ctx.bench.org_id, ctx.bench.user_id, BENCH_ORG_RUNS)
        # The run GET /runs/{id} asks for and the cursor after the first page, as the API lists them.
        await init_connection(conn)
        first = {"org_id": ctx.bench.org_id, "limit": 20, "offset": 0, "status": None}
        value = await conn.fetchval(
            ops.LIST_RUNS.sql,
            *ops.LIST_RUNS.bind(None, {**first, "after_created_at": None, "after_id": None}).values(),
        )
        runs = ops.LIST_RUNS.read(value).runs
        ctx.run_id = runs[0].id
        ctx.cursor = encode_cursor(runs[-1].created_at, runs[-1].id)
        if big:
            ctx.big = await identity(conn, BIG_ORG_SLUG, "bench-big@local.test")
            log(f"loading {TABLE_ROWS:,} runs ({ORG_ROWS:,} in org {BIG_ORG_SLUG}) with SQL")
            info["load"] = await load_million(conn, ctx.big, TABLE_ROWS, ORG_ROWS)
            ctx.big_rows = ORG_ROWS
            info["table_rows"] = await conn.fetchval("select count(*) from public.collection_runs")
            load = info["load"]
            log(f"  loaded in {load['insert_s']:.1f} s, VACUUM ANALYZE {load['vacuum_analyze_s']:.1f} s")
    finally:
        await conn.close()
    ctx.token = ctx.sign(ctx.bench.user_id, "bench@local.test")
    if ctx.big:
        ctx.big_token = ctx.sign(ctx.big.user_id, "bench-big@local.test")
    return info


def main(argv: list[str]) -> int:
    parts = [p for p in argv if p in PARTS] or list(PARTS)
    started = time.perf_counter()
    TMP.mkdir(parents=True, exist_ok=True)
    data = TMP / "data"
    shutil.rmtree(data, ignore_errors=True)
    ctx = Context(pg=BenchPostgres(data))
    about = machine()
    about["parts"] = parts
    log(
        f"machine: {about['nproc']} CPUs ({about['cpu_model']}), {about['memory_gib']} GiB; "
        f"load {about['load_average_at_start']}"
    )
    ctx.pg.start()
    ctx.secret = ctx.pg.jwt_secret()
    try:
        info = asyncio.run(prepare(ctx, big="list" in parts))

        # The server as `make run` starts it (the schema is already applied: it finds nothing to do).
        ctx.api = ctx.start(api_server(ctx.pg, "api"))
        if "list" in parts:
            log(f"part 2: GET /runs with {info['table_rows']:,} runs ({ctx.big_rows:,} in the org)")
            list_result = asyncio.run(bench_list.run(ctx))
            list_result.update(table_rows=info["table_rows"], org_rows=ctx.big_rows, load=info["load"])
            write_json("list", list_result)

        if "http" in parts:
            ctx.bare = ctx.start(bare_server(ctx.pg, ctx.bench.org_id, ctx.bench.user_id))
            # The Supabase REST mode: the same server, its store through the loopback PostgREST bridge.
            bridge, rest = rest_servers(ctx.pg, ctx.secret)
            ctx.procs.append(bridge.start())
            wait_for_port(bridge.port)
            ctx.rest = ctx.start(rest)
            if os.environ.get("BENCH_BASELINE"):
                ctx.baseline = ctx.start(baseline_server(ctx.pg, os.environ["BENCH_BASELINE"]))
            write_json("http", bench_http.run(ctx))
            ctx.bare.stop()
            ctx.rest.stop()
            bridge.stop()
            if ctx.baseline:
                ctx.baseline.stop()

        if "costs" in parts:
            write_json("costs", asyncio.run(bench_costs.run(ctx)))
        ctx.api.stop()

        # Before part 4, which leaves 5,000 interrupted runs running; and with no other executor on the
        # database than the fleet's own processes.
        if "fleet" in parts:
            write_json("fleet", asyncio.run(bench_fleet.run(ctx)))

        if "executor" in parts:
            write_json("executor", asyncio.run(bench_executor.run(ctx)))
    finally:
        for proc in ctx.procs:
            proc.stop()
        ctx.pg.stop()
        if os.environ.get("BENCH_KEEP_DATA") != "1":
            shutil.rmtree(data, ignore_errors=True)
    about["load_average_at_end"] = load_average()
    about["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json("machine", about)
    log(f"done in {about['elapsed_s']:.0f} s; load {about['load_average_at_end']}")
    report.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
