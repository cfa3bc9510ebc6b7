"""Units of work and their checkpoints through CollectionService, on the real store the app's lifespan
builds (its executor off, so this test plays the executor process):

- `next_work` hands out a unit (a category's discovery, then its items) with its cost reserved first;
  a run that cannot afford its next unit pauses at its cap;
- `checkpoint` records an item (result, counters, actual cost, sellers, the run's checkpoint) and
  `checkpoint_discovery` a category, once: only the holder of the unit's lease can record it, and
  recording ends the lease, whatever the retries and the concurrency;
- the last unit completes the run, too many failed products fail it;
- a unit whose holder died is handed out again, and what it had reserved becomes uncertain cost.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest
from fastapi import FastAPI

from app.errors import CollectionError, ConstraintViolation, LeaseLost, RunNotFound
from app.models import CollectionRunCreate, CollectionSettingsUpdate
from app.operations import Work
from app.services.collection import CollectionService, FailureRule, ItemOutcome
from conftest import World

PRODUCTS = [{"asin": f"B00000000{n}", "title": f"Product {n}"} for n in range(1, 6)]
ITEM_CENTS = 10  # the default pricing: one Amazon product call and one eBay search, 5 cents each
RULE = FailureRule(max_failed_share=0.5, min_items=20)


@pytest.fixture
async def service(app: FastAPI) -> CollectionService:
    svc: CollectionService = app.state.service
    await svc.configure_rates({"provider": 0, "provider:rendered": 0})  # no rate to wait for here
    return svc


@pytest.fixture
async def org_id(world: World, service: CollectionService) -> uuid.UUID:
    org = await world.org("acme")
    await service.update_settings(org, CollectionSettingsUpdate(max_concurrent_runs=100))
    return org


class Process:
    """An executor process as the database sees one: an owner and a token."""

    def __init__(self, service: CollectionService, owner: str | None = None) -> None:
        self.service = service
        self.token = uuid.uuid4()
        self.owner = owner or f"worker-{self.token}"

    async def next(self) -> Work | None:
        units = await self.service.next_work(self.owner, self.token, 30, 1.0)
        assert len(units) <= 1 and all(work.kind != "wait" for work in units)
        return units[0] if units else None

    async def checkpoint(self, work: Work, outcome: ItemOutcome) -> Any:
        return await self.service.checkpoint(self.token, work, outcome, self.owner, RULE)


async def started_run(service: CollectionService, org_id: uuid.UUID) -> uuid.UUID:
    run = await service.create_run(
        org_id, None, CollectionRunCreate(name="checkpointed", category_ids=["electronics"])
    )
    await service.start_run(org_id, run.id, None)
    return run.id


async def discovered(process: Process, run_id: uuid.UUID) -> list[Work]:
    """The run's category discovered with PRODUCTS; then each of its items taken as a unit."""
    work = await process.next()
    assert work is not None and work.kind == "discovery" and work.run_id == run_id
    await process.service.checkpoint_discovery(process.token, work, PRODUCTS, cost_cents=5, error=None)
    units = [await process.next() for _ in PRODUCTS]
    assert all(u is not None and u.kind == "item" for u in units)
    return [u for u in units if u is not None]


def done(cost: int = ITEM_CENTS, sellers: list[dict[str, Any]] | None = None) -> ItemOutcome:
    sellers = (
        sellers if sellers is not None else [{"seller": "best-deals", "listings": 2, "price_cents": 999}]
    )
    return ItemOutcome(
        status="done",
        attempts=2,
        cost_cents=cost,
        result={"title": "t", "price_cents": 1999, "brand": "Acme", "sellers": sellers},
        sellers=sellers,
    )


async def stored(db: asyncpg.Pool, run_id: uuid.UUID) -> dict[str, Any]:
    row = await db.fetchrow(
        "select status, status_reason, processed_items, failed_items, actual_cost_cents, reserved_cents, "
        "uncertain_cost_cents, checkpoint, status_message from public.collection_runs where id = $1",
        run_id,
    )
    assert row is not None
    values = dict(row)
    values["checkpoint"] = None if row["checkpoint"] is None else json.loads(row["checkpoint"])
    return values


async def items(db: asyncpg.Pool, run_id: uuid.UUID) -> dict[str, tuple[str, int, int, bool]]:
    rows = await db.fetch(
        "select asin, status, attempts, cost_cents, lease_token is not null as held "
        "from public.collection_run_items where run_id = $1",
        run_id,
    )
    return {r["asin"]: (r["status"], r["attempts"], r["cost_cents"], r["held"]) for r in rows}


class TestHandingOut:
    async def test_discovery_comes_first_then_the_items_in_order_each_reserved(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await started_run(service, org_id)
        process = Process(service)
        units = await discovered(process, run_id)
        assert [u.asin for u in units] == [p["asin"] for p in PRODUCTS]
        assert {u.reserved_cents for u in units} == {ITEM_CENTS}
        row = await stored(db, run_id)
        assert (row["actual_cost_cents"], row["reserved_cents"]) == (5, 5 * ITEM_CENTS)
        assert await process.next() is None  # every unit of the only run is held

    async def test_a_run_that_cannot_afford_its_next_unit_pauses_at_its_cap(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await started_run(service, org_id)
        process = Process(service)
        work = await process.next()
        assert work is not None
        await service.checkpoint_discovery(process.token, work, PRODUCTS, cost_cents=5, error=None)
        await db.execute("update collection_runs set budget_cap_cents = 25 where id = $1", run_id)
        assert (await process.next()) is not None and (await process.next()) is not None  # 5 + 2 x 10
        assert await process.next() is None  # the third would pass 25
        row = await stored(db, run_id)
        assert (row["status"], row["status_reason"]) == ("paused", "budget_exhausted")
        assert row["actual_cost_cents"] + row["reserved_cents"] == 25
        assert row["status_message"] == "Paused: budget exhausted (25 of 25 cents spent or in flight)"


class TestHandingOutInBatches:
    """`limit` units in one call are the units as many single calls would give, in the same order."""

    async def test_a_batch_alternates_between_organisations_and_holds_each_unit_once(
        self, service: CollectionService, db: asyncpg.Pool, world: World, org_id: uuid.UUID
    ) -> None:
        other = await world.org("globex")
        await service.update_settings(other, CollectionSettingsUpdate(max_concurrent_runs=100))
        process = Process(service)
        runs = {org: await started_run(service, org) for org in (org_id, other)}
        for _ in runs:  # both discovered first, one unit each
            await discovered_only(process)
        batch = await service.next_work(process.owner, process.token, 30, 1.0, 6)
        assert [work.kind for work in batch] == ["item"] * 6
        orgs = [work.org_id for work in batch]
        assert all(a != b for a, b in zip(orgs, orgs[1:], strict=False)), orgs  # turn by turn
        assert {orgs.count(org) for org in runs} == {3}
        assert len({(work.run_id, work.asin) for work in batch}) == 6
        for org, run_id in runs.items():
            asins = [work.asin for work in batch if work.org_id == org]
            assert asins == [p["asin"] for p in PRODUCTS[:3]]  # each run's items in order
            row = await stored(db, run_id)
            assert row["reserved_cents"] == 3 * ITEM_CENTS
        rest = await service.next_work(process.owner, process.token, 30, 1.0, 16)
        assert len(rest) == 4  # what is left: two items of each run

    async def test_a_batch_stops_at_the_budget_and_at_the_rate_horizon(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await started_run(service, org_id)
        process = Process(service)
        await discovered_only(process)
        await db.execute("update collection_runs set budget_cap_cents = 25 where id = $1", run_id)
        batch = await service.next_work(process.owner, process.token, 30, 1.0, 5)
        assert len(batch) == 2  # 5 + 2 x 10 = 25: the third would pass the cap
        assert (await stored(db, run_id))["status"] == "paused"

        second = await started_run(service, org_id)
        await discovered_only(process)
        await service.configure_rates({"provider": 4, "provider:rendered": 0})  # 3.6 a second planned
        batch = await service.next_work(process.owner, process.token, 30, 1.0, 16)
        assert {work.run_id for work in batch} == {second}
        # Slots a 1/3.6 s apart, as far as the horizon: the first at once, the last within a second.
        waits = [work.wait_s for work in batch]
        assert len(batch) in (4, 5) and waits == sorted(waits) and waits[-1] <= 1.0 + 1e-6, waits
        assert [b - a for a, b in zip(waits, waits[1:], strict=False)] == pytest.approx(
            [1 / 3.6] * (len(waits) - 1), abs=0.01
        )
        after = await service.next_work(process.owner, process.token, 30, 1.0, 16)
        assert [work.kind for work in after] == ["wait"]


async def discovered_only(process: Process) -> None:
    """The next unit, a discovery, recorded with PRODUCTS."""
    work = await process.next()
    assert work is not None and work.kind == "discovery"
    await process.service.checkpoint_discovery(process.token, work, PRODUCTS, cost_cents=5, error=None)


class TestCheckpoint:
    async def test_one_call_records_result_counters_cost_sellers_and_checkpoint(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await started_run(service, org_id)
        process = Process(service)
        first = (await discovered(process, run_id))[0]

        run = await process.checkpoint(first, done())

        assert (run.processed_items, run.failed_items, run.actual_cost_cents, run.reserved_cents) == (
            1,
            0,
            15,
            4 * ITEM_CENTS,
        )
        row = await stored(db, run_id)
        assert row["checkpoint"] == {
            "category_position": 1,
            "category_id": "electronics",
            "phase": "items",
            "last_asin": first.asin,
        }
        assert row["status_message"] == "Category 1/1: 1/5 products"
        assert (await items(db, run_id))[first.asin] == ("done", 2, ITEM_CENTS, False)
        seller = await db.fetchrow(
            "select listings_seen, products_seen, lowest_price_cents, first_run_id "
            "from public.collection_sellers where org_id = $1 and seller = 'best-deals'",
            org_id,
        )
        assert seller is not None and tuple(seller) == (2, 1, 999, run_id)

    async def test_a_failed_item_counts_as_processed_and_failed(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await started_run(service, org_id)
        process = Process(service)
        item = (await discovered(process, run_id))[0]
        failure = ItemOutcome(
            status="failed", attempts=4, cost_cents=5, error="amazon_product: target answered 404"
        )
        run = await process.checkpoint(item, failure)
        assert (run.processed_items, run.failed_items, run.actual_cost_cents) == (1, 1, 10)
        assert await db.fetchval(
            "select last_error from public.collection_run_items where run_id = $1 and asin = $2",
            run_id,
            item.asin,
        ) == ("amazon_product: target answered 404")
        assert await db.fetchval("select count(*) from public.collection_sellers") == 0

    async def test_the_last_item_completes_the_run(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await started_run(service, org_id)
        process = Process(service)
        units = await discovered(process, run_id)
        await asyncio.gather(*(process.checkpoint(u, done()) for u in units))
        row = await stored(db, run_id)
        assert (row["status"], row["status_message"]) == ("completed", "Completed: 5 products, 0 failed")
        assert (row["actual_cost_cents"], row["reserved_cents"]) == (5 + 5 * ITEM_CENTS, 0)

    async def test_too_many_failed_products_fail_the_run(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await started_run(service, org_id)
        process = Process(service)
        units = await discovered(process, run_id)
        strict = FailureRule(max_failed_share=0.5, min_items=3)
        for unit in units[:3]:
            await service.checkpoint(
                process.token, unit, ItemOutcome(status="failed", error="x"), "w", strict
            )
        row = await stored(db, run_id)
        assert (row["status"], row["status_reason"]) == ("failed", "3 of 3 products failed, more than 50%")
        # What was still in flight lands, and the run stays failed.
        await process.checkpoint(units[3], done())
        assert (await stored(db, run_id))["status"] == "failed"


class TestRecordedOnce:
    async def test_an_item_recorded_twice_is_refused_the_second_time_and_changes_nothing(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await started_run(service, org_id)
        process = Process(service)
        item = (await discovered(process, run_id))[0]
        await process.checkpoint(item, done())
        before, before_items = await stored(db, run_id), await items(db, run_id)
        with pytest.raises(LeaseLost):  # recording ended the lease
            await process.checkpoint(item, done())
        assert await stored(db, run_id) == before and await items(db, run_id) == before_items

    async def test_the_same_item_from_twenty_callers_at_once_is_recorded_once(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await started_run(service, org_id)
        process = Process(service)
        item = (await discovered(process, run_id))[0]
        results = await asyncio.gather(
            *(process.checkpoint(item, done()) for _ in range(20)), return_exceptions=True
        )
        assert sum(not isinstance(r, BaseException) for r in results) == 1
        assert all(isinstance(r, LeaseLost) for r in results if isinstance(r, BaseException))
        row = await stored(db, run_id)
        assert (row["processed_items"], row["actual_cost_cents"]) == (1, 5 + ITEM_CENTS)
        assert await db.fetchval("select listings_seen from public.collection_sellers") == 2

    async def test_concurrent_distinct_items_sum_exactly(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await started_run(service, org_id)
        process = Process(service)
        units = await discovered(process, run_id)
        outcomes = [
            done(),
            ItemOutcome(status="failed", cost_cents=5, error="x"),
            done(),
            done(cost=5),
            done(),
        ]
        await asyncio.gather(*(process.checkpoint(u, o) for u, o in zip(units, outcomes, strict=True)))
        row = await stored(db, run_id)
        assert (row["processed_items"], row["failed_items"]) == (5, 1)
        assert row["actual_cost_cents"] == 5 + sum(o.cost_cents for o in outcomes)
        assert row["reserved_cents"] == 0 and row["status"] == "completed"

    async def test_a_category_is_discovered_once(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await started_run(service, org_id)
        process = Process(service)
        work = await process.next()
        assert work is not None
        await service.checkpoint_discovery(process.token, work, PRODUCTS, cost_cents=5, error=None)
        again = [{"asin": "B0OTHER001", "title": "not added"}]
        with pytest.raises(LeaseLost):
            await service.checkpoint_discovery(process.token, work, again, cost_cents=5, error=None)
        assert sorted(await items(db, run_id)) == sorted(p["asin"] for p in PRODUCTS)
        assert (await stored(db, run_id))["actual_cost_cents"] == 5


class TestLeases:
    async def test_a_process_without_the_lease_writes_nothing(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await started_run(service, org_id)
        holder = Process(service)
        item = (await discovered(holder, run_id))[0]
        before, before_items = await stored(db, run_id), await items(db, run_id)
        other = Process(service)
        for write in (
            other.checkpoint(item, done()),
            service.give_back(other.token, item, calls_made=False),
            service.fail_run(other.token, item, "nope"),
        ):
            with pytest.raises(LeaseLost):
                await write
        assert await stored(db, run_id) == before and await items(db, run_id) == before_items

    async def test_a_dead_holders_units_go_to_the_next_process_and_their_reservations_become_uncertain(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await started_run(service, org_id)
        dead = Process(service)
        units = await discovered(dead, run_id)
        await db.execute(
            "update collection_run_items set lease_expires_at = now() - interval '1 s' where run_id = $1",
            run_id,
        )
        alive = Process(service)
        await service.heartbeat(alive.owner, alive.token, 30)  # any heartbeat frees expired units
        row = await stored(db, run_id)
        assert (row["reserved_cents"], row["uncertain_cost_cents"]) == (0, 5 * ITEM_CENTS)
        assert row["actual_cost_cents"] == 5 + 5 * ITEM_CENTS  # may have been charged: counted
        taken = [await alive.next() for _ in units]
        assert sorted(u.asin for u in taken if u) == sorted(u.asin for u in units)
        with pytest.raises(LeaseLost):
            await dead.checkpoint(units[0], done())

    async def test_a_restarted_process_takes_its_earlier_self_s_units_back_at_once(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await started_run(service, org_id)
        before = Process(service, owner="host-a:8000")
        units = await discovered(before, run_id)
        after = Process(service, owner="host-a:8000")  # the same WORKER_ID, restarted: a new token
        taken = await after.next()
        assert taken is not None and taken.asin == units[0].asin
        row = await stored(db, run_id)
        assert row["uncertain_cost_cents"] == ITEM_CENTS  # what the earlier process had reserved for it

    async def test_a_unit_given_back_before_any_call_costs_nothing(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await started_run(service, org_id)
        process = Process(service)
        item = (await discovered(process, run_id))[0]
        await service.give_back(process.token, item, calls_made=False)
        row = await stored(db, run_id)
        assert (row["reserved_cents"], row["uncertain_cost_cents"]) == (4 * ITEM_CENTS, 0)
        again = await Process(service).next()
        assert again is not None and again.asin == item.asin

    async def test_a_unit_given_up_after_its_calls_counts_its_reservation_as_uncertain(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await started_run(service, org_id)
        process = Process(service)
        item = (await discovered(process, run_id))[0]
        before = await stored(db, run_id)
        await service.give_back(process.token, item, calls_made=True)
        row = await stored(db, run_id)
        assert row["reserved_cents"] == before["reserved_cents"] - ITEM_CENTS
        assert row["uncertain_cost_cents"] == ITEM_CENTS
        assert row["actual_cost_cents"] == before["actual_cost_cents"] + ITEM_CENTS
        with pytest.raises(LeaseLost):  # no longer this process's to record
            await process.checkpoint(item, done())
        again = await Process(service).next()
        assert again is not None and again.asin == item.asin

    async def test_a_process_that_stops_gives_every_unit_back(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await started_run(service, org_id)
        process = Process(service)
        await discovered(process, run_id)
        await service.release_work(process.token)
        assert not any(held for *_, held in (await items(db, run_id)).values())
        row = await stored(db, run_id)
        assert (row["reserved_cents"], row["uncertain_cost_cents"]) == (0, 5 * ITEM_CENTS)


class TestBadInput:
    async def test_an_unknown_item_is_refused_and_changes_nothing(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await started_run(service, org_id)
        process = Process(service)
        units = await discovered(process, run_id)
        before = await stored(db, run_id)
        ghost = units[0].model_copy(update={"asin": "B0NOTHERE1"})
        with pytest.raises((LeaseLost, RunNotFound)):
            await process.checkpoint(ghost, done())
        assert await stored(db, run_id) == before

    @pytest.mark.parametrize(
        "outcome",
        [
            pytest.param(ItemOutcome(status="bogus"), id="status"),
            pytest.param(done(cost=-5), id="negative-cost"),
            pytest.param(ItemOutcome(status="done", attempts=-1), id="negative-attempts"),
        ],
    )
    async def test_an_impossible_record_is_refused_and_changes_nothing(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID, outcome: ItemOutcome
    ) -> None:
        run_id = await started_run(service, org_id)
        process = Process(service)
        item = (await discovered(process, run_id))[0]
        before, before_items = await stored(db, run_id), await items(db, run_id)
        with pytest.raises((CollectionError, asyncpg.PostgresError)) as refused:
            await process.checkpoint(item, outcome)
        if outcome.status == "done":
            assert isinstance(refused.value, ConstraintViolation)
        assert await stored(db, run_id) == before
        assert await items(db, run_id) == before_items

    async def test_a_record_past_the_cap_is_refused(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await started_run(service, org_id)
        process = Process(service)
        item = (await discovered(process, run_id))[0]
        await db.execute("update collection_runs set budget_cap_cents = 55 where id = $1", run_id)
        before = await stored(db, run_id)
        # 5 spent, 50 reserved; an item said to have cost 100 would pass the 55-cent cap.
        with pytest.raises(ConstraintViolation) as refused:
            await process.checkpoint(item, done(cost=100))
        assert "collection_runs_within_cap" in refused.value.message
        assert await stored(db, run_id) == before
