"""Races only the database can settle: 50 creates against a limit of 3, transitions fired at the same
run together, and a budget cap lowered while runs are being created.

Each race is run twice where it matters: through the app (httpx on the ASGI app, requests interleaved on
one event loop and spread over several pooled database connections) and straight against the SQL
functions from separate connections held at a gate, so that every caller is provably waiting at the same
moment before they are all let go.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import httpx
import pytest

from conftest import Actor, World

CENTS_PER_CATEGORY = 500  # products_per_category (50) x (5 c Amazon + 1 x 5 c eBay)
GATE_KEY = 6_020_900  # advisory lock the gate holds while the racers line up behind it

# The allowed transitions of the contract (issue 2), as the tests' own model of what a serial order does.
TRANSITIONS = {
    ("start", "pending"): "running",
    ("pause", "running"): "paused",
    ("resume", "paused"): "running",
    ("cancel", "pending"): "cancelled",
    ("cancel", "running"): "cancelled",
    ("cancel", "paused"): "cancelled",
}
ACTIONS_TO = {"pending": [], "running": ["start"], "paused": ["start", "pause"]}


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def patch_settings(client: httpx.AsyncClient, actor: Actor, **changes: int) -> dict[str, Any]:
    response = await client.patch("/collection/settings", json=changes, headers=actor.headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def make_run(db: asyncpg.Pool, org_id: uuid.UUID, status: str = "pending", name: str = "race") -> uuid.UUID:
    """A run in `status`, reached through the same SQL functions the service calls."""
    run_id: uuid.UUID = await db.fetchval(
        "select id from public.collection_create_run($1, null, $2, array['electronics'], 500, 50)", org_id, name
    )
    for action in ACTIONS_TO[status]:
        await db.execute("select public.collection_transition_run($1, $2, $3)", org_id, run_id, action)
    return run_id


async def last_event_id(db: asyncpg.Pool) -> int:
    value: int = await db.fetchval("select coalesce(max(id), 0) from public.collection_run_events")
    return value


async def events_since(db: asyncpg.Pool, run_id: uuid.UUID | str, after: int) -> list[tuple[str, str]]:
    rows = await db.fetch(
        "select from_status, to_status from public.collection_run_events where run_id = $1 and id > $2 "
        "order by id",
        uuid.UUID(str(run_id)),
        after,
    )
    return [(r["from_status"], r["to_status"]) for r in rows]


def serial_outcome(status: str, actions: Sequence[str]) -> tuple[list[str | None], str]:
    """What each action returns (its new status, or None when refused) applied one after the other."""
    results: list[str | None] = []
    for action in actions:
        to_status = TRANSITIONS.get((action, status))
        results.append(to_status)
        status = to_status or status
    return results, status


class TestCreateRace:
    async def test_fifty_simultaneous_requests_create_exactly_the_limit(
        self, client: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin("acme")
        await patch_settings(client, admin, budget_cap_cents=1_000_000, max_concurrent_runs=3)
        race_started = await db.fetchval("select clock_timestamp()")

        responses = await asyncio.gather(
            *(
                client.post(
                    "/collection/runs",
                    json={"name": f"race {i}", "category_ids": ["electronics"]},
                    headers=admin.headers,
                )
                for i in range(50)
            )
        )

        statuses = Counter(r.status_code for r in responses)
        assert statuses == {201: 3, 429: 47}, [r.text for r in responses if r.status_code not in (201, 429)]
        assert {r.json()["error"] for r in responses if r.status_code == 429} == {"concurrent_run_limit"}
        created = {r.json()["id"] for r in responses if r.status_code == 201}
        rows = await db.fetch("select id, status from public.collection_runs where org_id = $1", admin.org_id)
        assert {str(r["id"]) for r in rows} == created
        assert {r["status"] for r in rows} == {"pending"}
        events = await db.fetchval(
            "select count(*) from public.collection_run_events where org_id = $1", admin.org_id
        )
        assert events == 3
        # The requests really overlapped at the database: the app had to open several connections.
        opened = await db.fetchval(
            "select count(*) from pg_stat_activity where application_name = 'collection-api' "
            "and backend_start >= $1",
            race_started,
        )
        assert opened >= 2

    async def test_fifty_connections_released_together_create_exactly_the_limit(
        self, world: World, db: asyncpg.Pool, migrated_dsn: str
    ) -> None:
        # A brand-new org: its settings row (default limit 3) is itself created inside the race.
        org_id = await world.org("acme")
        racers = await asyncio.gather(*(asyncpg.connect(migrated_dsn) for _ in range(50)))
        gate = await asyncpg.connect(migrated_dsn)
        tasks: list[asyncio.Task[Any]] = []
        try:
            await gate.execute("select pg_advisory_lock($1)", GATE_KEY)

            async def create(conn: asyncpg.Connection, i: int) -> asyncpg.Record | asyncpg.PostgresError:
                await conn.execute("select pg_advisory_lock_shared($1)", GATE_KEY)
                try:
                    row: asyncpg.Record = await conn.fetchrow(
                        "select * from public.collection_create_run($1, null, $2, array['electronics'], 500, 50)",
                        org_id,
                        f"race {i}",
                    )
                    return row
                except asyncpg.PostgresError as exc:
                    return exc

            tasks = [asyncio.create_task(create(conn, i)) for i, conn in enumerate(racers)]
            pids = [conn.get_server_pid() for conn in racers]

            async def all_at_gate() -> bool:
                waiting: int = await db.fetchval(
                    "select count(*) from pg_locks where locktype = 'advisory' and not granted "
                    "and pid = any($1::int[])",
                    pids,
                )
                return waiting == 50

            await eventually(all_at_gate, what="50 connections waiting at the gate")
            await gate.execute("select pg_advisory_unlock($1)", GATE_KEY)
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*(conn.close() for conn in [gate, *racers]), return_exceptions=True)

        created = [r for r in results if isinstance(r, asyncpg.Record)]
        refused = [r for r in results if isinstance(r, asyncpg.PostgresError)]
        assert len(created) == 3
        assert len(refused) == 47
        assert {exc.sqlstate for exc in refused} == {"CR002"}
        rows = await db.fetch("select id from public.collection_runs where org_id = $1", org_id)
        assert {r["id"] for r in rows} == {r["id"] for r in created}
        settings_rows = await db.fetch(
            "select max_concurrent_runs from public.collection_settings where org_id = $1", org_id
        )
        assert [r["max_concurrent_runs"] for r in settings_rows] == [3]


class TestTransitionRace:
    # Of each pair, only one can succeed: the first moves the run out of the status the second needs.
    EXCLUSIVE = [("pending", "start"), ("running", "pause"), ("paused", "resume"), ("running", "cancel")]

    async def test_the_same_transition_twice_at_once_succeeds_exactly_once(
        self, client: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin("acme")
        await patch_settings(client, admin, max_concurrent_runs=1000, budget_cap_cents=1_000_000)
        rounds = [(status, action) for status, action in self.EXCLUSIVE for _ in range(8)]
        runs = [await make_run(db, admin.org_id, status) for status, _ in rounds]
        baseline = await last_event_id(db)

        def fire(run_id: uuid.UUID, action: str) -> Awaitable[httpx.Response]:
            return client.post(f"/collection/runs/{run_id}/{action}", headers=admin.headers)

        answers = await asyncio.gather(
            *(fire(run_id, action) for run_id, (_, action) in zip(runs, rounds, strict=True) for _ in range(2))
        )

        for i, (run_id, (status, action)) in enumerate(zip(runs, rounds, strict=True)):
            pair = answers[2 * i : 2 * i + 2]
            expected = TRANSITIONS[(action, status)]
            assert sorted(r.status_code for r in pair) == [200, 400], (action, [r.text for r in pair])
            winner = next(r for r in pair if r.status_code == 200)
            loser = next(r for r in pair if r.status_code == 400)
            assert winner.json() == {"ok": True, "status": expected}
            assert loser.json()["error"] == "invalid_transition"
            assert await db.fetchval("select status from public.collection_runs where id = $1", run_id) == expected
            assert await events_since(db, run_id, baseline) == [(status, expected)]

    async def test_pause_and_cancel_at_once_leave_a_log_that_matches_the_answers(
        self, client: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        """Both may win (pause, then cancel); whatever the interleaving, the log records exactly the
        transitions that were answered 200, as one chain ending in the run's status."""
        admin = await world.admin("acme")
        await patch_settings(client, admin, max_concurrent_runs=1000, budget_cap_cents=1_000_000)
        runs = [await make_run(db, admin.org_id, "running") for _ in range(30)]
        baseline = await last_event_id(db)

        answers = await asyncio.gather(
            *(
                client.post(f"/collection/runs/{run_id}/{action}", headers=admin.headers)
                for run_id in runs
                for action in ("pause", "cancel")
            )
        )

        for i, run_id in enumerate(runs):
            pause, cancel = answers[2 * i], answers[2 * i + 1]
            assert {pause.status_code, cancel.status_code} <= {200, 400}, (pause.text, cancel.text)
            winners = [r.json()["status"] for r in (pause, cancel) if r.status_code == 200]
            assert winners, "one of pause and cancel must win"
            chain = await events_since(db, run_id, baseline)
            assert sorted(to for _, to in chain) == sorted(winners)
            assert [frm for frm, _ in chain] == ["running", *(to for _, to in chain[:-1])]
            final = await db.fetchval("select status from public.collection_runs where id = $1", run_id)
            assert final == chain[-1][1]
            if cancel.status_code == 200:
                assert final == "cancelled"

    @pytest.mark.parametrize(
        ("status", "first", "second"),
        [
            # Mutually exclusive: exactly one wins, the other is refused.
            ("pending", "start", "start"),
            ("running", "pause", "pause"),
            ("paused", "resume", "resume"),
            ("running", "cancel", "cancel"),
            # The second is refused after the first.
            ("running", "cancel", "pause"),
            ("pending", "cancel", "start"),
            ("paused", "cancel", "resume"),
            # Legal one after the other: both must win, as if they had come one at a time.
            ("running", "pause", "cancel"),
            ("pending", "start", "cancel"),
            ("paused", "resume", "cancel"),
        ],
    )
    async def test_transitions_queued_on_one_run_take_effect_one_after_the_other(
        self, world: World, db: asyncpg.Pool, migrated_dsn: str, status: str, first: str, second: str
    ) -> None:
        """A gate holds the run's row; `first` and then `second` queue behind it, each from its own
        connection; the gate lets go. The outcome must be the serial one: first, then second."""
        org_id = await world.org("acme")
        await db.execute("select public.collection_update_settings($1, null, null, 1000)", org_id)
        run_id = await make_run(db, org_id, status)
        baseline = await last_event_id(db)
        gate, conn_first, conn_second = await asyncio.gather(*(asyncpg.connect(migrated_dsn) for _ in range(3)))
        tasks: list[asyncio.Task[str | asyncpg.PostgresError]] = []
        try:
            holding = gate.transaction()
            await holding.start()
            await gate.execute("select 1 from public.collection_runs where id = $1 for update", run_id)

            async def transition(conn: asyncpg.Connection, action: str) -> str | asyncpg.PostgresError:
                try:
                    new_status: str = await conn.fetchval(
                        "select status from public.collection_transition_run($1, $2, $3)", org_id, run_id, action
                    )
                    return new_status
                except asyncpg.PostgresError as exc:
                    return exc

            for conn, action in ((conn_first, first), (conn_second, second)):
                tasks.append(asyncio.create_task(transition(conn, action)))
                pid = conn.get_server_pid()

                async def blocked(pid: int = pid) -> bool:
                    wait: str | None = await db.fetchval(
                        "select wait_event_type from pg_stat_activity where pid = $1", pid
                    )
                    return wait == "Lock"

                await eventually(blocked, what=f"{action} to wait for the run's row")
            await holding.commit()
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*(c.close() for c in (gate, conn_first, conn_second)), return_exceptions=True)

        expected, final = serial_outcome(status, [first, second])
        answered = [r if isinstance(r, str) else None for r in results]
        assert answered == expected, [str(r) for r in results]
        for result in results:
            if not isinstance(result, str):
                assert result.sqlstate == "CR004", result
        assert await db.fetchval("select status from public.collection_runs where id = $1", run_id) == final
        steps = []
        current = status
        for to_status in expected:
            if to_status is not None:
                steps.append((current, to_status))
                current = to_status
        assert await events_since(db, run_id, baseline) == steps


class TestBudgetRace:
    CAPS = [8000, 6000, 4000, 3000, 2000, 1000]
    START_CAP = 10_000

    async def test_lowering_the_cap_while_creating_never_admits_a_run_over_the_cap_in_force(
        self, client: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin("acme")
        await patch_settings(client, admin, budget_cap_cents=self.START_CAP, max_concurrent_runs=1000)
        lowered_at: list[tuple[float, int]] = []  # (when the PATCH had answered, the cap it set)
        outcomes: list[tuple[float, int, httpx.Response]] = []  # (when sent, estimate, answer)

        async def lower_cap() -> None:
            for cap in self.CAPS:
                await patch_settings(client, admin, budget_cap_cents=cap)
                lowered_at.append((time.monotonic(), cap))

        async def create(categories: int, i: int) -> None:
            sent = time.monotonic()
            response = await client.post(
                "/collection/runs",
                json={"name": f"budget race {i}", "category_ids": [f"c{n}" for n in range(categories)]},
                headers=admin.headers,
            )
            outcomes.append((sent, categories * CENTS_PER_CATEGORY, response))

        async def create_in_waves() -> None:
            for wave in range(6):
                await asyncio.gather(*(create(1 + (wave + k) % 10, wave * 10 + k) for k in range(10)))

        await asyncio.gather(lower_cap(), create_in_waves())

        caps_in_force = {self.START_CAP, *self.CAPS}

        def newest_cap_before(moment: float) -> int:
            return min([self.START_CAP, *(cap for at, cap in lowered_at if at < moment)])

        created_ids = set()
        for sent, estimate, response in outcomes:
            # Caps only go down, so a request sent after a PATCH answered can only see that cap or lower.
            ceiling = newest_cap_before(sent)
            if response.status_code == 201:
                run = response.json()
                created_ids.add(run["id"])
                assert run["estimated_cost_cents"] == estimate
                assert run["budget_cap_cents"] in caps_in_force
                assert estimate <= run["budget_cap_cents"] <= ceiling
            else:
                assert response.status_code == 400, response.text
                body = response.json()
                assert body["error"] == "budget_exceeded"
                match = re.fullmatch(r"Estimated cost \$([\d,]+)\.(\d\d) exceeds budget cap \$([\d,]+)\.(\d\d)", body["detail"])
                assert match, body["detail"]
                stated_estimate = int(match[1].replace(",", "")) * 100 + int(match[2])
                stated_cap = int(match[3].replace(",", "")) * 100 + int(match[4])
                assert stated_estimate == estimate
                assert stated_cap in caps_in_force
                assert estimate > stated_cap
                assert stated_cap <= ceiling
            if estimate <= min(caps_in_force):
                assert response.status_code == 201, "a run within every cap that was ever in force is refused"

        rows = await db.fetch(
            "select r.id, r.estimated_cost_cents, r.budget_cap_cents from public.collection_runs r "
            "join public.collection_run_events e on e.run_id = r.id and e.from_status is null "
            "where r.org_id = $1 order by e.id",
            admin.org_id,
        )
        assert {str(r["id"]) for r in rows} == created_ids
        assert all(r["estimated_cost_cents"] <= r["budget_cap_cents"] for r in rows)
        # Creates and cap changes are serialised on the org: in creation order the snapshots never go up.
        snapshots = [r["budget_cap_cents"] for r in rows]
        assert snapshots == sorted(snapshots, reverse=True)
        final = await db.fetchval("select budget_cap_cents from public.collection_settings where org_id = $1", admin.org_id)
        assert final == self.CAPS[-1]
