"""CollectionService.checkpoint on the real store, built by the app's lifespan: one call records a unit
of work (checkpoint, counters, actual cost) once, whatever the retries and the concurrency."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest
from fastapi import FastAPI

from app.errors import CollectionError
from app.models import CollectionRunCreate, CollectionSettingsUpdate, RunAction
from app.services.collection import CollectionService
from conftest import World

# How each status is reached: API actions through the service, the executor's ones through SQL.
PATH_TO = {
    "pending": [],
    "running": ["start"],
    "paused": ["start", "pause"],
    "cancelled": ["start", "cancel"],
    "completed": ["start", "complete"],
    "failed": ["start", "fail"],
}


@pytest.fixture
def service(app: FastAPI) -> CollectionService:
    svc: CollectionService = app.state.service
    return svc


@pytest.fixture
async def org_id(world: World, service: CollectionService) -> uuid.UUID:
    org = await world.org("acme")
    await service.update_settings(org, CollectionSettingsUpdate(max_concurrent_runs=100))
    return org


async def new_run(service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID, status: str) -> uuid.UUID:
    run = await service.create_run(
        org_id, None, CollectionRunCreate(name="checkpointed", category_ids=["electronics"])
    )
    for action in PATH_TO[status]:
        if action in RunAction.__members__.values():
            await service.transition(org_id, run.id, RunAction(action), None)
        else:
            await db.execute("select public.collection_transition_run($1, $2, $3)", org_id, run.id, action)
    return run.id


async def stored(db: asyncpg.Pool, run_id: uuid.UUID) -> dict[str, Any]:
    row = await db.fetchrow(
        "select status, processed_items, failed_items, actual_cost_cents, checkpoint, updated_at "
        "from public.collection_runs where id = $1",
        run_id,
    )
    assert row is not None
    values = dict(row)
    values["checkpoint"] = None if row["checkpoint"] is None else json.loads(row["checkpoint"])
    return values


async def steps(db: asyncpg.Pool, run_id: uuid.UUID) -> list[tuple[str, int, int, int]]:
    rows = await db.fetch(
        "select step_key, processed_delta, failed_delta, cost_cents from public.collection_run_steps "
        "where run_id = $1 order by step_key",
        run_id,
    )
    return [(r["step_key"], r["processed_delta"], r["failed_delta"], r["cost_cents"]) for r in rows]


def refused_by_check_constraint(exc: BaseException) -> bool:
    """The database's CHECK refused it, whether the store passes that on raw or as a domain error."""
    if isinstance(exc, asyncpg.CheckViolationError):
        return True
    return isinstance(exc, CollectionError) and isinstance(exc.__cause__, asyncpg.CheckViolationError)


class TestRecordStep:
    async def test_one_call_writes_checkpoint_counters_and_cost(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await new_run(service, db, org_id, "running")
        checkpoint = {"category": "electronics", "page": 3, "asins": ["B0001", "B0002"]}

        run = await service.checkpoint(
            org_id,
            run_id,
            "electronics/page-3",
            checkpoint,
            processed_delta=10,
            failed_delta=2,
            cost_cents=100,
        )

        assert (run.id, run.status, run.processed_items, run.failed_items, run.actual_cost_cents) == (
            run_id,
            "running",
            10,
            2,
            100,
        )
        row = await stored(db, run_id)
        assert (row["processed_items"], row["failed_items"], row["actual_cost_cents"]) == (10, 2, 100)
        assert row["checkpoint"] == checkpoint
        assert await steps(db, run_id) == [("electronics/page-3", 10, 2, 100)]

    async def test_later_steps_add_up_and_the_latest_checkpoint_wins(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await new_run(service, db, org_id, "running")

        await service.checkpoint(org_id, run_id, "page-1", {"page": 1}, 10, 1, 50)
        run = await service.checkpoint(org_id, run_id, "page-2", {"page": 2}, 7, 3, 35)

        assert (run.processed_items, run.failed_items, run.actual_cost_cents) == (17, 4, 85)
        row = await stored(db, run_id)
        assert (row["processed_items"], row["failed_items"], row["actual_cost_cents"]) == (17, 4, 85)
        assert row["checkpoint"] == {"page": 2}
        assert await steps(db, run_id) == [("page-1", 10, 1, 50), ("page-2", 7, 3, 35)]


class TestRecordStepOnce:
    async def test_the_same_step_twice_changes_nothing_the_second_time(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await new_run(service, db, org_id, "running")
        await service.checkpoint(org_id, run_id, "page-1", {"page": 1}, 10, 2, 100)
        before = await stored(db, run_id)

        # A retry of the same unit of work, even carrying a different checkpoint, is not counted again.
        run = await service.checkpoint(org_id, run_id, "page-1", {"page": 1, "retried": True}, 10, 2, 100)

        assert (run.processed_items, run.failed_items, run.actual_cost_cents) == (10, 2, 100)
        assert await stored(db, run_id) == before
        assert before["checkpoint"] == {"page": 1}
        assert await steps(db, run_id) == [("page-1", 10, 2, 100)]

    async def test_the_same_step_from_twenty_callers_at_once_counts_once(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await new_run(service, db, org_id, "running")

        await asyncio.gather(
            *(service.checkpoint(org_id, run_id, "page-1", {"page": 1}, 10, 2, 100) for _ in range(20))
        )

        row = await stored(db, run_id)
        assert (row["processed_items"], row["failed_items"], row["actual_cost_cents"]) == (10, 2, 100)
        assert await steps(db, run_id) == [("page-1", 10, 2, 100)]


class TestConcurrentSteps:
    async def test_twenty_concurrent_steps_with_distinct_keys_sum_exactly(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID
    ) -> None:
        run_id = await new_run(service, db, org_id, "running")
        work = [(f"step-{i:02d}", {"step": i}, i + 1, i % 3, 5 * (i + 1)) for i in range(20)]

        await asyncio.gather(
            *(
                service.checkpoint(org_id, run_id, key, cp, done, failed, cost)
                for key, cp, done, failed, cost in work
            )
        )

        row = await stored(db, run_id)
        assert row["processed_items"] == sum(w[2] for w in work) == 210
        assert row["failed_items"] == sum(w[3] for w in work) == 19
        assert row["actual_cost_cents"] == sum(w[4] for w in work) == 1050
        assert row["checkpoint"] in [w[1] for w in work]
        assert await steps(db, run_id) == [(key, done, failed, cost) for key, _, done, failed, cost in work]


class TestStatusGuard:
    @pytest.mark.parametrize("status", ["pending", "completed", "failed"])
    async def test_refused_on_a_run_not_under_way(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID, status: str
    ) -> None:
        run_id = await new_run(service, db, org_id, status)
        before = await stored(db, run_id)

        with pytest.raises(CollectionError) as refused:
            await service.checkpoint(org_id, run_id, "page-1", {"page": 1}, 10, 2, 100)

        assert (refused.value.status_code, refused.value.error) == (400, "invalid_transition")
        assert await stored(db, run_id) == before
        assert before["status"] == status
        assert await steps(db, run_id) == []

    @pytest.mark.parametrize("status", ["running", "paused", "cancelled"])
    async def test_lands_on_a_run_under_way_or_stopped_mid_work(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID, status: str
    ) -> None:
        run_id = await new_run(service, db, org_id, status)

        run = await service.checkpoint(org_id, run_id, "page-1", {"page": 1}, 10, 2, 100)

        assert (run.status, run.processed_items, run.failed_items, run.actual_cost_cents) == (
            status,
            10,
            2,
            100,
        )
        row = await stored(db, run_id)
        assert (row["status"], row["processed_items"], row["actual_cost_cents"]) == (status, 10, 100)
        assert row["checkpoint"] == {"page": 1}
        assert await steps(db, run_id) == [("page-1", 10, 2, 100)]


class TestRunScope:
    async def test_another_orgs_run_is_not_found_and_untouched(
        self, service: CollectionService, db: asyncpg.Pool, world: World, org_id: uuid.UUID
    ) -> None:
        run_id = await new_run(service, db, org_id, "running")
        other_org = await world.org("other")
        before = await stored(db, run_id)

        with pytest.raises(CollectionError) as refused:
            await service.checkpoint(other_org, run_id, "page-1", {"page": 1}, 10, 2, 100)

        assert (refused.value.status_code, refused.value.error) == (404, "run_not_found")
        assert await stored(db, run_id) == before
        assert await steps(db, run_id) == []

    @pytest.mark.parametrize("run_id", [str(uuid.uuid4()), "not-a-uuid"])
    async def test_an_unknown_or_malformed_id_is_not_found(
        self, service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID, run_id: str
    ) -> None:
        with pytest.raises(CollectionError) as refused:
            await service.checkpoint(org_id, run_id, "page-1", {"page": 1}, 10, 2, 100)

        assert refused.value.status_code == 404
        assert await db.fetchval("select count(*) from public.collection_run_steps") == 0


class TestDatabaseBounds:
    @pytest.mark.parametrize(
        ("step_key", "processed", "failed", "cost"),
        [
            pytest.param("page-2", -1, 0, 0, id="negative-processed"),
            pytest.param("page-2", 0, -1, 0, id="negative-failed"),
            pytest.param("page-2", 0, 0, -1, id="negative-cost"),
            pytest.param("page-2", 2, 3, 0, id="failed-over-processed"),
            pytest.param("page-2", 0, 1, 0, id="failed-without-processed"),
            pytest.param("", 1, 0, 0, id="empty-key"),
        ],
    )
    async def test_out_of_bounds_step_is_refused_and_changes_nothing(
        self,
        service: CollectionService,
        db: asyncpg.Pool,
        org_id: uuid.UUID,
        step_key: str,
        processed: int,
        failed: int,
        cost: int,
    ) -> None:
        run_id = await new_run(service, db, org_id, "running")
        await service.checkpoint(org_id, run_id, "page-1", {"page": 1}, 5, 0, 50)
        before = await stored(db, run_id)

        with pytest.raises(Exception) as refused:  # noqa: B017 - which class depends on the store's mapping
            await service.checkpoint(org_id, run_id, step_key, {"page": 2}, processed, failed, cost)

        assert refused_by_check_constraint(refused.value), repr(refused.value)
        assert await stored(db, run_id) == before
        assert await steps(db, run_id) == [("page-1", 5, 0, 50)]
        if step_key:
            # The refused attempt did not use up its key: the real step still lands.
            run = await service.checkpoint(org_id, run_id, step_key, {"page": 2}, 3, 1, 30)
            assert (run.processed_items, run.failed_items, run.actual_cost_cents) == (8, 1, 80)
