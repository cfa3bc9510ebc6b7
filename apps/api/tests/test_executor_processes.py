"""The executor across real server processes (`python -m app.cli serve`) on one database: SIGKILL at
random points with restarts under the same and under another worker id, replicas side by side on the
same runs, the budget across a crash, and graceful shutdown. (In-process behaviour: test_executor.py.)

A process works units of work (a category's discovery, or an item), each leased to it (lease_owner:
its WORKER_ID, lease_token: its own random token) with its cost reserved on the run. The tests take
the units a process held when it was killed or stopped from the database, and follow each of them.

Every sandbox call is appended to a call log ("worker\\tsource\\tquery"): what the provider may have
charged, whoever made the call and whether or not its answer was ever recorded. The random kill points
come from a fixed seed (EXECUTOR_CRASH_SEED overrides it); a failure message names the seed and shows
the tail of each server's log.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.providers.sandbox import catalogue
from conftest import Actor, World
from server_process import ServerProcess

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("EXECUTOR_CRASH_SEED", "20261125"))
RUN_TIMEOUT_S = 45.0
# A server takes 1-2 s to start: under a 4 s lease a new process would take a dead one's units well
# before their lease expires if the lease did not fence them, and still has time of its own to work.
TAKEOVER_LEASE_S = 4
# Long enough that "taken back at once" and "waited for the lease" cannot be confused.
LONG_LEASE_S = 10
MAX_IN_FLIGHT = 3  # MAX_CALLS_IN_FLIGHT: with no rate set, each process keeps this many units going
CALL_CENTS = 5  # every sandbox call (best sellers, product, eBay search) at the default prices
ITEM_CENTS = 2 * CALL_CENTS

# About 30 items a second per process on this machine (two calls of 25-75 ms each, 3 units at a
# time): a 209-item run lasts about 7 s, longer than the work four kills at most 1.2 s apart let it do.
BASE_ENV = {
    "SANDBOX_LATENCY_MS": "50",
    "EXECUTOR_TICK_S": "0.1",
    "PROVIDER_BACKOFF_S": "0",
    "PROVIDER_RATE_PER_S": "0",
    "PROVIDER_RENDERED_RATE_PER_S": "0",
    "MAX_CALLS_IN_FLIGHT": str(MAX_IN_FLIGHT),
    "LOG_LEVEL": "INFO",
    "PYTHONUNBUFFERED": "1",
}


class Server(ServerProcess):
    """A server whose sandbox calls go to the test's call log."""

    def __init__(self, worker_id: str, dsn: str, log_dir: Path, call_log: Path, **env: str) -> None:
        super().__init__(worker_id, dsn, log_dir, **{**BASE_ENV, "SANDBOX_CALL_LOG": str(call_log), **env})


class Harness:
    """The servers of one test, the API calls it makes through them and its call log."""

    def __init__(self, dsn: str, tmp_path: Path, http: httpx.AsyncClient) -> None:
        self.dsn = dsn
        self.tmp_path = tmp_path
        self.http = http
        self.call_log = tmp_path / "calls.tsv"
        self.servers: list[Server] = []
        self.notes: list[str] = []  # what the test did (e.g. where it killed), for failure messages

    def server(self, worker_id: str, **env: str) -> Server:
        server = Server(worker_id, self.dsn, self.tmp_path, self.call_log, **env)
        self.servers.append(server)
        return server

    async def start(self, worker_id: str, **env: str) -> Server:
        server = self.server(worker_id, **env)
        server.start()
        await server.wait_healthy(self.http)
        return server

    async def restart(self, server: Server) -> None:
        server.start()
        await server.wait_healthy(self.http)

    def kill_all(self) -> None:
        for server in self.servers:
            server.kill()

    def report(self, message: str) -> str:
        """An assertion message: what failed, the seed, and the tail of every server's log."""
        logs = "\n".join(server.tail() for server in self.servers)
        return f"{message} (seed={SEED}; {'; '.join(self.notes) or 'no kills'})\n{logs}"

    async def wait_for(
        self, check: Callable[[], Awaitable[Any]], what: str, timeout: float = RUN_TIMEOUT_S
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = await check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(self.report(f"timed out after {timeout}s waiting for {what}"))
            await asyncio.sleep(0.02)

    async def start_run(self, server: Server, actor: Actor, categories: list[str]) -> str:
        response = await self.http.post(
            f"{server.url}/collection/runs", json={"category_ids": categories}, headers=actor.headers
        )
        assert response.status_code == 201, response.text
        run_id: str = response.json()["id"]
        response = await self.http.post(f"{server.url}/collection/runs/{run_id}/start", headers=actor.headers)
        assert response.status_code == 200, response.text
        return run_id

    def calls(self) -> list[tuple[str, str, str]]:
        if not self.call_log.exists():
            return []
        rows = [line.split("\t") for line in self.call_log.read_text().splitlines() if line]
        return [(worker, source, query) for worker, source, query in rows]


@pytest.fixture
async def harness(migrated_dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with httpx.AsyncClient(timeout=10.0) as http:
        harness = Harness(migrated_dsn, tmp_path, http)
        try:
            yield harness
        finally:
            harness.kill_all()


class Watch:
    """Samples runs every ~50 ms while a test kills and restarts servers: processed_items never goes
    back, and what is spent plus reserved never passes the run's cap."""

    def __init__(self, db: asyncpg.Pool, *run_ids: str) -> None:
        self.db = db
        self.run_ids = list(run_ids)
        self.samples = 0
        self.processed: dict[str, int] = {}
        self.violations: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, run_id: str) -> None:
        self.run_ids.append(run_id)

    async def __aenter__(self) -> Watch:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _sample(self) -> None:
        while True:
            rows = await self.db.fetch(
                "select id::text, processed_items, actual_cost_cents, reserved_cents, budget_cap_cents "
                "from collection_runs where id = any($1::uuid[])",
                self.run_ids,
            )
            for row in rows:
                previous = self.processed.get(row["id"], 0)
                if row["processed_items"] < previous:
                    self.violations.append(
                        f"{row['id']}: processed_items {previous} -> {row['processed_items']}"
                    )
                self.processed[row["id"]] = row["processed_items"]
                if row["actual_cost_cents"] + row["reserved_cents"] > row["budget_cap_cents"]:
                    self.violations.append(f"{row['id']}: past the cap: {dict(row)}")
            self.samples += 1
            await asyncio.sleep(0.05)


# Units of work ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """A unit of work as the database holds it: a category's discovery (asin None) or an item."""

    category_id: str
    asin: str | None
    lease_owner: str | None
    lease_token: uuid.UUID | None
    lease_expires_at: datetime | None
    reserved_cents: int
    recorded: bool
    recorded_at: datetime | None  # an item's updated_at once recorded; a category's discovered_at
    worked_by: str | None  # items only

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.category_id, self.asin)

    @property
    def name(self) -> str:
        return self.asin or f"discovery of {self.category_id}"


UNITS_SQL = """
select category_id, asin, lease_owner, lease_token, lease_expires_at, reserved_cents,
       status <> 'pending' as recorded, case when status <> 'pending' then updated_at end as recorded_at,
       worked_by
  from collection_run_items where run_id = $1
union all
select category_id, null, lease_owner, lease_token, lease_expires_at, reserved_cents,
       discovered_at is not null, discovered_at, null
  from collection_run_categories where run_id = $1
"""


async def units_of(db: asyncpg.Pool, run_id: str) -> dict[tuple[str, str | None], Unit]:
    return {unit.key: unit for unit in (Unit(**row) for row in await db.fetch(UNITS_SQL, run_id))}


async def held_by(db: asyncpg.Pool, run_id: str, owner: str) -> list[Unit]:
    """The units of the run leased to `owner` now (whichever of its processes' tokens)."""
    units = (await units_of(db, run_id)).values()
    return [unit for unit in units if unit.lease_owner == owner and unit.lease_token is not None]


def names(units: Iterable[Unit]) -> list[str]:
    return sorted(unit.name for unit in units)


@dataclass
class Kill:
    """A SIGKILL and the units the killed process held, as it left them."""

    number: int
    worker: str
    killed_at: datetime
    held: list[Unit]

    @property
    def token(self) -> uuid.UUID | None:
        return self.held[0].lease_token if self.held else None

    @property
    def expires_at(self) -> datetime:
        """When the first of its units' leases expires."""
        return min(unit.lease_expires_at for unit in self.held if unit.lease_expires_at is not None)


async def kill(harness: Harness, db: asyncpg.Pool, server: Server, run_id: str, number: int) -> Kill:
    server.kill()
    killed_at = await db_now(db)
    await asyncio.sleep(0.2)  # a statement sent just before the kill (a record, a heartbeat) may still commit
    held = await held_by(db, run_id, server.worker_id)
    tokens = {unit.lease_token for unit in held}
    assert len(tokens) <= 1, harness.report(f"kill {number}: {server.worker_id} held units under {tokens}")
    return Kill(number, server.worker_id, killed_at, held)


# Reads ----------------------------------------------------------------------------------------------
async def run_row(db: asyncpg.Pool, run_id: str) -> asyncpg.Record:
    return await db.fetchrow("select * from collection_runs where id = $1", run_id)


async def db_now(db: asyncpg.Pool) -> datetime:
    now: datetime = await db.fetchval("select clock_timestamp()")
    return now


def expected_items(categories: list[str]) -> int:
    return sum(len(set(catalogue(category))) for category in categories)


async def events_of(db: asyncpg.Pool, run_id: str) -> list[tuple[str | None, str]]:
    rows = await db.fetch("select * from collection_run_events where run_id = $1 order by id", run_id)
    return [(row["from_status"], row["to_status"]) for row in rows]


async def first_item_by(db: asyncpg.Pool, run_id: str, worker: str) -> datetime | None:
    first: datetime | None = await db.fetchval(
        "select min(updated_at) from collection_run_items where run_id = $1 and worked_by = $2",
        run_id,
        worker,
    )
    return first


async def status_is(db: asyncpg.Pool, run_id: str, status: str) -> bool:
    return bool(await db.fetchval("select status = $2 from collection_runs where id = $1", run_id, status))


async def wait_completed(harness: Harness, db: asyncpg.Pool, run_id: str, what: str) -> None:
    """Wait for the run to complete; the failure message shows where it is instead."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not await status_is(db, run_id, "completed"):
        if time.monotonic() > deadline:
            units = (await units_of(db, run_id)).values()
            leased = [
                (unit.name, unit.lease_owner, unit.lease_expires_at) for unit in units if unit.lease_token
            ]
            raise AssertionError(
                harness.report(
                    f"timed out after {RUN_TIMEOUT_S}s waiting for {what}: {dict(await run_row(db, run_id))}"
                    f"\n{sum(not unit.recorded for unit in units)} units left, leased: {leased}"
                )
            )
        await asyncio.sleep(0.02)


async def assert_settled(
    harness: Harness, db: asyncpg.Pool, run_id: str, categories: list[str], end: str = "completed"
) -> asyncpg.Record:
    """The invariants of a run that ended after crashes: every item done or failed exactly once, the
    money adds up (known charges + uncertain ones), within the cap, nothing reserved, no unit still
    leased, and a history with no detour."""
    run = await run_row(db, run_id)
    items = await db.fetchrow(
        "select count(*) filter (where status = 'pending') as pending,"
        " count(*) filter (where status <> 'pending') as finished,"
        " count(*) filter (where status = 'failed') as failed, count(*) as total,"
        " coalesce(sum(cost_cents), 0) as cents"
        " from collection_run_items where run_id = $1",
        run_id,
    )
    discovery = await db.fetchrow(
        "select count(*) filter (where discovered_at is null) as undiscovered,"
        " coalesce(sum(discovery_cost_cents), 0) as cents,"
        " coalesce(array_agg(category_id) filter (where error is null), '{}') as found"
        " from collection_run_categories where run_id = $1",
        run_id,
    )
    units = (await units_of(db, run_id)).values()
    leased = [unit for unit in units if unit.lease_token is not None or unit.lease_owner is not None]
    state = harness.report(
        f"run {dict(run)}\nitems {dict(items)}\ndiscovery {dict(discovery)}\nleased {names(leased)}"
    )
    assert run["status"] == end, state
    if end == "completed":
        assert items["pending"] == 0 and discovery["undiscovered"] == 0, state
        assert run["processed_items"] == items["finished"] == run["total_items"] == items["total"], state
        assert run["failed_items"] == items["failed"], state
        # Every product of every category whose best-sellers page came back (an injected charged
        # failure can lose a whole category; it is recorded with its error and no products).
        assert items["total"] == expected_items(discovery["found"]), state
    else:
        assert run["processed_items"] == items["finished"], state
    assert run["actual_cost_cents"] == items["cents"] + discovery["cents"] + run["uncertain_cost_cents"], (
        state
    )
    assert run["actual_cost_cents"] <= run["budget_cap_cents"], state
    assert run["reserved_cents"] == 0 and sum(unit.reserved_cents for unit in units) == 0, state
    assert not leased, state
    history = [(None, "pending"), ("pending", "running"), ("running", end)]
    assert await events_of(db, run_id) == history, state
    return run


def calls_for(harness: Harness, categories: list[str]) -> list[tuple[str, str, str]]:
    """The logged calls made for these categories (a sandbox eBay query ends with the product's ASIN)."""
    asins = {asin for category in categories for asin in catalogue(category)}
    return [
        (worker, source, query)
        for worker, source, query in harness.calls()
        if (query in categories if source == "amazon_bestsellers" else query.rsplit(" ", 1)[-1] in asins)
    ]


def products_fetched(harness: Harness, categories: list[str]) -> Counter[str]:
    """How often each product of these categories was fetched (by any process)."""
    calls = calls_for(harness, categories)
    return Counter(query for _, source, query in calls if source == "amazon_product")


async def assert_calls_paid_for(harness: Harness, run: asyncpg.Record) -> Counter[str]:
    """Every logged call may have been charged; the run counts each of them, known or uncertain:
    logged <= actual <= logged + uncertain. Returns how often each ASIN was fetched."""
    calls = calls_for(harness, run["category_ids"])
    logged_cents = CALL_CENTS * len(calls)
    assert logged_cents <= run["actual_cost_cents"] <= logged_cents + run["uncertain_cost_cents"], (
        harness.report(f"{len(calls)} calls logged ({logged_cents} c) against {dict(run)}")
    )
    return products_fetched(harness, run["category_ids"])


def assert_redone_only_what_the_dead_held(harness: Harness, fetched: Counter[str], kills: list[Kill]) -> None:
    """A product fetched again is one a killed process held (its call made, its answer lost), at most
    once for each kill that caught it in flight."""
    caught = Counter(unit.asin for kill in kills for unit in kill.held if unit.asin is not None)
    redone = {asin: count - 1 for asin, count in fetched.items() if count > 1}
    beyond = {asin: n for asin, n in redone.items() if n > caught[asin]}
    assert not beyond, harness.report(f"fetched again though no killed process held them: {beyond}")


def assert_taken_over_only_after_the_lease(harness: Harness, final: dict[Any, Unit], dead: Kill) -> None:
    """Each unit the killed process held was recorded, by another process, only once its lease had
    expired."""
    for unit in dead.held:
        now = final[unit.key]
        assert unit.lease_expires_at is not None
        assert now.recorded and now.recorded_at is not None, harness.report(f"{unit.name} never recorded")
        assert now.worked_by != dead.worker, harness.report(f"{unit.name} recorded by the dead {dead.worker}")
        assert now.recorded_at >= unit.lease_expires_at, harness.report(
            f"kill {dead.number}: {unit.name}, leased to the dead {dead.worker} until "
            f"{unit.lease_expires_at}, recorded by {now.worked_by} at {now.recorded_at}"
        )


# Crashes --------------------------------------------------------------------------------------------
class TestCrashRestart:
    categories = ["garden", "books", "tools", "pets"]  # 209 products
    kills = 4

    async def _crash_and_restart(
        self, harness: Harness, db: asyncpg.Pool, world: World, same_worker: bool, **env: str
    ) -> tuple[str, list[str], list[Kill], Watch]:
        rng = random.Random(SEED if same_worker else SEED + 1)
        admin = await world.admin()
        env["LEASE_TTL_S"] = str(LONG_LEASE_S if same_worker else TAKEOVER_LEASE_S)
        server = await harness.start("crash-1", **env)
        run_id = await harness.start_run(server, admin, self.categories)
        total = expected_items(self.categories)
        workers = [server.worker_id]
        kills: list[Kill] = []
        async with Watch(db, run_id) as watch:
            await harness.wait_for(lambda: held_by(db, run_id, server.worker_id), "the first units")
            for number in range(1, self.kills + 1):
                delay = rng.uniform(0.2, 1.2)
                await asyncio.sleep(delay)
                dead = await kill(harness, db, server, run_id, number)
                kills.append(dead)
                row = await run_row(db, run_id)
                harness.notes.append(
                    f"kill {number} {delay:.2f}s in, at {row['processed_items']} items, "
                    f"holding {names(dead.held)}"
                )
                assert row["status"] == "running" and row["processed_items"] < total, harness.report(
                    f"kill {number} came after the run had ended: slow the sandbox down; {dict(row)}"
                )
                # Three workers, each always on a unit or about to take one: a kill finds some held.
                assert dead.held, harness.report(f"kill {number}: {dead.worker} held no unit")
                if same_worker:
                    await harness.restart(server)

                    async def taken_back(server: Server = server, dead: Kill = dead) -> list[Unit] | None:
                        now = await units_of(db, run_id)
                        back = [now[unit.key] for unit in dead.held]
                        mine = all(
                            unit.recorded
                            or (unit.lease_owner == server.worker_id and unit.lease_token != dead.token)
                            for unit in back
                        )
                        return back if mine else None

                    await harness.wait_for(taken_back, f"its units back after kill {number}")
                    back_at = await db_now(db)
                    # Its own units: taken back at once, long before the dead process's leases expire.
                    assert back_at < dead.expires_at, harness.report(
                        f"kill {number}: units back at {back_at}, their leases ran until {dead.expires_at}"
                    )
                else:
                    server = await harness.start(f"crash-{number + 1}", **env)
                    workers.append(server.worker_id)
                    first = await harness.wait_for(
                        lambda server=server: first_item_by(db, run_id, server.worker_id),
                        f"{server.worker_id}'s first item",
                    )
                    # The rest of the run goes on at once: only the dead process's units wait.
                    assert first < dead.expires_at, harness.report(
                        f"kill {number}: {server.worker_id}'s first item at {first}, after the dead "
                        f"process's leases expired ({dead.expires_at}): it waited for them"
                    )
            await wait_completed(harness, db, run_id, "the run to complete")
        return run_id, workers, kills, watch

    async def _check(
        self, harness: Harness, db: asyncpg.Pool, run_id: str, kills: list[Kill], watch: Watch
    ) -> asyncpg.Record:
        assert not watch.violations, harness.report(f"while killing: {watch.violations}")
        assert watch.samples > 20
        run = await assert_settled(harness, db, run_id, self.categories)
        items = await db.fetch(
            "select asin, status, attempts, cost_cents, last_error"
            " from collection_run_items where run_id = $1",
            run_id,
        )
        fetched = products_fetched(harness, self.categories)
        assert set(fetched) == {item["asin"] for item in items}
        # At most the units in flight at each kill were done again, and only their reservations are
        # uncertain: what each dead process held, exactly.
        assert_redone_only_what_the_dead_held(harness, fetched, kills)
        redone = sum(count - 1 for count in fetched.values())
        assert redone <= self.kills * MAX_IN_FLIGHT, harness.report(f"{redone} items fetched again")
        # No process held more units than it may have calls in flight.
        assert all(len(dead.held) <= MAX_IN_FLIGHT for dead in kills), harness.report("too many units held")
        await assert_calls_paid_for(harness, run)
        held_cents = sum(unit.reserved_cents for dead in kills for unit in dead.held)
        assert run["uncertain_cost_cents"] == held_cents, harness.report(
            f"uncertain {run['uncertain_cost_cents']} c, the killed processes held {held_cents} c"
        )
        # An item is counted once: the attempts of the dead process never reached the database. A
        # charged failure ends the item (failed after its product call or after its eBay search).
        for item in items:
            outcome = (item["status"], item["attempts"], item["cost_cents"])
            if item["status"] == "done":
                assert outcome == ("done", 2, ITEM_CENTS), dict(item)
            else:
                assert outcome in {("failed", 1, CALL_CENTS), ("failed", 2, ITEM_CENTS)}, dict(item)
                assert "404" in item["last_error"], dict(item)
        return run

    async def test_sigkill_at_random_points_and_the_same_worker_takes_its_units_back_at_once(
        self, harness: Harness, db: asyncpg.Pool, world: World
    ) -> None:
        run_id, _, kills, watch = await self._crash_and_restart(harness, db, world, same_worker=True)
        await self._check(harness, db, run_id, kills, watch)

    async def test_sigkill_and_another_worker_takes_the_dead_units_only_after_their_lease(
        self, harness: Harness, db: asyncpg.Pool, world: World
    ) -> None:
        # With charged failures injected too: failed items are counted once and paid for once.
        run_id, workers, kills, watch = await self._crash_and_restart(
            harness, db, world, same_worker=False, SANDBOX_CHARGED_FAILURE_RATE="0.03"
        )
        run = await self._check(harness, db, run_id, kills, watch)
        assert run["failed_items"] > 0
        final = await units_of(db, run_id)
        for dead in kills:
            assert_taken_over_only_after_the_lease(harness, final, dead)
        worked_by = {
            row["worked_by"]
            for row in await db.fetch(
                "select distinct worked_by from collection_run_items where run_id = $1", run_id
            )
        }
        assert worked_by == set(workers), harness.report(f"items worked by {worked_by}, workers {workers}")


# Replicas -------------------------------------------------------------------------------------------
class TestReplicas:
    async def test_replicas_share_each_run_item_by_item_and_a_survivor_finishes_a_killed_ones_units(
        self, harness: Harness, db: asyncpg.Pool, world: World
    ) -> None:
        acme, globex = await world.admin("acme"), await world.admin("globex")
        env = {"LEASE_TTL_S": str(TAKEOVER_LEASE_S)}
        alpha, beta = await asyncio.gather(harness.start("alpha", **env), harness.start("beta", **env))
        batches = [(acme, ["toys"]), (globex, ["office"]), (acme, ["kitchen"]), (globex, ["auto"])]
        runs = [
            await harness.start_run(server, actor, categories)
            for (actor, categories), server in zip(batches, [alpha, beta, alpha, beta], strict=True)
        ]

        async with Watch(db, *runs) as watch:
            for run_id in runs:
                await wait_completed(harness, db, run_id, f"run {run_id}")

            # No failures injected, no kills: each product was fetched exactly once, by one process,
            # and that process is the one its item records.
            calls = harness.calls()
            products = Counter(query for _, source, query in calls if source == "amazon_product")
            twice = {asin: n for asin, n in products.items() if n != 1}
            assert not twice, harness.report(f"fetched more than once: {twice}")
            searches = Counter(query for _, source, query in calls if source == "ebay_search")
            assert set(searches.values()) == {1}, harness.report(f"searched again: {searches}")
            pages = Counter(query for _, source, query in calls if source == "amazon_bestsellers")
            assert pages == Counter(category for _, batch in batches for category in batch)
            fetched_by = {query: worker for worker, source, query in calls if source == "amazon_product"}
            searched_by = {
                query.rsplit(" ", 1)[-1]: worker for worker, source, query in calls if source == "ebay_search"
            }
            assert searched_by == fetched_by
            items = await db.fetch(
                "select run_id::text, asin, worked_by from collection_run_items"
                " where run_id = any($1::uuid[])",
                runs,
            )
            assert len(items) == expected_items([c for _, batch in batches for c in batch]) == len(products)
            assert {item["asin"]: item["worked_by"] for item in items} == fetched_by
            # A run is not a process's: each of them was worked by both, side by side.
            for run_id in runs:
                by = Counter(item["worked_by"] for item in items if item["run_id"] == run_id)
                assert set(by) == {"alpha", "beta"}, harness.report(f"run {run_id} worked by {by}")
            for run_id, (_, categories) in zip(runs, batches, strict=True):
                run = await assert_settled(harness, db, run_id, categories)
                assert run["uncertain_cost_cents"] == 0

            # A fresh run: kill one replica while both work it; the survivor goes on with the rest at
            # once, and does the killed replica's units once their leases expire.
            categories = ["garden", "tools"]
            fresh = await harness.start_run(beta, acme, categories)
            watch.add(fresh)
            victim, survivor = (alpha, beta) if random.Random(SEED + 2).random() < 0.5 else (beta, alpha)

            async def working() -> bool:
                row = await run_row(db, fresh)
                return row["processed_items"] >= 10 and bool(await held_by(db, fresh, victim.worker_id))

            await harness.wait_for(working, f"{victim.worker_id} to work the fresh run")
            dead = await kill(harness, db, victim, fresh, 1)
            harness.notes.append(f"killed {victim.worker_id} holding {names(dead.held)}")
            row = await run_row(db, fresh)
            assert row["status"] == "running" and dead.held, harness.report(
                f"the fresh run ended before the kill, or {victim.worker_id} held nothing: {dict(row)}"
            )
            await wait_completed(harness, db, fresh, "the survivor to finish the run")

        assert not watch.violations, harness.report(f"{watch.violations}")
        final = await units_of(db, fresh)
        assert_taken_over_only_after_the_lease(harness, final, dead)
        meanwhile = [
            unit
            for unit in final.values()
            if unit.worked_by == survivor.worker_id
            and unit.recorded_at is not None
            and dead.killed_at < unit.recorded_at < dead.expires_at
        ]
        assert meanwhile, harness.report(f"{survivor.worker_id} recorded nothing until {dead.expires_at}")
        late = [
            unit
            for unit in final.values()
            if unit.worked_by == victim.worker_id and unit.recorded_at and unit.recorded_at > dead.killed_at
        ]
        assert not late, harness.report(f"recorded by the dead {victim.worker_id}: {names(late)}")
        run = await assert_settled(harness, db, fresh, categories)
        assert run["uncertain_cost_cents"] == sum(unit.reserved_cents for unit in dead.held)
        fetched = await assert_calls_paid_for(harness, run)
        assert_redone_only_what_the_dead_held(harness, fetched, [dead])


# Budget across a crash ------------------------------------------------------------------------------
class TestBudgetAcrossCrash:
    async def test_run_pauses_at_the_cap_counting_what_the_dead_process_had_in_flight(
        self, harness: Harness, db: asyncpg.Pool, world: World
    ) -> None:
        admin = await world.admin()
        server = await harness.start("budget", LEASE_TTL_S=str(TAKEOVER_LEASE_S))
        categories = ["garden", "tools"]
        need = len(categories) * CALL_CENTS + expected_items(categories) * ITEM_CENTS
        cap = need // 2 + 3  # not a multiple of an item's price: the last reservation cannot fit exactly
        run_id = await harness.start_run(server, admin, categories)
        await db.execute("update collection_runs set budget_cap_cents = $2 where id = $1", run_id, cap)

        async with Watch(db, run_id) as watch:
            await harness.wait_for(
                lambda: db.fetchval(
                    "select actual_cost_cents >= $2 from collection_runs where id = $1", run_id, cap // 3
                ),
                "a third of the cap spent",
            )
            dead = await kill(harness, db, server, run_id, 1)
            harness.notes.append(f"killed holding {names(dead.held)}")
            row = await run_row(db, run_id)
            assert row["status"] == "running" and dead.held, harness.report(
                f"not running at the kill, or nothing held: {dict(row)}"
            )
            await harness.restart(server)

            async def paused() -> bool:
                row = await run_row(db, run_id)
                held = await held_by(db, run_id, server.worker_id)
                return row["status"] == "paused" and row["reserved_cents"] == 0 and not held

            await harness.wait_for(paused, "the run to pause at the cap")
        assert not watch.violations, harness.report(f"{watch.violations}")
        run = await assert_settled(harness, db, run_id, categories, end="paused")
        assert run["status_reason"] == "budget_exhausted"
        assert run["budget_cap_cents"] == cap
        # What the dead process had in flight may have been charged: counted, as uncertain.
        assert run["uncertain_cost_cents"] == sum(unit.reserved_cents for unit in dead.held) > 0, (
            harness.report(f"{dict(run)}")
        )
        # Paused because the next item would not fit: within one item's price of the cap.
        assert cap - ITEM_CENTS < run["actual_cost_cents"] <= cap, harness.report(f"{dict(run)}")
        assert 0 < run["processed_items"] < expected_items(categories)
        reason = await db.fetchval(
            "select reason from collection_run_events where run_id = $1 order by id desc limit 1", run_id
        )
        assert reason == "budget_exhausted"
        await assert_calls_paid_for(harness, run)  # the provider never charged past the cap


# Graceful shutdown ----------------------------------------------------------------------------------
async def follow_events(http: httpx.AsyncClient, url: str, actor: Actor, lines: list[str]) -> None:
    """Read a run's Server-Sent Events until the server ends the stream (or goes away)."""
    try:
        async with http.stream("GET", url, headers=actor.headers, timeout=None) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                lines.append(line)
    except httpx.TransportError:
        pass


async def book_the_next_second(db: asyncpg.Pool, run_id: str) -> tuple[datetime, set[Any]]:
    """The account's next second taken, as by another process (collection_take_slot moves the
    account's next slot on): a unit handed out from now on waits for its first call until then.
    Returns when, and the units leased at that moment (handed out before it: their calls under way).
    One transaction: a hand-out that waits for the account's row is judged on the new time."""
    async with db.acquire() as conn, conn.transaction():
        booked_at: datetime = await conn.fetchval(
            "update collection_rate_limits set next_at = clock_timestamp() + interval '1 second'"
            " where name = 'provider' returning clock_timestamp()"
        )
        assert booked_at is not None, "no account limit configured"
        rows = await conn.fetch(UNITS_SQL, run_id)
    return booked_at, {Unit(**row).key for row in rows if row["lease_token"] is not None}


class TestGracefulShutdown:
    @pytest.mark.parametrize(
        ("sig", "watched"),
        [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGTERM, True)],
        ids=["SIGTERM", "SIGINT", "SIGTERM-while-a-client-follows-the-run"],
    )
    async def test_a_stop_signal_finishes_calls_in_flight_and_gives_waiting_units_back(
        self, harness: Harness, db: asyncpg.Pool, world: World, sig: signal.Signals, watched: bool
    ) -> None:
        admin = await world.admin()
        # Calls of 150-450 ms, two an item: a unit under way when the signal is sent still is when the
        # process acts on it.
        first = await harness.start("graceful-1", LEASE_TTL_S=str(LONG_LEASE_S), SANDBOX_LATENCY_MS="300")
        categories = ["garden", "tools"]  # about 20 s of work at this latency: far longer than a stop
        run_id = await harness.start_run(first, admin, categories)
        lines: list[str] = []
        follower = None
        if watched:
            # A progress page open on the run (GET .../events) must not hold the shutdown up.
            url = f"{first.url}/collection/runs/{run_id}/events"
            follower = asyncio.create_task(follow_events(harness.http, url, admin, lines))
        try:
            async with Watch(db, run_id) as watch:
                await harness.wait_for(
                    lambda: db.fetchval(
                        "select processed_items >= 5 from collection_runs where id = $1", run_id
                    ),
                    "5 items done",
                )
                if watched:
                    await harness.wait_for(lambda: asyncio.sleep(0, lines), "the first progress event")

                # The signal when the process has units of both kinds: calls under way (handed out
                # before the booking) and units waiting for their first call's slot (handed out after).
                for _ in range(5):
                    booked_at, under_way = await book_the_next_second(db, run_id)
                    deadline = time.monotonic() + 0.4  # the waiting units' slot comes 1 s after the booking
                    while time.monotonic() < deadline:
                        held = await held_by(db, run_id, first.worker_id)
                        going = [unit for unit in held if unit.key in under_way]
                        waiting = [unit for unit in held if unit.key not in under_way]
                        if going and waiting:
                            break
                        await asyncio.sleep(0.01)
                    else:
                        await asyncio.sleep(0.8)  # until the booked second has passed
                        continue
                    break
                else:
                    raise AssertionError(harness.report("never saw calls under way and units waiting"))
                signalled_at = await db_now(db)
                harness.notes.append(
                    f"{sig.name} {(signalled_at - booked_at).total_seconds():.2f}s after the booking: "
                    f"under way {names(going)}, waiting {names(waiting)}"
                )
                took = await first.interrupt(sig)
                row = await run_row(db, run_id)
                now = await units_of(db, run_id)
                leased = [unit for unit in now.values() if unit.lease_token is not None]
                state = harness.report(
                    f"{sig.name}: exited after {took:.1f}s; the run is now {dict(row)}; "
                    f"leased {names(leased)}"
                )
                assert took < 3.0, state
                # Uvicorn shuts down cleanly, then re-raises the signal it caught (so the exit says why).
                assert first.process is not None and first.process.returncode in (0, -sig), state
                assert "Application shutdown complete" in first.logs[-1].read_text(), state
                assert row["status"] == "running" and row["processed_items"] < expected_items(categories), (
                    state
                )
                assert not leased and row["reserved_cents"] == 0, state
                # Nothing abandoned: units under way were finished and recorded ...
                assert row["uncertain_cost_cents"] == 0, state
                for unit in going:
                    assert now[unit.key].recorded, harness.report(f"{unit.name} under way, not recorded")
                # ... and units waiting for their first call were given back untouched.
                queried = {query for worker, _, query in harness.calls() if worker == first.worker_id}
                for unit in waiting:
                    assert not now[unit.key].recorded, harness.report(f"{unit.name} was waiting, recorded")
                    assert (unit.asin or unit.category_id) not in queried, harness.report(
                        f"{unit.name} was waiting for its slot, yet called"
                    )

                second = await harness.start("graceful-2", LEASE_TTL_S=str(LONG_LEASE_S))
                went_on = await harness.wait_for(
                    lambda: first_item_by(db, run_id, second.worker_id), "graceful-2's first item"
                )
                leases = min(unit.lease_expires_at for unit in going + waiting if unit.lease_expires_at)
                assert went_on < leases, harness.report(
                    f"graceful-2's first item at {went_on}: waited for the leases given up ({leases})"
                )
                await wait_completed(harness, db, run_id, "the run to complete")
        finally:
            if follower is not None:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)

        assert not watch.violations, harness.report(f"{watch.violations}")
        final = await units_of(db, run_id)
        # The units given back went on at once under another worker id: no lease to wait for.
        for unit in waiting:
            assert unit.lease_expires_at is not None
            after = final[unit.key]
            assert after.recorded_at is not None and after.recorded_at < unit.lease_expires_at, (
                harness.report(
                    f"{unit.name} recorded at {after.recorded_at}: "
                    f"waited for the lease until {unit.lease_expires_at}"
                )
            )
        run = await assert_settled(harness, db, run_id, categories)
        assert run["uncertain_cost_cents"] == 0
        fetched = await assert_calls_paid_for(harness, run)
        assert set(fetched.values()) == {1}, "a graceful stop redoes nothing"
        pages = Counter(
            query for _, source, query in calls_for(harness, categories) if source == "amazon_bestsellers"
        )
        assert set(pages.values()) == {1}
        workers = Counter(
            row["worked_by"]
            for row in await db.fetch("select worked_by from collection_run_items where run_id = $1", run_id)
        )
        assert set(workers) == {"graceful-1", "graceful-2"}

    async def test_calls_longer_than_the_lease_that_end_in_the_grace_time_stay_ours(
        self, harness: Harness, db: asyncpg.Pool, world: World
    ) -> None:
        # The heartbeat goes on through the grace time: a replica must not take over the units whose
        # calls are finishing there (they would be done, and paid for, twice).
        admin = await world.admin()
        lease = {"LEASE_TTL_S": "2", "EXECUTOR_TICK_S": "0.2"}
        first = await harness.start("hold-1", **lease, SANDBOX_LATENCY_MS="2000", SHUTDOWN_GRACE_S="12")
        # The replica is up before the run starts, so SIGTERM follows the items' first calls at once
        # (a replica started after them could take longer than an item on a slow machine).
        second = await harness.start("hold-2", **lease)
        categories = ["garden"]
        run_id = await harness.start_run(first, admin, categories)

        async def items_under_way() -> list[Unit] | None:
            held = await held_by(db, run_id, first.worker_id)
            return held if len([unit for unit in held if unit.asin]) == MAX_IN_FLIGHT else None

        # Each held item is two calls of 1-3 s, begun just now: they outlive a lease, not the grace time.
        held = await harness.wait_for(items_under_way, "items under way")
        took = await first.interrupt(signal.SIGTERM, timeout=20)
        log = first.logs[-1].read_text()
        now = await units_of(db, run_id)
        state = harness.report(f"SIGTERM after {took:.1f}s; held {names(held)}")
        assert took > 2.0, state  # the calls outlived a lease: the case under test happened
        assert "taken over" not in log and "abandoned" not in log, state
        assert all(now[unit.key].recorded for unit in held), state
        assert all(now[unit.key].worked_by == first.worker_id for unit in held if unit.asin), state
        await wait_completed(harness, db, run_id, "hold-2 to complete the run")
        run = await assert_settled(harness, db, run_id, categories)
        assert run["uncertain_cost_cents"] == 0
        fetched = products_fetched(harness, categories)
        assert max(fetched.values()) == 1, harness.report(f"fetched twice: {fetched.most_common(3)}")
        assert second.alive

    async def test_calls_slower_than_the_grace_time_are_abandoned_and_their_units_released_at_once(
        self, harness: Harness, db: asyncpg.Pool, world: World
    ) -> None:
        # Like an Oxylabs call (up to OXYLABS_TIMEOUT_S, 60 s) outliving SHUTDOWN_GRACE_S (10 s).
        admin = await world.admin()
        first = await harness.start(
            "slow-1", LEASE_TTL_S=str(LONG_LEASE_S), SANDBOX_LATENCY_MS="2000", SHUTDOWN_GRACE_S="0.5"
        )
        categories = ["garden"]
        run_id = await harness.start_run(first, admin, categories)

        async def items_under_way() -> list[Unit] | None:
            held = await held_by(db, run_id, first.worker_id)
            return held if len([unit for unit in held if unit.asin]) == MAX_IN_FLIGHT else None

        # Every worker on an item of two calls of 1-3 s each, begun just now: none can finish within
        # the grace time, and no other unit is handed out before one does.
        held = await harness.wait_for(items_under_way, "items under way")
        took = await first.interrupt(signal.SIGTERM)
        row = await run_row(db, run_id)
        now = await units_of(db, run_id)
        leased = [unit for unit in now.values() if unit.lease_token is not None]
        state = harness.report(
            f"SIGTERM: exited after {took:.1f}s; the run is now {dict(row)}; held {names(held)}, "
            f"leased {names(leased)}"
        )
        assert took < 3.0, state
        assert "abandoned" in first.logs[-1].read_text(), state
        # The abandoned calls may have been charged: their reservations become uncertain charges, and
        # their units are given back rather than left to their leases.
        assert row["status"] == "running" and row["reserved_cents"] == 0, state
        assert not leased, state
        assert all(not now[unit.key].recorded for unit in held), state
        assert row["uncertain_cost_cents"] == sum(unit.reserved_cents for unit in held) >= 2 * ITEM_CENTS, (
            state
        )

        second = await harness.start("slow-2", LEASE_TTL_S=str(LONG_LEASE_S))

        async def taken() -> bool:
            now = await units_of(db, run_id)
            return all(
                now[unit.key].recorded or now[unit.key].lease_owner == second.worker_id for unit in held
            )

        await harness.wait_for(taken, "slow-2 to take the abandoned units")
        taken_at = await db_now(db)
        expires = min(unit.lease_expires_at for unit in held if unit.lease_expires_at is not None)
        assert taken_at < expires, harness.report(
            f"taken at {taken_at}: waited for the leases slow-1 held until {expires}"
        )
        await wait_completed(harness, db, run_id, "the run to complete")
        run = await assert_settled(harness, db, run_id, categories)
        assert run["uncertain_cost_cents"] == sum(unit.reserved_cents for unit in held)
        await assert_calls_paid_for(harness, run)
