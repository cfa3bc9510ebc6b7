"""A fleet of real server processes (`python -m app.cli serve`) on one database, sharing one Oxylabs
account: the fake (oxylabs_fake.py, on loopback in this process) limits the account over any trailing
second and answers 429 past it, as the real API does. Three organisations: one with three runs, two
with one each.

- test_three_processes_share_the_account_fairly: almost no 429, no second above the limit, the
  account busy while work is pending, each organisation served alike, every item done once;
- test_a_killed_process_gives_its_capacity_back_within_a_lease: SIGKILL one of three mid-way;
- test_a_limit_below_the_configured_rate_slows_every_process: the servers are configured for twice
  the account's rate, and learn the real one from the headers, or (without them) from the 429s:
  after the first seconds few calls are refused.

The fake's log of every request (arrival time, source, query, accepted or refused) is what the
assertions count; a failure message gives the traffic second by second and the tail of each log.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from conftest import Actor, World
from oxylabs_fake import (
    PASSWORD,
    USERNAME,
    Call,
    FakeOxylabs,
    accepted_rate,
    busiest_second,
    contention,
    serve_fake_oxylabs,
)
from server_process import ServerProcess

pytestmark = pytest.mark.slow

LIMIT = 20  # the account's jobs a second
RENDERED_LIMIT = 5  # of which rendered (amazon_bestsellers)
# Calls take a few hundred ms, as real ones do (more than the spacing of the account's rate), so
# each process needs several in flight to keep its share of the account busy.
LATENCY_S = (0.2, 0.4)
PRODUCTS = 30  # per category; one category per run
LEASE_S = 3
RUN_TIMEOUT_S = 90.0
CALL_CENTS = 5
ITEM_CENTS = 2 * CALL_CENTS  # amazon_product + one ebay_search

# The organisations and their runs (one category each).
ORGS = {"org-a": 3, "org-b": 1, "org-c": 1}


@dataclass
class Fleet:
    """The servers of one test, the organisations and runs it made, and what the fake saw."""

    dsn: str
    tmp_path: Path
    http: httpx.AsyncClient
    fake: FakeOxylabs
    servers: list[ServerProcess] = field(default_factory=list)
    actors: dict[str, Actor] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)  # run id -> org
    categories: dict[str, str] = field(default_factory=dict)  # category -> org
    notes: list[str] = field(default_factory=list)

    async def start(self, count: int, **env: str) -> None:
        base = {
            "OXYLABS_USERNAME": USERNAME,
            "OXYLABS_PASSWORD": PASSWORD,
            "OXYLABS_BASE_URL": self.fake.base_url,
            "OXYLABS_TIMEOUT_S": "10",
            "PROVIDER_RATE_PER_S": str(LIMIT),
            "PROVIDER_RENDERED_RATE_PER_S": str(RENDERED_LIMIT),
            "EXECUTOR_TICK_S": "0.2",
            "LEASE_TTL_S": str(LEASE_S),
        }
        for n in range(count):
            self.servers.append(ServerProcess(f"fleet-{n + 1}", self.dsn, self.tmp_path, **{**base, **env}))
        for server in self.servers:
            server.start()
        await asyncio.gather(*(server.wait_healthy(self.http) for server in self.servers))

    async def start_runs(self, world: World, orgs: dict[str, int] = ORGS) -> None:
        """Create every run first, then start them all at once (each org's first run leading)."""
        server = self.servers[0]
        pending: list[tuple[int, str, Actor]] = []
        for org, runs in orgs.items():
            actor = self.actors[org] = await world.admin(org)
            for n in range(runs):
                category = f"{org}-cat-{n + 1}"
                response = await self.http.post(
                    f"{server.url}/collection/runs", json={"category_ids": [category]}, headers=actor.headers
                )
                assert response.status_code == 201, response.text
                run_id = response.json()["id"]
                self.runs[run_id] = org
                self.categories[category] = org
                pending.append((n, run_id, actor))
        pending.sort(key=lambda p: p[0])
        responses = await asyncio.gather(
            *(
                self.http.post(f"{server.url}/collection/runs/{run_id}/start", headers=actor.headers)
                for _, run_id, actor in pending
            )
        )
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]

    def org_of(self, call: Call) -> str | None:
        category = self.fake.category_of(call)
        return None if category is None else self.categories.get(category)

    def asins(self) -> set[str]:
        return {asin for category in self.categories for asin in self.fake.catalogue(category)}

    def dump(self, calls: list[Call]) -> Path:
        """Every call the fake saw, one line each (seconds from the first, source, query, outcome, org)."""
        path = self.tmp_path / "calls.tsv"
        t0 = calls[0].at
        path.write_text(
            "".join(f"{c.at - t0:.4f}\t{c.source}\t{c.query}\t{c.outcome}\t{self.org_of(c)}\n" for c in calls)
        )
        return path

    def summary(self, calls: list[Call], rate_from: float | None = None) -> str:
        """The figures a test asserts on, printed for the record (`pytest -s` or -rP shows them)."""
        refused = sum(not call.accepted for call in calls)
        shared = contention(calls, self.org_of, has_items)
        start = calls[0].at + 1.0 if rate_from is None else rate_from
        line = (
            f"{len(calls)} calls, {refused} refused ({refused / len(calls):.1%}), busiest second "
            f"{busiest_second(calls)} (limit {LIMIT}), {accepted_rate(calls, start, calls[-1].at - 1.0):.1f} "
            f"accepted/s from +{start - calls[0].at:.1f}s, {calls[-1].at - calls[0].at:.1f}s in all; while "
            f"all orgs had work ({shared.end - shared.start:.1f}s): {shared.calls} "
            f"(fairness {shared.fairness:.2f})"
        )
        print(f"\n{line} (every call: {self.dump(calls)})")
        return line

    def report(self, message: str) -> str:
        """An assertion message: what failed, what the test did, the traffic, each server's log tail."""
        calls = self.fake.calls
        lines = [message, f"notes: {'; '.join(self.notes) or '-'}"]
        if calls:
            t0 = calls[0].at
            lines.append(f"every call: {self.dump(calls)}")
            per_second: dict[int, Counter[str]] = {}
            for call in calls:
                per_second.setdefault(int(call.at - t0), Counter())[call.outcome] += 1
            lines.append(
                "per second (accepted/refused): "
                + " ".join(f"{s}:{c['accepted']}/{c['refused']}" for s, c in sorted(per_second.items()))
            )
        lines += [server.tail() for server in self.servers]
        return "\n".join(lines)

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
            await asyncio.sleep(0.1)

    async def all_finished(self, db: asyncpg.Pool) -> bool:
        return bool(
            await db.fetchval(
                "select bool_and(status in ('completed', 'failed', 'cancelled')) from collection_runs"
                " where id = any($1::uuid[])",
                list(self.runs),
            )
        )


@pytest.fixture(scope="module")
def oxylabs_server() -> Iterator[FakeOxylabs]:
    with serve_fake_oxylabs() as fake:
        yield fake


@pytest.fixture
async def fleet(migrated_dsn: str, tmp_path: Path, oxylabs_server: FakeOxylabs) -> AsyncIterator[Fleet]:
    oxylabs_server.reset()
    async with httpx.AsyncClient(timeout=10.0) as http:
        fleet = Fleet(migrated_dsn, tmp_path, http, oxylabs_server)
        try:
            yield fleet
        finally:
            for server in fleet.servers:
                server.kill()


# Checks ---------------------------------------------------------------------------------------------
def has_items(call: Call) -> bool:
    """An organisation has work to share from its first item: while its categories' best-seller pages
    are still being fetched it has nothing to hand out, and the others rightly use the account."""
    return call.source == "amazon_product"


def assert_account_kept(fleet: Fleet, calls: list[Call], *, refused_below: float = 0.01) -> None:
    """Few 429s, and no second with more requests than the limit plus 10 %."""
    refused = sum(not call.accepted for call in calls)
    assert refused < refused_below * len(calls), fleet.report(
        f"{refused} of {len(calls)} calls refused with 429 (aim < {refused_below:.0%})"
    )
    busiest = busiest_second(calls)
    assert busiest <= LIMIT * 1.1, fleet.report(f"{busiest} requests within one second (limit {LIMIT})")


def assert_busy(fleet: Fleet, calls: list[Call], start: float, what: str) -> float:
    """The accepted rate from `start` to the second before the last call is at least 85 % of the limit."""
    end = calls[-1].at - 1.0
    assert end - start >= 3.0, fleet.report(f"{what}: only {end - start:.1f}s of work to measure")
    rate = accepted_rate(calls, start, end)
    assert rate >= 0.85 * LIMIT, fleet.report(f"{what}: {rate:.1f} calls/s accepted, limit {LIMIT}/s")
    return rate


async def assert_done_once(
    fleet: Fleet, db: asyncpg.Pool, calls: list[Call], redone_at_most: set[str] | None = None
) -> dict[str, int]:
    """Every item done once: one successful product page per ASIN (but those in `redone_at_most`),
    each item recorded once, every run completed, the money adding up with nothing reserved."""
    asins = fleet.asins()
    pages = Counter(call.query for call in calls if call.accepted and call.source == "amazon_product")
    assert set(pages) == asins, fleet.report(f"products never fetched: {sorted(asins - set(pages))}")
    redone = {asin for asin, n in pages.items() if n > 1}
    allowed = redone_at_most or set()
    assert redone <= allowed, fleet.report(f"fetched more than once: {sorted(redone - allowed)}")
    categories = Counter(
        call.query for call in calls if call.accepted and call.source == "amazon_bestsellers"
    )
    assert set(categories) == set(fleet.categories), fleet.report(f"best-seller pages: {categories}")

    items = await db.fetch(
        "select asin, status, worked_by from collection_run_items where run_id = any($1::uuid[])",
        list(fleet.runs),
    )
    assert Counter(item["asin"] for item in items) == Counter(asins), fleet.report("items recorded")
    assert {item["status"] for item in items} == {"done"}, fleet.report(
        f"{Counter(i['status'] for i in items)}"
    )
    runs = await db.fetch(
        "select r.*, (select coalesce(sum(cost_cents), 0) from collection_run_items i where i.run_id = r.id)"
        " as item_cents, (select coalesce(sum(discovery_cost_cents), 0) from collection_run_categories c"
        " where c.run_id = r.id) as discovery_cents"
        " from collection_runs r where r.id = any($1::uuid[])",
        list(fleet.runs),
    )
    for run in runs:
        state = fleet.report(f"run {dict(run)}")
        assert run["status"] == "completed", state
        assert run["processed_items"] == run["total_items"] == PRODUCTS and run["failed_items"] == 0, state
        assert run["reserved_cents"] == 0, state
        assert run["actual_cost_cents"] == (
            run["item_cents"] + run["discovery_cents"] + run["uncertain_cost_cents"]
        ), state
        assert run["item_cents"] == PRODUCTS * ITEM_CENTS and run["discovery_cents"] == CALL_CENTS, state
    held = await db.fetchval(
        "select count(*) from collection_run_items"
        " where run_id = any($1::uuid[]) and lease_token is not null",
        list(fleet.runs),
    )
    assert held == 0
    return Counter(item["worked_by"] for item in items)


async def executors_are(db: asyncpg.Pool, count: int) -> bool:
    """Whether `count` executors share the account now (as every heartbeat counts them)."""
    live: int = await db.fetchval(
        "select count(*) from collection_executors where lease_expires_at >= clock_timestamp()"
    )
    return live == count


# Tests ----------------------------------------------------------------------------------------------
class TestFleet:
    async def test_three_processes_share_the_account_fairly(
        self, fleet: Fleet, db: asyncpg.Pool, world: World
    ) -> None:
        fleet.fake.configure(
            jobs_per_s=LIMIT,
            rendered_jobs_per_s=RENDERED_LIMIT,
            latency_s=LATENCY_S,
            products_per_category=PRODUCTS,
        )
        await fleet.start(3)
        await fleet.start_runs(world)
        await fleet.wait_for(lambda: fleet.all_finished(db), "every run to finish")
        calls = fleet.fake.calls
        fleet.summary(calls)

        assert_account_kept(fleet, calls)
        assert_busy(fleet, calls, calls[0].at + 1.0, "while work was pending")
        # While all three organisations had work, each got about a third of the calls.
        shared = contention(calls, fleet.org_of, has_items)
        assert shared.fairness >= 0.7, fleet.report(f"calls while all had work: {shared}")
        assert shared.end - shared.start >= 3.0, fleet.report(f"all had work only {shared}")
        worked_by = await assert_done_once(fleet, db, calls)
        assert set(worked_by) == {server.worker_id for server in fleet.servers}, fleet.report(f"{worked_by}")

    async def test_a_killed_process_gives_its_capacity_back_within_a_lease(
        self, fleet: Fleet, db: asyncpg.Pool, world: World
    ) -> None:
        fleet.fake.configure(
            jobs_per_s=LIMIT,
            rendered_jobs_per_s=RENDERED_LIMIT,
            latency_s=LATENCY_S,
            products_per_category=PRODUCTS,
        )
        await fleet.start(3)
        await fleet.start_runs(world)
        total_calls = len(fleet.categories) * (1 + 2 * PRODUCTS)
        await fleet.wait_for(
            lambda: asyncio.sleep(0, sum(c.accepted for c in fleet.fake.calls) >= total_calls // 3),
            "a third of the calls",
        )
        victim = fleet.servers[0]
        workers = await victim.metric(fleet.http, "collection_executor_workers")
        victim.kill()
        killed_at = time.monotonic()
        held = {
            row["asin"]
            for row in await db.fetch(
                "select asin from collection_run_items where lease_owner = $1 and lease_token is not null",
                victim.worker_id,
            )
        }
        fleet.notes.append(f"killed {victim.worker_id} ({workers:g} workers) holding {len(held)} item(s)")
        # Its place among the executors goes within a lease (the survivors then share the whole rate).
        await fleet.wait_for(
            lambda: executors_are(db, 2), "the killed process to leave the executors", timeout=LEASE_S + 1.0
        )
        fleet.notes.append(f"{len(fleet.servers) - 1} executors {time.monotonic() - killed_at:.1f}s after")
        await fleet.wait_for(lambda: fleet.all_finished(db), "every run to finish")
        calls = fleet.fake.calls
        fleet.summary(calls, rate_from=killed_at + LEASE_S + 1.0)

        assert_account_kept(fleet, calls)
        assert_busy(fleet, calls, killed_at + LEASE_S + 1.0, "from a lease after the kill")
        worked_by = await assert_done_once(fleet, db, calls, redone_at_most=held)
        assert set(worked_by) == {server.worker_id for server in fleet.servers}, fleet.report(f"{worked_by}")
        uncertain = await db.fetchval(
            "select sum(uncertain_cost_cents) from collection_runs where id = any($1::uuid[])",
            list(fleet.runs),
        )
        assert uncertain <= len(held) * ITEM_CENTS, fleet.report(f"uncertain {uncertain} cents")

    @pytest.mark.parametrize("headers", [True, False], ids=["with-headers", "429s-only"])
    async def test_a_limit_below_the_configured_rate_slows_every_process(
        self, fleet: Fleet, db: asyncpg.Pool, world: World, headers: bool
    ) -> None:
        fleet.fake.configure(
            jobs_per_s=LIMIT,
            rendered_jobs_per_s=RENDERED_LIMIT,
            rate_limit_headers=headers,
            latency_s=LATENCY_S,
            products_per_category=PRODUCTS,
        )
        await fleet.start(
            3, PROVIDER_RATE_PER_S=str(2 * LIMIT), PROVIDER_RENDERED_RATE_PER_S=str(2 * RENDERED_LIMIT)
        )
        await fleet.start_runs(world)
        await fleet.wait_for(lambda: fleet.all_finished(db), "every run to finish")
        calls = fleet.fake.calls
        fleet.summary(calls)

        rates = {
            row["name"]: dict(row)
            for row in await db.fetch("select * from collection_rate_limits where name like 'provider%'")
        }
        throttled = sum(
            [
                await server.metric(fleet.http, "collection_provider_throttled_total")
                for server in fleet.servers
            ]
        )
        # After the first seconds every process keeps to the account's real rate: told by the headers,
        # as Oxylabs answers, or else found by the 429s alone (a rate recovering towards the
        # configured one finds the limit again now and then: a few 429s, not the half of all calls
        # that twice the rate would get).
        settled = [call for call in calls if call.at >= calls[0].at + 3.0]
        if headers:
            assert rates["provider"]["ceiling_per_s"] == LIMIT, fleet.report(f"{rates}")
            assert rates["provider:rendered"]["ceiling_per_s"] == RENDERED_LIMIT, fleet.report(f"{rates}")
            assert_account_kept(fleet, settled)
        else:
            assert throttled > 0 and rates["provider"]["throttles"] > 0, fleet.report(f"{throttled}, {rates}")
            refused = sum(not call.accepted for call in settled)
            assert refused < 0.05 * len(settled), fleet.report(
                f"{refused} of {len(settled)} calls refused after the first 3 s (aim < 5%)"
            )
        await assert_done_once(fleet, db, calls)
