"""The executor's checkpoints through CollectionService, on the real store the app's lifespan builds:
`checkpoint` records one item (its result, the run's counters, its actual cost, the sellers found and
the run's checkpoint) once, whatever the retries and the concurrency; `checkpoint_discovery` records a
category's products once; both are fenced by the run's lease; the budget is reserved before and
released by the record."""

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
from app.operations import PendingItem
from app.services.collection import CollectionService, ItemOutcome, Lease
from conftest import World

PRODUCTS = [{"asin": f"B00000000{n}", "title": f"Product {n}"} for n in range(1, 6)]
ITEM_CENTS = 10  # the default pricing: one Amazon product call and one eBay search, 5 cents each


@pytest.fixture
def service(app: FastAPI) -> CollectionService:
    svc: CollectionService = app.state.service
    return svc


@pytest.fixture
async def org_id(world: World, service: CollectionService) -> uuid.UUID:
    org = await world.org("acme")
    await service.update_settings(org, CollectionSettingsUpdate(max_concurrent_runs=100))
    return org


async def held_run(
    service: CollectionService, org_id: uuid.UUID, categories: list[str] | None = None
) -> Lease:
    """A started run held by this test as an executor would hold it."""
    run = await service.create_run(
        org_id, None, CollectionRunCreate(name="checkpointed", category_ids=categories or ["electronics"])
    )
    await service.start_run(org_id, run.id, None)
    token = uuid.uuid4()
    claimed = await service.claim_runs(f"worker-{token}", token, 30, 100)
    assert run.id in [r.id for r in claimed]
    return Lease(run.id, token)


async def discovered(service: CollectionService, lease: Lease) -> list[PendingItem]:
    category = (await service.run_categories(lease.run_id))[0]
    assert await service.reserve_budget(lease, 5) == "ok"
    await service.checkpoint_discovery(lease, category, PRODUCTS, cost_cents=5, reserved_cents=5, error=None)
    return await service.pending_items(lease.run_id, category.category_id)


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


async def reserve_and_checkpoint(
    service: CollectionService, lease: Lease, item: PendingItem, outcome: ItemOutcome
) -> Any:
    assert await service.reserve_budget(lease, ITEM_CENTS) == "ok"
    return await service.checkpoint(lease, item, outcome, ITEM_CENTS, "test-worker")


async def stored(db: asyncpg.Pool, run_id: uuid.UUID) -> dict[str, Any]:
    row = await db.fetchrow(
        "select status, processed_items, failed_items, actual_cost_cents, reserved_cents, checkpoint, "
        "status_message from public.collection_runs where id = $1",
        run_id,
    )
    assert row is not None
    values = dict(row)
    values["checkpoint"] = None if row["checkpoint"] is None else json.loads(row["checkpoint"])
    return values


async def items(db: asyncpg.Pool, run_id: uuid.UUID) -> dict[str, tuple[str, int, int]]:
    rows = await db.fetch(
        "select asin, status, attempts, cost_cents from public.collection_run_items where run_id = $1", run_id
    )
    return {r["asin"]: (r["status"], r["attempts"], r["cost_cents"]) for r in rows}


class TestCheckpoint:
    async def test_one_call_records_result_counters_cost_sellers_and_checkpoint(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        lease = await held_run(service, org_id)
        pending = await discovered(service, lease)
        assert [i.asin for i in pending] == [p["asin"] for p in PRODUCTS]

        run = await reserve_and_checkpoint(service, lease, pending[0], done())

        assert (run.processed_items, run.failed_items, run.actual_cost_cents, run.reserved_cents) == (
            1,
            0,
            15,
            0,
        )
        row = await stored(db, lease.run_id)
        assert row["checkpoint"] == {
            "category_position": 1,
            "category_id": "electronics",
            "phase": "items",
            "last_asin": pending[0].asin,
        }
        assert row["status_message"] == "Category 1/1: 1/5 products"
        assert (await items(db, lease.run_id))[pending[0].asin] == ("done", 2, ITEM_CENTS)
        seller = await db.fetchrow(
            "select listings_seen, products_seen, lowest_price_cents, first_run_id "
            "from public.collection_sellers where org_id = $1 and seller = 'best-deals'",
            org_id,
        )
        assert seller is not None and tuple(seller) == (2, 1, 999, lease.run_id)
        assert [i.asin for i in await service.pending_items(lease.run_id, "electronics")] == [
            p["asin"] for p in PRODUCTS[1:]
        ]

    async def test_a_failed_item_counts_as_processed_and_failed(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        lease = await held_run(service, org_id)
        item = (await discovered(service, lease))[0]
        failure = ItemOutcome(
            status="failed", attempts=4, cost_cents=5, error="amazon_product: target answered 404"
        )
        run = await reserve_and_checkpoint(service, lease, item, failure)
        assert (run.processed_items, run.failed_items, run.actual_cost_cents) == (1, 1, 10)
        assert await db.fetchval(
            "select last_error from public.collection_run_items where run_id = $1 and asin = $2",
            lease.run_id,
            item.asin,
        ) == ("amazon_product: target answered 404")
        assert await db.fetchval("select count(*) from public.collection_sellers") == 0


class TestCheckpointOnce:
    async def test_the_same_item_twice_counts_once_and_books_the_money_of_both(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        lease = await held_run(service, org_id)
        item = (await discovered(service, lease))[0]
        await reserve_and_checkpoint(service, lease, item, done())
        # A retry after a lost answer: the item was done again and paid for again.
        run = await reserve_and_checkpoint(service, lease, item, done())
        assert (run.processed_items, run.failed_items, run.actual_cost_cents, run.reserved_cents) == (
            1,
            0,
            25,
            0,
        )
        assert (await items(db, lease.run_id))[item.asin] == ("done", 4, 2 * ITEM_CENTS)
        listings = await db.fetchval(
            "select listings_seen from public.collection_sellers where seller = 'best-deals'"
        )
        assert listings == 2  # the sellers of an item are counted once too

    async def test_the_same_item_from_twenty_callers_at_once_counts_once(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        await service.update_settings(org_id, CollectionSettingsUpdate(budget_cap_cents=10_000))
        lease = await held_run(service, org_id)
        item = (await discovered(service, lease))[0]
        runs = await asyncio.gather(
            *(reserve_and_checkpoint(service, lease, item, done()) for _ in range(20))
        )
        assert {r.processed_items for r in runs} == {1}
        row = await stored(db, lease.run_id)
        assert (row["processed_items"], row["actual_cost_cents"], row["reserved_cents"]) == (
            1,
            5 + 20 * ITEM_CENTS,
            0,
        )

    async def test_concurrent_distinct_items_sum_exactly(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        lease = await held_run(service, org_id)
        pending = await discovered(service, lease)
        outcomes = [
            done(),
            ItemOutcome(status="failed", cost_cents=5, error="x"),
            done(),
            done(cost=5),
            done(),
        ]
        await asyncio.gather(
            *(reserve_and_checkpoint(service, lease, i, o) for i, o in zip(pending, outcomes, strict=True))
        )
        row = await stored(db, lease.run_id)
        assert (row["processed_items"], row["failed_items"]) == (5, 1)
        assert row["actual_cost_cents"] == 5 + sum(o.cost_cents for o in outcomes)
        assert row["reserved_cents"] == 0
        assert row["status_message"] == "Category 1/1: 5/5 products"

    async def test_a_category_is_discovered_once(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        lease = await held_run(service, org_id)
        await discovered(service, lease)
        category = (await service.run_categories(lease.run_id))[0]
        assert await service.reserve_budget(lease, 5) == "ok"
        again = [{"asin": "B0OTHER001", "title": "not added"}]
        run = await service.checkpoint_discovery(
            lease, category, again, cost_cents=5, reserved_cents=5, error=None
        )
        assert run.actual_cost_cents == 10 and run.reserved_cents == 0  # the second page was still paid for
        assert sorted(await items(db, lease.run_id)) == sorted(p["asin"] for p in PRODUCTS)


class TestFencing:
    async def test_a_process_that_lost_the_lease_writes_nothing(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        lease = await held_run(service, org_id)
        item = (await discovered(service, lease))[0]
        assert await service.reserve_budget(lease, ITEM_CENTS) == "ok"
        before = await stored(db, lease.run_id)
        stale = Lease(lease.run_id, uuid.uuid4())
        for write in (
            service.checkpoint(stale, item, done(), ITEM_CENTS, "other"),
            service.release_budget(stale, ITEM_CENTS),
            service.checkpoint_discovery(
                stale, (await service.run_categories(lease.run_id))[0], PRODUCTS, 5, 5, None
            ),
        ):
            with pytest.raises(LeaseLost):
                await write
        assert await service.reserve_budget(stale, ITEM_CENTS) == "lease_lost"
        assert await stored(db, lease.run_id) == before
        assert (await items(db, lease.run_id))[item.asin] == ("pending", 0, 0)

    async def test_another_orgs_run_cannot_be_claimed_into_this_orgs_lease(
        self, service: CollectionService, db: asyncpg.Pool, world: World, org_id: uuid.UUID
    ) -> None:
        lease = await held_run(service, org_id)
        other = await held_run(service, await world.org("globex"))
        item = (await discovered(service, lease))[0]
        with pytest.raises(LeaseLost):  # our item under the other run's token
            await service.checkpoint(Lease(lease.run_id, other.token), item, done(), ITEM_CENTS, "w")


class TestBadInput:
    async def test_an_unknown_item_is_not_found_and_changes_nothing(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        lease = await held_run(service, org_id)
        await discovered(service, lease)
        before = await stored(db, lease.run_id)
        ghost = PendingItem(category_id="electronics", asin="B0NOTHERE1", position=99)
        with pytest.raises(RunNotFound):
            await service.checkpoint(lease, ghost, done(), 0, "w")
        assert await stored(db, lease.run_id) == before

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
        lease = await held_run(service, org_id)
        item = (await discovered(service, lease))[0]
        before, before_items = await stored(db, lease.run_id), await items(db, lease.run_id)
        with pytest.raises((CollectionError, asyncpg.PostgresError)) as refused:
            await service.checkpoint(lease, item, outcome, 0, "w")
        if outcome.status == "done":
            assert isinstance(refused.value, ConstraintViolation)
        assert await stored(db, lease.run_id) == before
        assert await items(db, lease.run_id) == before_items

    async def test_a_record_past_the_reservation_is_refused_by_the_cap(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        lease = await held_run(service, org_id)
        item = (await discovered(service, lease))[0]
        await db.execute("update collection_runs set budget_cap_cents = 20 where id = $1", lease.run_id)
        before = await stored(db, lease.run_id)
        # 5 spent on discovery; an item said to have cost 100 would pass the 20-cent cap.
        with pytest.raises(ConstraintViolation) as refused:
            await service.checkpoint(lease, item, done(cost=100), 0, "w")
        assert "collection_runs_within_cap" in refused.value.message
        assert await stored(db, lease.run_id) == before
