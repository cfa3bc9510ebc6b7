"""Races only the database can settle: 50 creates against a limit of 3, transitions fired at the same
run together, and a budget cap lowered while runs are being created.

To make a race real rather than hoped for, a gate connection holds a lock every racer must pass (the
runs table for creates, the run's row for transitions); the test waits until every racer is seen
waiting on a lock in pg_stat_activity, then lets them all go at once.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.main import create_app
from app.models import CollectionRunCreate, CollectionSettingsUpdate, RunAction
from app.services.collection import CollectionService
from conftest import Actor, World, make_settings

CENTS_PER_CATEGORY = 500  # products_per_category (50) x (5 c Amazon + 1 x 5 c eBay), no history

# The allowed transitions of the contract (issue 2): the tests' own model of a serial order.
TRANSITIONS = {
    ("start", "pending"): "running",
    ("pause", "running"): "paused",
    ("resume", "paused"): "running",
    ("cancel", "pending"): "cancelled",
    ("cancel", "running"): "cancelled",
    ("cancel", "paused"): "cancelled",
}
ACTIONS_TO = {"pending": [], "running": ["start"], "paused": ["start", "pause"]}


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def waiting_on_locks(db: asyncpg.Pool, pids: Sequence[int] | None = None) -> int:
    """How many of `pids` (or of the app's connections) are waiting on a lock right now."""
    if pids is None:
        count: int = await db.fetchval(
            "select count(*) from pg_stat_activity "
            "where application_name = 'collection-api' and wait_event_type = 'Lock'"
        )
    else:
        count = await db.fetchval(
            "select count(*) from pg_stat_activity where pid = any($1::int[]) and wait_event_type = 'Lock'",
            list(pids),
        )
    return count


async def at_least(count: Awaitable[int], n: int) -> bool:
    return await count >= n


class Gate:
    """A transaction on its own connection holding a lock every racer must pass, until `open()`."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._holding = conn.transaction()

    async def hold(self, lock_sql: str, *args: Any) -> None:
        await self._holding.start()
        await self._conn.execute(lock_sql, *args)

    async def open(self) -> None:
        await self._holding.commit()


@asynccontextmanager
async def gate(dsn: str, lock_sql: str, *args: Any) -> AsyncIterator[Gate]:
    conn = await asyncpg.connect(dsn)
    try:
        held = Gate(conn)
        await held.hold(lock_sql, *args)
        yield held
    finally:
        await conn.close()  # also rolls back a gate that was never opened


async def patch_settings(client: httpx.AsyncClient, actor: Actor, **changes: int) -> dict[str, Any]:
    response = await client.patch("/collection/settings", json=changes, headers=actor.headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def make_run(service: CollectionService, org_id: uuid.UUID, status: str = "pending") -> uuid.UUID:
    run = await service.create_run(
        org_id, None, CollectionRunCreate(name="race", category_ids=["electronics"])
    )
    for action in ACTIONS_TO[status]:
        await getattr(service, f"{RunAction(action)}_run")(org_id, run.id, None)
    return run.id


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


def serial_outcome(status: str, actions: Sequence[str]) -> tuple[list[str | None], list[tuple[str, str]]]:
    """Applied one after the other: what each action answers (new status, or None when refused) and
    the transitions the event log then holds."""
    answers: list[str | None] = []
    steps: list[tuple[str, str]] = []
    for action in actions:
        to_status = TRANSITIONS.get((action, status))
        answers.append(to_status)
        if to_status is not None:
            steps.append((status, to_status))
            status = to_status
    return answers, steps


class TestCreateRace:
    @pytest.fixture
    async def wide_client(self, migrated_dsn: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
        """The app with a pool wide enough for all 50 requests to be at the database at once."""
        settings = make_settings(migrated_dsn, tmp_path, db_pool_max_size=60, db_acquire_timeout_s=20)
        application: FastAPI = create_app(settings)
        async with application.router.lifespan_context(application):
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                yield client

    async def test_fifty_simultaneous_requests_create_exactly_the_limit(
        self, wide_client: httpx.AsyncClient, world: World, db: asyncpg.Pool, migrated_dsn: str
    ) -> None:
        admin = await world.admin("acme")
        await patch_settings(wide_client, admin, budget_cap_cents=1_000_000, max_concurrent_runs=3)

        async with gate(migrated_dsn, "lock table public.collection_runs in exclusive mode") as held:
            requests = [
                asyncio.create_task(
                    wide_client.post(
                        "/collection/runs",
                        json={"name": f"race {i}", "category_ids": ["electronics"]},
                        headers=admin.headers,
                    )
                )
                for i in range(50)
            ]
            try:
                # Nobody can create while the gate holds the table: all 50 are in flight together.
                await eventually(lambda: at_least(waiting_on_locks(db), 50), "50 requests at the gate")
                await held.open()
                responses = await asyncio.gather(*requests)
            finally:
                for request in requests:
                    request.cancel()

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

    async def test_fifty_connections_calling_the_function_together_create_exactly_the_limit(
        self, world: World, db: asyncpg.Pool, migrated_dsn: str
    ) -> None:
        # A brand-new org: its settings row (default limit 3) is itself created inside the race.
        org_id = await world.org("acme")
        racers = await asyncio.gather(*(asyncpg.connect(migrated_dsn) for _ in range(50)))

        async def create(conn: asyncpg.Connection, i: int) -> asyncpg.Record | asyncpg.PostgresError:
            try:
                row: asyncpg.Record = await conn.fetchrow(
                    "select * from public.collection_create_run(p_org_id => $1, p_created_by => null, "
                    "p_name => $2, p_category_ids => array['electronics'], p_estimated_cost_cents => 500, "
                    "p_total_items => 50, p_provider => 'sandbox')",
                    org_id,
                    f"race {i}",
                )
                return row
            except asyncpg.PostgresError as exc:
                return exc

        tasks: list[asyncio.Task[asyncpg.Record | asyncpg.PostgresError]] = []
        try:
            async with gate(migrated_dsn, "lock table public.collection_runs in exclusive mode") as held:
                tasks = [asyncio.create_task(create(conn, i)) for i, conn in enumerate(racers)]
                pids = [conn.get_server_pid() for conn in racers]
                await eventually(
                    lambda: at_least(waiting_on_locks(db, pids), 50), "50 connections at the gate"
                )
                await held.open()
                results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*(conn.close() for conn in racers), return_exceptions=True)

        created = [r for r in results if isinstance(r, asyncpg.Record)]
        refused = [r for r in results if isinstance(r, asyncpg.PostgresError)]
        assert len(created) == 3, refused[:1]
        assert len(refused) == 47
        assert {exc.sqlstate for exc in refused} == {"CR002"}, refused[:1]
        rows = await db.fetch("select id from public.collection_runs where org_id = $1", org_id)
        assert {r["id"] for r in rows} == {r["id"] for r in created}
        settings_rows = await db.fetch(
            "select max_concurrent_runs from public.collection_settings where org_id = $1", org_id
        )
        assert [r["max_concurrent_runs"] for r in settings_rows] == [3]


class TestTransitionRace:
    # Of each pair only one can succeed: the first moves the run out of the status the second needs.
    EXCLUSIVE = [("pending", "start"), ("running", "pause"), ("paused", "resume"), ("running", "cancel")]

    async def test_the_same_transition_twice_at_once_succeeds_exactly_once(
        self, app: FastAPI, client: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin("acme")
        await patch_settings(client, admin, max_concurrent_runs=1000, budget_cap_cents=1_000_000)
        rounds = [(status, action) for status, action in self.EXCLUSIVE for _ in range(8)]
        runs = [await make_run(app.state.service, admin.org_id, status) for status, _ in rounds]
        baseline = await last_event_id(db)

        answers = await asyncio.gather(
            *(
                client.post(f"/collection/runs/{run_id}/{action}", headers=admin.headers)
                for run_id, (_, action) in zip(runs, rounds, strict=True)
                for _ in range(2)
            )
        )

        for i, (run_id, (status, action)) in enumerate(zip(runs, rounds, strict=True)):
            pair = answers[2 * i : 2 * i + 2]
            expected = TRANSITIONS[(action, status)]
            assert sorted(r.status_code for r in pair) == [200, 400], (action, [r.text for r in pair])
            winner = next(r for r in pair if r.status_code == 200)
            loser = next(r for r in pair if r.status_code == 400)
            assert winner.json() == {"ok": True, "status": expected}
            assert loser.json()["error"] == "invalid_transition"
            assert (
                await db.fetchval("select status from public.collection_runs where id = $1", run_id)
                == expected
            )
            assert await events_since(db, run_id, baseline) == [(status, expected)]

    async def test_pause_and_cancel_at_once_leave_a_log_that_matches_the_answers(
        self, app: FastAPI, client: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        """Both may win (pause, then cancel). Whatever the interleaving, the log holds exactly the
        transitions answered 200, as one chain from `running` to the run's status."""
        admin = await world.admin("acme")
        await patch_settings(client, admin, max_concurrent_runs=1000, budget_cap_cents=1_000_000)
        runs = [await make_run(app.state.service, admin.org_id, "running") for _ in range(30)]
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
            # Cancel first: the second has nothing left to act on.
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
        self,
        app: FastAPI,
        world: World,
        db: asyncpg.Pool,
        migrated_dsn: str,
        status: str,
        first: str,
        second: str,
    ) -> None:
        """The gate holds the run's row; `first`, then `second` queue behind it, each on its own
        connection; the gate lets go. The outcome must be the serial one: first, then second."""
        org_id = await world.org("acme")
        await app.state.service.update_settings(org_id, CollectionSettingsUpdate(max_concurrent_runs=1000))
        run_id = await make_run(app.state.service, org_id, status)
        baseline = await last_event_id(db)
        racers = await asyncio.gather(*(asyncpg.connect(migrated_dsn) for _ in range(2)))

        async def transition(conn: asyncpg.Connection, action: str) -> str | asyncpg.PostgresError:
            try:
                new_status: str = await conn.fetchval(
                    "select status from public.collection_transition_run($1, $2, $3)", org_id, run_id, action
                )
                return new_status
            except asyncpg.PostgresError as exc:
                return exc

        tasks: list[asyncio.Task[str | asyncpg.PostgresError]] = []
        try:
            lock_row = "select 1 from public.collection_runs where id = $1 for update"
            async with gate(migrated_dsn, lock_row, run_id) as held:
                for conn, action in zip(racers, (first, second), strict=True):
                    tasks.append(asyncio.create_task(transition(conn, action)))
                    pids = [conn.get_server_pid()]
                    await eventually(lambda p=pids: at_least(waiting_on_locks(db, p), 1), f"{action} queued")
                await held.open()
                results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*(conn.close() for conn in racers), return_exceptions=True)

        expected_answers, expected_steps = serial_outcome(status, [first, second])
        answers = [r if isinstance(r, str) else None for r in results]
        assert answers == expected_answers, [str(r) for r in results]
        for result in results:
            if not isinstance(result, str):
                assert result.sqlstate == "CR004", result
        final = await db.fetchval("select status from public.collection_runs where id = $1", run_id)
        assert final == expected_steps[-1][1]
        assert await events_since(db, run_id, baseline) == expected_steps


class TestBudgetRace:
    START_CAP = 10_000
    CAPS = [8000, 6000, 4000, 3000, 2000, 1000]  # lowered one after the other while creates run

    async def test_lowering_the_cap_while_creating_never_admits_a_run_over_the_cap_in_force(
        self, client: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin("acme")
        await patch_settings(client, admin, budget_cap_cents=self.START_CAP, max_concurrent_runs=1000)
        lowered: list[tuple[float, int]] = []  # (when the PATCH had answered, the cap it set)
        outcomes: list[tuple[float, int, httpx.Response]] = []  # (when the create was sent, estimate, answer)

        async def lower_cap() -> None:
            for cap in self.CAPS:
                await patch_settings(client, admin, budget_cap_cents=cap)
                lowered.append((time.monotonic(), cap))

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

        caps_ever = {self.START_CAP, *self.CAPS}

        def cap_ceiling(sent: float) -> int:
            # Caps only go down: a create sent after a PATCH answered sees that cap or a lower one.
            return min([self.START_CAP, *(cap for at, cap in lowered if at < sent)])

        created_ids = set()
        for sent, estimate, response in outcomes:
            if response.status_code == 201:
                run = response.json()
                created_ids.add(run["id"])
                assert run["estimated_cost_cents"] == estimate
                assert run["budget_cap_cents"] in caps_ever
                assert estimate <= run["budget_cap_cents"] <= cap_ceiling(sent)
            else:
                assert response.status_code == 400, response.text
                body = response.json()
                assert body["error"] == "budget_exceeded"
                amounts = re.fullmatch(
                    r"Estimated cost \$([\d,]+\.\d\d) exceeds budget cap \$([\d,]+\.\d\d)", body["detail"]
                )
                assert amounts, body["detail"]
                stated_estimate, stated_cap = (
                    round(float(a.replace(",", "")) * 100) for a in amounts.groups()
                )
                assert stated_estimate == estimate
                assert stated_cap in caps_ever
                assert estimate > stated_cap
                assert stated_cap <= cap_ceiling(sent)
            if estimate <= min(caps_ever):
                assert response.status_code == 201, (
                    f"{estimate} c is within every cap ever set: {response.text}"
                )

        rows = await db.fetch(
            "select r.id, r.estimated_cost_cents, r.budget_cap_cents from public.collection_runs r "
            "join public.collection_run_events e on e.run_id = r.id and e.from_status is null "
            "where r.org_id = $1 order by e.id",
            admin.org_id,
        )
        assert {str(r["id"]) for r in rows} == created_ids
        assert all(r["estimated_cost_cents"] <= r["budget_cap_cents"] for r in rows)
        # Creates and cap changes are serialised per org: in creation order the snapshots never go up.
        snapshots = [r["budget_cap_cents"] for r in rows]
        assert snapshots == sorted(snapshots, reverse=True)
        final_cap = await db.fetchval(
            "select budget_cap_cents from public.collection_settings where org_id = $1", admin.org_id
        )
        assert final_cap == self.CAPS[-1]

    async def test_a_cap_lowered_while_a_create_is_in_flight_takes_effect_in_commit_order(
        self, client: httpx.AsyncClient, world: World, db: asyncpg.Pool, migrated_dsn: str
    ) -> None:
        """The create is held at the gate (no run can be inserted) after it has begun; the PATCH comes
        next. Either the PATCH waits for the create (the run is admitted under the old cap, which was in
        force when it committed) or it goes first (and the create must then be judged by the new cap)."""
        admin = await world.admin("acme")
        await patch_settings(client, admin, budget_cap_cents=self.START_CAP, max_concurrent_runs=1000)
        ten_categories = [f"c{n}" for n in range(10)]  # 5000 c: within 10000, over 1000

        async with gate(migrated_dsn, "lock table public.collection_runs in exclusive mode") as held:
            create = asyncio.create_task(
                client.post("/collection/runs", json={"category_ids": ten_categories}, headers=admin.headers)
            )
            lower: asyncio.Task[httpx.Response] | None = None
            try:
                await eventually(lambda: at_least(waiting_on_locks(db), 1), "the create at the gate")
                lower = asyncio.create_task(
                    client.patch(
                        "/collection/settings", json={"budget_cap_cents": 1000}, headers=admin.headers
                    )
                )

                patching = lower

                async def patch_settled() -> bool:
                    return patching.done() or await waiting_on_locks(db) >= 2

                await eventually(patch_settled, "the PATCH to answer or to wait")
                patch_went_first = lower.done()
                await held.open()
                created, lowered = await asyncio.gather(create, lower)
            finally:
                for task in (create, lower):
                    if task is not None:
                        task.cancel()

        assert lowered.status_code == 200, lowered.text
        rows = await db.fetch(
            "select budget_cap_cents from public.collection_runs where org_id = $1", admin.org_id
        )
        if patch_went_first:
            assert created.status_code == 400, (
                f"admitted under a cap lowered before it committed: {created.text}"
            )
            assert created.json()["error"] == "budget_exceeded"
            assert rows == []
        else:
            assert created.status_code == 201, created.text
            assert created.json()["budget_cap_cents"] == self.START_CAP
            assert [r["budget_cap_cents"] for r in rows] == [self.START_CAP]
        final_cap = await db.fetchval(
            "select budget_cap_cents from public.collection_settings where org_id = $1", admin.org_id
        )
        assert final_cap == 1000
