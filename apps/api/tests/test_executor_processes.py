"""The executor across real server processes (`python -m app.cli serve`) on one database: SIGKILL at
random points with restarts under the same and under another worker id, two replicas side by side,
the budget across a crash, and graceful shutdown. (In-process behaviour: test_executor.py.)

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
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.config import Settings
from app.providers.sandbox import catalogue
from conftest import JWT_ISSUER, JWT_SECRET, REPO_ROOT, Actor, World, free_port

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("EXECUTOR_CRASH_SEED", "20261125"))
START_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 45.0
SHORT_LEASE_S = 2  # the minimum: a dead replica's runs are taken over quickly
# Long enough that "taken back at once" and "waited for the lease" cannot be confused.
LONG_LEASE_S = 10
ITEMS_IN_FLIGHT = 3
CALL_CENTS = 5  # every sandbox call (best sellers, product, eBay search) at the default prices
ITEM_CENTS = 2 * CALL_CENTS

# About 25 items a second per run on this machine (two calls of 25-75 ms each, 3 items at a time): a
# 200-item run lasts about 8 s, longer than the work four kills at most 1.5 s apart let it do.
BASE_ENV = {
    "SANDBOX_LATENCY_MS": "50",
    "EXECUTOR_TICK_S": "0.1",
    "PROVIDER_BACKOFF_S": "0",
    "PROVIDER_RATE_PER_S": "0",
    "ITEMS_IN_FLIGHT_PER_RUN": str(ITEMS_IN_FLIGHT),
    "LOG_LEVEL": "INFO",
    "PYTHONUNBUFFERED": "1",
}


class Server:
    """One `python -m app.cli serve` process under a fixed WORKER_ID and port; it can be killed and
    started again. Each start writes its output to its own file (a full pipe cannot stall it)."""

    def __init__(self, worker_id: str, dsn: str, log_dir: Path, call_log: Path, **env: str) -> None:
        self.worker_id = worker_id
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        # Nothing of ours from the outer environment: only what this test sets.
        ours = {name.upper() for name in Settings.model_fields}
        self.env = {k: v for k, v in os.environ.items() if k.upper() not in ours}
        self.env.update(
            BASE_ENV,
            DATABASE_URL=dsn,
            SUPABASE_JWT_SECRET=JWT_SECRET,
            SUPABASE_JWT_ISSUER=JWT_ISSUER,
            HOST="127.0.0.1",
            PORT=str(self.port),
            WORKER_ID=worker_id,
            SANDBOX_CALL_LOG=str(call_log),
        )
        self.env.update(env)
        self.process: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        assert not self.alive, f"{self.worker_id} is already running"
        path = self.log_dir / f"{self.worker_id}-{len(self.logs) + 1}.log"
        self.logs.append(path)
        with path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve"],
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def wait_healthy(self, http: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.worker_id} exited with {self.process.returncode}:\n{self.tail()}"
                )
            try:
                if (await http.get(f"{self.url}/healthz", timeout=1.0)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.worker_id} not healthy after {START_TIMEOUT_S}s:\n{self.tail()}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, whatever was in flight is simply lost."""
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    async def interrupt(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> float:
        """Send `sig` and wait for the exit; returns how long the process took to exit."""
        assert self.process is not None and self.alive
        sent = time.monotonic()
        self.process.send_signal(sig)
        while self.process.poll() is None:
            if time.monotonic() - sent > timeout:
                self.kill()
                raise AssertionError(f"{self.worker_id} still running {timeout}s after {sig.name}")
            await asyncio.sleep(0.02)
        return time.monotonic() - sent

    def tail(self, lines: int = 25) -> str:
        out = []
        for path in self.logs[-2:]:
            text = path.read_text(errors="replace").splitlines() if path.exists() else []
            out.append(f"--- {path.name} (last {lines} lines)\n" + "\n".join(text[-lines:]))
        return "\n".join(out)


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
            await asyncio.sleep(0.05)

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


async def new_lease(db: asyncpg.Pool, run_id: str, owner: str, old_token: Any) -> asyncpg.Record | None:
    """The run's row once `owner` holds it under a token other than `old_token`."""
    row = await run_row(db, run_id)
    if row["lease_owner"] == owner and row["lease_token"] not in (None, old_token):
        return row
    return None


async def assert_settled(
    harness: Harness, db: asyncpg.Pool, run_id: str, categories: list[str], end: str = "completed"
) -> asyncpg.Record:
    """The invariants of a run that ended after crashes: every item done or failed exactly once, the
    money adds up (known charges + uncertain ones), within the cap, nothing reserved, lease released,
    and a history with no detour."""
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
    state = harness.report(f"run {dict(run)}\nitems {dict(items)}\ndiscovery {dict(discovery)}")
    assert run["status"] == end, state
    if end == "completed":
        assert items["pending"] == 0 and discovery["undiscovered"] == 0, state
        assert run["processed_items"] == items["finished"] == run["total_items"] == items["total"], state
        assert run["failed_items"] == items["failed"], state
        # Every product of every category whose best-sellers page came back (an injected charged
        # failure can lose a whole category; it is recorded with its error and no products).
        assert items["total"] == expected_items(discovery["found"]), state
    assert run["actual_cost_cents"] == items["cents"] + discovery["cents"] + run["uncertain_cost_cents"], (
        state
    )
    assert run["actual_cost_cents"] <= run["budget_cap_cents"], state
    assert run["reserved_cents"] == 0, state
    assert run["lease_token"] is None and run["lease_owner"] is None and run["lease_expires_at"] is None, (
        state
    )
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


async def assert_calls_paid_for(harness: Harness, run: asyncpg.Record) -> Counter[str]:
    """Every logged call may have been charged; the run counts each of them, known or uncertain:
    logged <= actual <= logged + uncertain. Returns how often each ASIN was fetched."""
    calls = calls_for(harness, run["category_ids"])
    logged_cents = CALL_CENTS * len(calls)
    assert logged_cents <= run["actual_cost_cents"] <= logged_cents + run["uncertain_cost_cents"], (
        harness.report(f"{len(calls)} calls logged ({logged_cents} c) against {dict(run)}")
    )
    return Counter(query for _, source, query in calls if source == "amazon_product")


# Crashes --------------------------------------------------------------------------------------------
class TestCrashRestart:
    categories = ["garden", "books", "tools", "pets"]  # 209 products
    kills = 4

    async def _crash_and_restart(
        self, harness: Harness, db: asyncpg.Pool, world: World, same_worker: bool, **env: str
    ) -> tuple[str, list[str], Watch]:
        rng = random.Random(SEED if same_worker else SEED + 1)
        admin = await world.admin()
        env["LEASE_TTL_S"] = str(LONG_LEASE_S if same_worker else SHORT_LEASE_S)
        lease = int(env["LEASE_TTL_S"])
        server = await harness.start("crash-1", **env)
        run_id = await harness.start_run(server, admin, self.categories)
        total = expected_items(self.categories)
        workers = [server.worker_id]
        async with Watch(db, run_id) as watch:
            held = await harness.wait_for(
                lambda: new_lease(db, run_id, server.worker_id, None), "first claim"
            )
            for kill in range(1, self.kills + 1):
                delay = rng.uniform(0.2, 1.5)
                await asyncio.sleep(delay)
                server.kill()
                killed_at = await db_now(db)
                await asyncio.sleep(0.2)  # a heartbeat sent just before the kill may still commit
                row = await run_row(db, run_id)
                harness.notes.append(
                    f"kill {kill} {delay:.2f}s after the claim, at {row['processed_items']} items"
                )
                assert row["status"] == "running" and row["processed_items"] < total, harness.report(
                    f"kill {kill} came after the run had ended: slow the sandbox down; {dict(row)}"
                )
                if same_worker:
                    await harness.restart(server)
                else:
                    server = await harness.start(f"crash-{kill + 1}", **env)
                    workers.append(server.worker_id)
                new = await harness.wait_for(
                    lambda server=server, held=held: new_lease(
                        db, run_id, server.worker_id, held["lease_token"]
                    ),
                    f"{server.worker_id} to claim the run after kill {kill}",
                )
                claimed_at = await db_now(db)
                if same_worker:
                    # Its own run: taken back at once, long before the dead process's lease expires.
                    assert claimed_at < row["lease_expires_at"], harness.report(
                        f"kill {kill}: reclaimed at {claimed_at}, old lease until {row['lease_expires_at']}"
                    )
                else:
                    first = await harness.wait_for(
                        lambda server=server: first_item_by(db, run_id, server.worker_id),
                        f"{server.worker_id}'s first item",
                    )
                    waited = (first - killed_at).total_seconds()
                    assert first >= row["lease_expires_at"] and waited >= lease - 0.5, harness.report(
                        f"kill {kill}: {server.worker_id} recorded an item {waited:.2f}s after the kill, "
                        f"before the dead process's lease (until {row['lease_expires_at']}) expired"
                    )
                held = new
            await harness.wait_for(lambda: status_is(db, run_id, "completed"), "the run to complete")
        return run_id, workers, watch

    async def _check(self, harness: Harness, db: asyncpg.Pool, run_id: str, watch: Watch) -> asyncpg.Record:
        assert not watch.violations, harness.report(f"while killing: {watch.violations}")
        assert watch.samples > 20
        run = await assert_settled(harness, db, run_id, self.categories)
        fetched = await assert_calls_paid_for(harness, run)
        items = await db.fetch(
            "select asin, status, attempts, cost_cents, last_error"
            " from collection_run_items where run_id = $1",
            run_id,
        )
        assert set(fetched) == {item["asin"] for item in items}
        # At most the items in flight at each kill were done again, and only their calls are uncertain.
        redone = sum(count - 1 for count in fetched.values())
        assert redone <= self.kills * ITEMS_IN_FLIGHT, harness.report(f"{redone} items fetched again")
        assert run["uncertain_cost_cents"] <= self.kills * (ITEMS_IN_FLIGHT * ITEM_CENTS + CALL_CENTS)
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

    async def test_sigkill_at_random_points_and_the_same_worker_takes_its_run_back_at_once(
        self, harness: Harness, db: asyncpg.Pool, world: World
    ) -> None:
        run_id, _, watch = await self._crash_and_restart(harness, db, world, same_worker=True)
        await self._check(harness, db, run_id, watch)

    async def test_sigkill_and_another_worker_takes_over_only_after_the_lease_expires(
        self, harness: Harness, db: asyncpg.Pool, world: World
    ) -> None:
        # With charged failures injected too: failed items are counted once and paid for once.
        run_id, workers, watch = await self._crash_and_restart(
            harness, db, world, same_worker=False, SANDBOX_CHARGED_FAILURE_RATE="0.03"
        )
        run = await self._check(harness, db, run_id, watch)
        assert run["failed_items"] > 0
        worked_by = {
            row["worked_by"]
            for row in await db.fetch(
                "select distinct worked_by from collection_run_items where run_id = $1", run_id
            )
        }
        assert worked_by == set(workers), harness.report(f"items worked by {worked_by}, workers {workers}")


# Two replicas ---------------------------------------------------------------------------------------
class TestTwoReplicas:
    async def test_no_item_is_worked_by_both_and_the_survivor_finishes_a_killed_replicas_run(
        self, harness: Harness, db: asyncpg.Pool, world: World
    ) -> None:
        admin = await world.admin()
        env = {"LEASE_TTL_S": str(SHORT_LEASE_S), "RUNS_PER_PROCESS": "2"}
        alpha, beta = await asyncio.gather(harness.start("alpha", **env), harness.start("beta", **env))
        response = await harness.http.patch(
            f"{alpha.url}/collection/settings", json={"max_concurrent_runs": 10}, headers=admin.headers
        )
        assert response.status_code == 200, response.text
        batches = [["toys"], ["kitchen"], ["office"], ["auto"]]
        runs = [await harness.start_run(alpha, admin, categories) for categories in batches]

        async with Watch(db, *runs) as watch:
            for run_id in runs:
                await harness.wait_for(
                    lambda run_id=run_id: status_is(db, run_id, "completed"), f"run {run_id}"
                )

            # No failures injected: each product was fetched exactly once, by one worker, and that
            # worker is the one its item records.
            calls = harness.calls()
            products = Counter(query for _, source, query in calls if source == "amazon_product")
            twice = {asin: n for asin, n in products.items() if n != 1}
            assert not twice, harness.report(f"fetched more than once: {twice}")
            searches = Counter(query for _, source, query in calls if source == "ebay_search")
            assert set(searches.values()) == {1}
            pages = Counter(query for _, source, query in calls if source == "amazon_bestsellers")
            assert pages == Counter(category for batch in batches for category in batch)
            fetched_by = {query: worker for worker, source, query in calls if source == "amazon_product"}
            items = await db.fetch(
                "select asin, worked_by from collection_run_items where run_id = any($1::uuid[])", runs
            )
            assert len(items) == expected_items([c for batch in batches for c in batch]) == len(products)
            assert {item["asin"]: item["worked_by"] for item in items} == fetched_by
            assert {item["worked_by"] for item in items} == {"alpha", "beta"}
            for run_id, categories in zip(runs, batches, strict=True):
                run = await assert_settled(harness, db, run_id, categories)
                assert run["uncertain_cost_cents"] == 0

            # A fresh run: kill whichever replica holds it; the other finishes it once the lease expires.
            categories = ["garden", "tools"]
            fresh = await harness.start_run(beta, admin, categories)
            watch.add(fresh)

            async def working() -> asyncpg.Record | None:
                row = await run_row(db, fresh)
                return row if row["lease_owner"] and row["processed_items"] >= 10 else None

            holder_id = (await harness.wait_for(working, "the fresh run to be worked"))["lease_owner"]
            holder, survivor = (alpha, beta) if holder_id == "alpha" else (beta, alpha)
            holder.kill()
            killed_at = await db_now(db)
            await asyncio.sleep(0.2)
            row = await run_row(db, fresh)
            assert row["status"] == "running" and row["lease_owner"] == holder.worker_id, harness.report(
                f"the fresh run ended before the kill: {dict(row)}"
            )
            await harness.wait_for(
                lambda: status_is(db, fresh, "completed"), "the survivor to finish the run"
            )

        assert not watch.violations, harness.report(f"{watch.violations}")
        first = await first_item_by(db, fresh, survivor.worker_id)
        assert first is not None and first >= row["lease_expires_at"], harness.report(
            f"{survivor.worker_id} recorded an item at {first}, the lease ran until {row['lease_expires_at']}"
        )
        assert (first - killed_at).total_seconds() >= SHORT_LEASE_S - 0.5
        late = await db.fetchval(
            "select count(*) from collection_run_items"
            " where run_id = $1 and worked_by = $2 and updated_at > $3",
            fresh,
            holder.worker_id,
            killed_at,
        )
        assert late == 0
        run = await assert_settled(harness, db, fresh, categories)
        assert run["uncertain_cost_cents"] <= ITEMS_IN_FLIGHT * ITEM_CENTS + CALL_CENTS
        fetched = await assert_calls_paid_for(harness, run)
        assert sum(count - 1 for count in fetched.values()) <= ITEMS_IN_FLIGHT


# Budget across a crash ------------------------------------------------------------------------------
class TestBudgetAcrossCrash:
    async def test_run_pauses_at_the_cap_counting_what_the_dead_process_had_in_flight(
        self, harness: Harness, db: asyncpg.Pool, world: World
    ) -> None:
        admin = await world.admin()
        server = await harness.start("budget", LEASE_TTL_S=str(SHORT_LEASE_S))
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
            server.kill()
            row = await run_row(db, run_id)
            assert row["status"] == "running", harness.report(f"not running at the kill: {dict(row)}")
            await harness.restart(server)

            async def paused() -> asyncpg.Record | None:
                row = await run_row(db, run_id)
                return row if row["status"] == "paused" and row["lease_token"] is None else None

            await harness.wait_for(paused, "the run to pause at the cap")
        assert not watch.violations, harness.report(f"{watch.violations}")
        run = await assert_settled(harness, db, run_id, categories, end="paused")
        assert run["status_reason"] == "budget_exhausted"
        assert run["budget_cap_cents"] == cap
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


class TestGracefulShutdown:
    @pytest.mark.parametrize(
        ("sig", "watched"),
        [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGTERM, True)],
        ids=["SIGTERM", "SIGINT", "SIGTERM-while-a-client-follows-the-run"],
    )
    async def test_a_stop_signal_gives_the_run_back_and_another_worker_goes_on_at_once(
        self, harness: Harness, db: asyncpg.Pool, world: World, sig: signal.Signals, watched: bool
    ) -> None:
        admin = await world.admin()
        env = {"LEASE_TTL_S": str(LONG_LEASE_S)}
        first = await harness.start("graceful-1", **env)
        categories = ["garden", "books", "tools"]  # about 6 s of work: far longer than a clean stop
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
                        "select processed_items >= 15 from collection_runs where id = $1", run_id
                    ),
                    "15 items done",
                )
                if watched:
                    await harness.wait_for(lambda: asyncio.sleep(0, lines), "the first progress event")
                before = await run_row(db, run_id)
                took = await first.interrupt(sig)
                exited_at = await db_now(db)
                row = await run_row(db, run_id)
                state = harness.report(f"{sig.name}: exited after {took:.1f}s; the run is now {dict(row)}")
                assert took < 3.0, state
                # Uvicorn shuts down cleanly, then re-raises the signal it caught (so the exit says why).
                assert first.process is not None and first.process.returncode in (0, -sig), state
                assert "Application shutdown complete" in first.logs[-1].read_text(), state
                assert row["status"] == "running" and row["processed_items"] < expected_items(categories), (
                    state
                )
                assert row["lease_token"] is None and row["lease_owner"] is None, state
                assert row["reserved_cents"] == 0, state
                # Items in flight were finished and checkpointed, not abandoned.
                assert row["uncertain_cost_cents"] == 0, state

                second = await harness.start("graceful-2", **env)
                await harness.wait_for(
                    lambda: new_lease(db, run_id, second.worker_id, None), "graceful-2's claim"
                )
                claimed_at = await db_now(db)
                assert claimed_at < before["lease_expires_at"], harness.report(
                    f"claimed at {claimed_at}: waited for the lease given up at {exited_at}"
                )
                await harness.wait_for(lambda: status_is(db, run_id, "completed"), "the run to complete")
        finally:
            if follower is not None:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)

        assert not watch.violations, harness.report(f"{watch.violations}")
        run = await assert_settled(harness, db, run_id, categories)
        assert run["uncertain_cost_cents"] == 0
        fetched = await assert_calls_paid_for(harness, run)
        assert set(fetched.values()) == {1}, "a graceful stop redoes nothing"
        workers = Counter(
            row["worked_by"]
            for row in await db.fetch("select worked_by from collection_run_items where run_id = $1", run_id)
        )
        assert set(workers) == {"graceful-1", "graceful-2"}

    async def test_calls_slower_than_the_grace_time_are_abandoned_and_the_run_is_still_given_back(
        self, harness: Harness, db: asyncpg.Pool, world: World
    ) -> None:
        # Like an Oxylabs call (up to OXYLABS_TIMEOUT_S, 60 s) outliving SHUTDOWN_GRACE_S (10 s).
        admin = await world.admin()
        first = await harness.start(
            "slow-1", LEASE_TTL_S=str(LONG_LEASE_S), SANDBOX_LATENCY_MS="2000", SHUTDOWN_GRACE_S="0.5"
        )
        categories = ["garden"]
        run_id = await harness.start_run(first, admin, categories)
        in_flight = await harness.wait_for(
            lambda: db.fetchrow(
                "select * from collection_runs where id = $1 and reserved_cents >= $2", run_id, ITEM_CENTS
            ),
            "items in flight",
        )
        took = await first.interrupt(signal.SIGTERM)
        row = await run_row(db, run_id)
        state = harness.report(f"SIGTERM: exited after {took:.1f}s; the run is now {dict(row)}")
        assert took < 3.0, state
        # The abandoned calls may have been charged: their reservations become uncertain charges, and
        # the lease is given back rather than left to expire.
        assert row["status"] == "running" and row["reserved_cents"] == 0, state
        assert row["uncertain_cost_cents"] >= ITEM_CENTS, state
        assert row["lease_token"] is None and row["lease_owner"] is None, state

        second = await harness.start("slow-2", LEASE_TTL_S=str(LONG_LEASE_S))
        await harness.wait_for(lambda: new_lease(db, run_id, second.worker_id, None), "slow-2's claim")
        claimed_at = await db_now(db)
        assert claimed_at < in_flight["lease_expires_at"], harness.report(
            f"claimed at {claimed_at}: waited for the lease slow-1 held until {in_flight['lease_expires_at']}"
        )
        await harness.wait_for(lambda: status_is(db, run_id, "completed"), "the run to complete")
        run = await assert_settled(harness, db, run_id, categories)
        await assert_calls_paid_for(harness, run)
