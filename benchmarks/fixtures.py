"""Data the bench needs, written straight to its private database with SQL (fast, and the same rows
the API would write)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import asyncpg
import common  # noqa: F401  (puts apps/api/src on sys.path)

from app import operations as ops

BENCH_EMAIL = "bench@local.test"
BIG_ORG_SLUG = "bench-big"
MAX_BUDGET_CENTS = 1_000_000_000_000


@dataclass(frozen=True)
class Identity:
    user_id: uuid.UUID
    org_id: uuid.UUID


async def identity(conn: asyncpg.Connection, slug: str, email: str = BENCH_EMAIL) -> Identity:
    """An admin of org `slug`, whose org may hold up to 1,000 active runs and spend without limit
    (the bench's creates are cancelled at once, but several are in flight at c=64)."""
    user_id = await conn.fetchval(
        "insert into auth.users (id, email) values (gen_random_uuid(), $1) "
        "on conflict (email) do update set email = excluded.email returning id",
        email,
    )
    org_id = await conn.fetchval(
        "insert into public.organizations (slug, name) values ($1, $1) "
        "on conflict (slug) do update set slug = excluded.slug returning id",
        slug,
    )
    await conn.execute(
        "insert into public.memberships (user_id, org_id, role) values ($1, $2, 'admin') "
        "on conflict (user_id, org_id) do update set role = 'admin'",
        user_id,
        org_id,
    )
    limits = {
        "org_id": org_id,
        "budget_cap_cents": MAX_BUDGET_CENTS,
        "soft_warning_percent": 80,
        "max_concurrent_runs": 1000,
        "rate_weight": None,
    }
    await conn.execute(ops.UPDATE_SETTINGS.sql, *ops.UPDATE_SETTINGS.bind(None, limits).values())
    return Identity(user_id, org_id)


# Finished runs that look like real ones: a few categories, counters, costs, timestamps.
RUNS_SQL = """
insert into public.collection_runs
  (org_id, name, status, estimated_cost_cents, actual_cost_cents, budget_cap_cents, total_items,
   processed_items, failed_items, category_ids, started_at, completed_at, created_by, created_at,
   updated_at, provider, status_message)
select o.org_id,
       'Collection ' || g,
       (array['completed', 'completed', 'completed', 'cancelled', 'failed'])[1 + g % 5],
       1500, 1400 + g % 100, 2500, 150, 150, g % 7,
       array['electronics', 'home-garden', 'toys'],
       ts, ts + interval '20 minutes', $3, ts, ts + interval '20 minutes', 'sandbox',
       'Category 3/3: 150/150 products'
  from (select $1::uuid as org_id) o,
       generate_series(1, $2::integer) g,
       lateral (select now() - make_interval(secs => g * 37.0) as ts) t
"""


async def seed_runs(conn: asyncpg.Connection, org_id: uuid.UUID, user_id: uuid.UUID, count: int) -> None:
    await conn.execute(RUNS_SQL, org_id, count, user_id)


async def load_million(conn: asyncpg.Connection, big: Identity, total: int, in_org: int) -> dict[str, float]:
    """`total` runs: `in_org` in the big org, the rest spread over 900 other organisations.
    Triggers are off for the load (session_replication_role = replica: no event rows, no FK checks),
    then VACUUM ANALYZE, as autovacuum would leave a table that stopped changing."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    others = await conn.fetch(
        "insert into public.organizations (slug, name) "
        "select 'bench-other-' || g, 'other ' || g from generate_series(1, 900) g "
        "on conflict (slug) do update set slug = excluded.slug returning id"
    )
    other_ids = [r["id"] for r in others]
    per_other = (total - in_org) // len(other_ids)
    async with conn.transaction():
        await conn.execute("set local session_replication_role = replica")
        await conn.execute(RUNS_SQL, big.org_id, in_org, big.user_id)
        await conn.execute(
            RUNS_SQL.replace("(select $1::uuid as org_id) o", "unnest($1::uuid[]) o(org_id)"),
            other_ids,
            per_other,
            None,
        )
    timings["insert_s"] = time.perf_counter() - started
    started = time.perf_counter()
    await conn.execute("vacuum (analyze) public.collection_runs")
    timings["vacuum_analyze_s"] = time.perf_counter() - started
    return timings


async def interrupted_runs(conn: asyncpg.Connection, org: Identity, count: int) -> None:
    """`count` runs a dead process left running or paused (half each), each with one category and
    an expired lease, as after a crash."""
    async with conn.transaction():
        await conn.execute("set local session_replication_role = replica")
        await conn.execute(
            """
            with made as (
              insert into public.collection_runs
                (org_id, name, status, estimated_cost_cents, budget_cap_cents, total_items,
                 category_ids, started_at, paused_at, created_by, created_at, provider)
              select $1, 'Interrupted ' || g,
                     case when g % 2 = 0 then 'running' else 'paused' end,
                     500, 2500, 50, array['cat-' || g], now() - interval '1 hour',
                     case when g % 2 = 0 then null else now() - interval '30 minutes' end,
                     $2, now() - make_interval(secs => g), 'sandbox'
                from generate_series(1, $3::integer) g
              returning id, category_ids
            )
            insert into public.collection_run_categories
              (run_id, position, category_id, lease_owner, lease_token, lease_expires_at)
            select id, 1, category_ids[1], 'dead-worker:1', gen_random_uuid(), now() - interval '1 minute'
              from made
            """,
            org.org_id,
            org.user_id,
            count,
        )
    await conn.execute("analyze public.collection_runs")
