"""Load and races: many clients for a fixed time doing a realistic mix (create, start, pause, resume,
cancel, list, estimate) across several orgs against a real server with its executor running; then
the database must show that no org ever had more active runs than its limit, that every run's event
history is a legal sequence of transitions, and that each run's counters match its history."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from conftest import Actor, World
from test_startup import Server

CLIENTS = 16
DURATION_S = 8.0
ORGS = 4
LIMIT = 3
ACTIVE = {"pending", "running", "paused"}


@pytest.fixture
async def server(migrated_dsn: str, tmp_path: Path) -> AsyncIterator[Server]:
    server = Server(
        migrated_dsn,
        tmp_path,
        EXECUTOR_ENABLED="true",
        SANDBOX_LATENCY_MS="2",
        EXECUTOR_TICK_S="0.1",
        PROVIDER_RATE_PER_S="0",
        LOG_LEVEL="WARNING",
        DB_POOL_MAX_SIZE="20",
    )
    server.start()
    async with httpx.AsyncClient(timeout=10.0) as http:
        await server.wait_until_healthy(http)
    try:
        yield server
    finally:
        await server.stop()


async def client_loop(
    http: httpx.AsyncClient, base: str, actor: Actor, seed: int, deadline: float, outcomes: Counter[str]
) -> None:
    rng = random.Random(seed)
    headers = actor.headers
    known: list[str] = []
    while time.monotonic() < deadline:
        roll = rng.random()
        try:
            if roll < 0.25:
                categories = rng.sample(
                    ["garden", "toys", "books", "music", "tools", "office"], rng.randint(1, 3)
                )
                response = await http.post(
                    f"{base}/collection/runs", json={"category_ids": categories}, headers=headers
                )
                if response.status_code == 201:
                    known.append(response.json()["id"])
            elif roll < 0.65 and known:
                action = rng.choice(["start", "start", "pause", "resume", "cancel"])
                response = await http.post(
                    f"{base}/collection/runs/{rng.choice(known)}/{action}", headers=headers
                )
            elif roll < 0.85:
                response = await http.get(f"{base}/collection/runs?limit=20", headers=headers)
            else:
                response = await http.post(
                    f"{base}/collection/estimate", json={"category_ids": ["garden", "toys"]}, headers=headers
                )
            outcomes[str(response.status_code)] += 1
        except httpx.TransportError as exc:
            outcomes[type(exc).__name__] += 1


class TestMixedLoad:
    async def test_invariants_hold_after_a_mixed_load(
        self, server: Server, world: World, db: asyncpg.Pool
    ) -> None:
        actors = [await world.admin(f"load-{i}") for i in range(ORGS)]
        for actor in actors:
            await db.execute(
                "insert into collection_settings (org_id, budget_cap_cents, max_concurrent_runs) "
                "values ($1, 100000, $2)",
                actor.org_id,
                LIMIT,
            )
        outcomes: Counter[str] = Counter()
        deadline = time.monotonic() + DURATION_S
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(timeout=10.0, limits=limits) as http:
            await asyncio.gather(
                *(
                    client_loop(
                        http, server.url, actors[i % ORGS], seed=i, deadline=deadline, outcomes=outcomes
                    )
                    for i in range(CLIENTS)
                )
            )
        # Every answer was a deliberate one: success, refusal (400/429) — never a 5xx or a dropped connection.
        assert set(outcomes) <= {"200", "201", "400", "429"}, outcomes
        assert outcomes["201"] > 0 and outcomes["429"] > 0 and outcomes["200"] > 100, outcomes

        # The executor is still working: read everything from one snapshot.
        async with db.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            await self.check_invariants(conn)

    async def check_invariants(self, db: asyncpg.Connection) -> None:
        transitions = {
            (r["from_status"], r["to_status"])
            for r in await db.fetch("select from_status, to_status from collection_run_transitions")
        }
        events = await db.fetch("select * from collection_run_events order by id")
        runs = {r["id"]: r for r in await db.fetch("select * from collection_runs")}
        assert events and runs

        # Replayed in id order (a create that saw a cancel as committed has a later id than it),
        # no org ever has more active runs than its limit.
        status: dict[object, str] = {}
        active: defaultdict[object, int] = defaultdict(int)
        for event in events:
            previous = status.get(event["run_id"])
            assert event["from_status"] == previous, f"run {event['run_id']}: history out of order"
            if previous is None:
                assert event["to_status"] == "pending"
            else:
                assert (previous, event["to_status"]) in transitions, (
                    f"illegal {previous}->{event['to_status']}"
                )
            active[event["org_id"]] += (event["to_status"] in ACTIVE) - (previous in ACTIVE)
            assert active[event["org_id"]] <= LIMIT, (
                f"org {event['org_id']} had {active[event['org_id']]} active runs"
            )
            status[event["run_id"]] = event["to_status"]

        # Each run's row agrees with its history, and its counters with its items.
        assert set(status) == set(runs)
        for run_id, run in runs.items():
            assert run["status"] == status[run_id]
            items = await db.fetchrow(
                "select count(*) filter (where status <> 'pending') as finished, "
                "count(*) filter (where status = 'failed') as failed, coalesce(sum(cost_cents), 0) as cost "
                "from collection_run_items where run_id = $1",
                run_id,
            )
            discovery = await db.fetchval(
                "select coalesce(sum(discovery_cost_cents), 0) from collection_run_categories "
                "where run_id = $1",
                run_id,
            )
            assert run["processed_items"] == items["finished"]
            assert run["failed_items"] == items["failed"]
            assert run["actual_cost_cents"] == items["cost"] + discovery + run["uncertain_cost_cents"]
            assert run["actual_cost_cents"] + run["reserved_cents"] <= run["budget_cap_cents"]
