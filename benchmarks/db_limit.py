"""The database limit: an endpoint's SQL straight through an asyncpg pool (the app's `create_pool`:
same size, codecs, statement cache and reset), `--concurrency` tasks in a closed loop, no HTTP. The
statements are the app's own operations (`app.operations`), their arguments bound by name.

A separate process on uvloop (as uvicorn runs the server), so it measures the pool and Postgres, not
the orchestrator. Prints one JSON line: requests, seconds, rps, p50/p90/p99/max in ms.

`create_cancel` counts two "requests" per pair, as wrk does for the HTTP figures: the create (its
two calls, estimate inputs then the guarded insert) and the cancel.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import uvloop
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "api" / "src"))
from app import operations as ops  # noqa: E402
from app.config import Settings  # noqa: E402
from app.database import create_pool  # noqa: E402

CATEGORIES = ["electronics", "home-garden", "toys"]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=SecretStr(args.dsn),
        supabase_jwt_secret=SecretStr("db-limit-verifies-no-token-" + "x" * 16),
    )
    pool = await create_pool(settings)
    org, user, run = uuid.UUID(args.org), uuid.UUID(args.user), uuid.UUID(args.run)

    def call(op: ops.Operation[Any], **given: Any) -> tuple[Any, ...]:
        """The operation's statement and its arguments in the function's order (bound by name)."""
        return (op.sql, *op.bind(None, given).values())

    # Bound once where the arguments never change: the client's own work stays out of the limit.
    get_run_call = call(ops.GET_RUN, org_id=org, run_id=run)
    list_runs_call = call(
        ops.LIST_RUNS, org_id=org, limit=20, offset=0, status=None, after_created_at=None, after_id=None
    )
    estimate_call = call(ops.ESTIMATE_INPUTS, org_id=org, category_ids=CATEGORIES)
    cats = CATEGORIES[:2]
    create_calls = (
        call(ops.ESTIMATE_INPUTS, org_id=org, category_ids=cats),
        call(
            ops.CREATE_RUN,
            org_id=org,
            created_by=user,
            name="bench",
            category_ids=cats,
            estimated_cost_cents=1000,
            total_items=100,
            provider="sandbox",
        ),
    )

    async def get_run() -> None:
        await pool.fetchrow(*get_run_call)

    async def list_runs() -> None:
        await pool.fetchval(*list_runs_call)

    async def estimate() -> None:
        await pool.fetchval(*estimate_call)

    async def create() -> uuid.UUID:
        await pool.fetchval(*create_calls[0])
        row = await pool.fetchrow(*create_calls[1])
        return row["id"]  # type: ignore[no-any-return]

    async def cancel(run_id: uuid.UUID) -> None:
        await pool.fetchrow(
            *call(ops.TRANSITION_RUN, org_id=org, run_id=run_id, action="cancel", actor=user, reason=None)
        )

    simple = {"get_run": get_run, "list_runs": list_runs, "estimate": estimate}
    latencies: list[float] = []
    measuring = False
    stop_at = 0.0

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            if args.op == "create_cancel":
                t0 = time.perf_counter()
                run_id = await create()
                t1 = time.perf_counter()
                await cancel(run_id)
                t2 = time.perf_counter()
                if measuring:
                    latencies.extend((t1 - t0, t2 - t1))
            else:
                t0 = time.perf_counter()
                await simple[args.op]()
                if measuring:
                    latencies.append(time.perf_counter() - t0)

    # Warm-up (connections opened, statements prepared), then the measured period.
    stop_at = time.perf_counter() + args.warmup
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    measuring = True
    started = time.perf_counter()
    stop_at = started + args.duration
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    seconds = time.perf_counter() - started
    await pool.close()
    ms = sorted(x * 1000 for x in latencies)

    def pct(q: float) -> float:
        return ms[min(len(ms) - 1, round(q / 100 * (len(ms) - 1)))] if ms else float("nan")

    return {
        "requests": len(ms),
        "seconds": round(seconds, 3),
        "rps": round(len(ms) / seconds, 1),
        "p50_ms": round(pct(50), 3),
        "p90_ms": round(pct(90), 3),
        "p99_ms": round(pct(99), 3),
        "max_ms": round(ms[-1], 3) if ms else float("nan"),
        "errors": 0,
        "non_2xx": 0,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--op", required=True, choices=["get_run", "list_runs", "estimate", "create_cancel"])
    parser.add_argument("--org", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    print(json.dumps(uvloop.run(main(parser.parse_args()))))
