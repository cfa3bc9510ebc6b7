"""The executor in-process: a run goes from start to completed through the sandbox, and pause,
resume, cancel and budget exhaustion take effect mid-run. (Crashes and several processes:
test_executor_processes.py.)"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.main import create_app
from app.providers.sandbox import catalogue
from conftest import Actor, World, create_run, make_settings


async def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@pytest.fixture
def executor_overrides() -> dict[str, Any]:
    return {"sandbox_latency_ms": 0}


@pytest.fixture
async def running_app(
    migrated_dsn: str, tmp_path: Path, executor_overrides: dict[str, Any]
) -> AsyncIterator[FastAPI]:
    settings = make_settings(
        migrated_dsn,
        tmp_path,
        executor_enabled=True,
        executor_tick_s=0.05,
        provider_backoff_s=0.0,
        provider_rate_per_s=0,
        worker_id="test-worker",
        **executor_overrides,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def api(running_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=running_app), base_url="http://test") as c:
        yield c


async def run_row(db: asyncpg.Pool, run_id: str) -> asyncpg.Record:
    return await db.fetchrow("select * from collection_runs where id = $1", run_id)


async def held_units(db: asyncpg.Pool, run_id: str) -> int:
    """The run's units of work under a process's lease (calls in flight, or about to be)."""
    held: int = await db.fetchval(
        "select (select count(*) from collection_run_items where run_id = $1 and lease_token is not null)"
        " + (select count(*) from collection_run_categories where run_id = $1 and lease_token is not null)",
        run_id,
    )
    return held


def no_unit_held(db: asyncpg.Pool, run_id: str) -> Any:
    async def check() -> bool:
        return await held_units(db, run_id) == 0

    return check


async def start(api: httpx.AsyncClient, admin: Actor, categories: list[str], **body: Any) -> dict[str, Any]:
    run = await create_run(api, admin, categories, **body)
    response = await api.post(f"/collection/runs/{run['id']}/start", headers=admin.headers)
    assert response.status_code == 200, response.text
    return run


class TestRunToCompletion:
    async def test_sandbox_run_completes_with_consistent_items_sellers_and_cost(
        self, api: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin()
        categories = ["garden", "toys"]
        run = await start(api, admin, categories)

        async def completed() -> Any:
            row = await run_row(db, run["id"])
            return row if row["status"] == "completed" else None

        row = await wait_for(completed)
        expected_items = sum(len(set(catalogue(c))) for c in categories)
        items = await db.fetch("select * from collection_run_items where run_id = $1", run["id"])
        assert len(items) == expected_items == row["total_items"] == row["processed_items"]
        assert all(i["status"] == "done" for i in items)
        assert row["failed_items"] == 0
        # 5 c per best-sellers page, 5 + 5 c per product, nothing uncertain, nothing left reserved.
        assert row["actual_cost_cents"] == 5 * len(categories) + 10 * expected_items
        assert row["actual_cost_cents"] == sum(i["cost_cents"] for i in items) + 5 * len(categories)
        assert row["reserved_cents"] == 0 and row["uncertain_cost_cents"] == 0
        assert await held_units(db, run["id"]) == 0
        assert row["status_message"].startswith("Completed")
        sellers = await db.fetchval(
            "select sum(listings_seen) from collection_sellers where org_id = $1", admin.org_id
        )
        listed = sum(s["listings"] for i in items for s in json.loads(i["result"])["sellers"])
        assert sellers == listed > 0
        events = [
            (e["from_status"], e["to_status"])
            for e in await db.fetch(
                "select * from collection_run_events where run_id = $1 order by id", run["id"]
            )
        ]
        assert events == [(None, "pending"), ("pending", "running"), ("running", "completed")]

        response = await api.get(
            f"/collection/runs/{run['id']}/items?status=done&limit=5", headers=admin.headers
        )
        assert response.status_code == 200
        assert response.json()["total"] == expected_items and len(response.json()["items"]) == 5
        response = await api.get("/collection/sellers?limit=3", headers=admin.headers)
        listing_counts = [s["listings_seen"] for s in response.json()["sellers"]]
        assert listing_counts == sorted(listing_counts, reverse=True)
        final = (await api.get(f"/collection/runs/{run['id']}", headers=admin.headers)).json()
        assert final["estimate_error_cents"] == final["actual_cost_cents"] - final["estimated_cost_cents"]

    async def test_the_next_estimate_learns_from_the_run(
        self, api: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin()
        run = await start(api, admin, ["garden"])
        await wait_for(
            lambda: db.fetchval("select status = 'completed' from collection_runs where id = $1", run["id"])
        )
        response = await api.post(
            "/collection/estimate", json={"category_ids": ["garden", "kitchen"]}, headers=admin.headers
        )
        estimate = response.json()
        products = len(set(catalogue("garden")))
        assert estimate["estimated_from_history"] == ["garden"]
        assert estimate["breakdown"] == {"garden": 5 + 10 * products, "kitchen": 500}


class TestControlMidRun:
    @pytest.fixture
    def executor_overrides(self) -> dict[str, Any]:
        return {"sandbox_latency_ms": 20, "max_calls_in_flight": 2}

    async def test_pause_stops_new_items_and_resume_finishes_without_redoing(
        self, api: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin()
        run = await start(api, admin, ["garden"])
        await wait_for(
            lambda: db.fetchval("select processed_items > 3 from collection_runs where id = $1", run["id"])
        )
        paused_at = time.monotonic()
        assert (
            await api.post(f"/collection/runs/{run['id']}/pause", headers=admin.headers)
        ).status_code == 200
        # Within about a second: the items in flight are recorded and nothing moves any more.
        await wait_for(no_unit_held(db, run["id"]), 2.0)
        assert time.monotonic() - paused_at < 1.5
        frozen = await run_row(db, run["id"])
        await asyncio.sleep(0.3)
        assert (await run_row(db, run["id"]))["processed_items"] == frozen["processed_items"]
        assert frozen["reserved_cents"] == 0

        assert (
            await api.post(f"/collection/runs/{run['id']}/resume", headers=admin.headers)
        ).status_code == 200
        await wait_for(
            lambda: db.fetchval("select status = 'completed' from collection_runs where id = $1", run["id"])
        )
        items = await db.fetch("select attempts from collection_run_items where run_id = $1", run["id"])
        assert all(i["attempts"] == 2 for i in items)  # one product call + one eBay search, none redone

    async def test_cancel_mid_run_stops_and_keeps_what_was_done(
        self, api: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin()
        run = await start(api, admin, ["garden"])
        await wait_for(
            lambda: db.fetchval("select processed_items > 3 from collection_runs where id = $1", run["id"])
        )
        assert (
            await api.post(f"/collection/runs/{run['id']}/cancel", headers=admin.headers)
        ).status_code == 200
        await wait_for(no_unit_held(db, run["id"]), 2.0)
        row = await run_row(db, run["id"])
        assert row["status"] == "cancelled"
        done = await db.fetchval(
            "select count(*) from collection_run_items where run_id = $1 and status <> 'pending'", run["id"]
        )
        assert done == row["processed_items"] < row["total_items"]
        costs = await db.fetchval(
            "select sum(cost_cents) from collection_run_items where run_id = $1", run["id"]
        )
        assert row["actual_cost_cents"] == costs + 5


class TestBudget:
    async def test_run_pauses_at_the_cap_and_finishes_after_the_cap_is_raised(
        self, api: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin()
        run = await start(api, admin, ["garden"])  # estimated 500 c, the sandbox has more products
        products = len(set(catalogue("garden")))
        needed = 5 + 10 * products
        await db.execute("update collection_runs set budget_cap_cents = 205 where id = $1", run["id"])

        async def paused() -> Any:
            # Paused, and the units in flight then recorded since: read again, it is final.
            paused_now = (await run_row(db, run["id"]))["status"] == "paused"
            return (
                await run_row(db, run["id"]) if paused_now and await held_units(db, run["id"]) == 0 else None
            )

        row = await wait_for(paused)
        assert row["status_reason"] == "budget_exhausted"
        assert row["actual_cost_cents"] <= 205 and row["actual_cost_cents"] > 205 - 10
        reason = await db.fetchval(
            "select reason from collection_run_events where run_id = $1 order by id desc limit 1", run["id"]
        )
        assert reason == "budget_exhausted"

        response = await api.patch(
            "/collection/settings", json={"budget_cap_cents": needed}, headers=admin.headers
        )
        assert response.status_code == 200
        assert (
            await api.post(f"/collection/runs/{run['id']}/resume", headers=admin.headers)
        ).status_code == 200
        await wait_for(
            lambda: db.fetchval("select status = 'completed' from collection_runs where id = $1", run["id"])
        )
        row = await run_row(db, run["id"])
        assert row["actual_cost_cents"] == needed == row["budget_cap_cents"]


class TestFailures:
    @pytest.fixture
    def executor_overrides(self) -> dict[str, Any]:
        return {
            "sandbox_latency_ms": 0,
            "sandbox_charged_failure_rate": 1.0,
            "min_items_for_failure_share": 10,
        }

    async def test_too_many_failures_fail_the_run_with_a_reason(
        self, api: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin()
        run = await start(api, admin, ["garden"])
        row = await wait_for(
            lambda: db.fetchrow(
                "select * from collection_runs where id = $1 and status = 'failed'", run["id"]
            )
        )
        # Every call is a charged 404, best sellers included: nothing could be collected.
        category = await db.fetchrow("select * from collection_run_categories where run_id = $1", run["id"])
        assert category["error"].startswith("amazon_bestsellers")
        assert row["status_reason"].startswith("no category could be discovered")
        assert row["actual_cost_cents"] == 5  # the failed page was charged, once
        assert await held_units(db, run["id"]) == 0 and row["reserved_cents"] == 0


class TestFreeFailuresAreRetried:
    @pytest.fixture
    def executor_overrides(self) -> dict[str, Any]:
        return {"sandbox_latency_ms": 0, "sandbox_failure_rate": 0.3, "provider_max_attempts": 6}

    async def test_free_failures_cost_nothing_and_are_retried(
        self, api: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin()
        run = await start(api, admin, ["garden"])
        row = await wait_for(
            lambda: db.fetchrow(
                "select * from collection_runs where id = $1 and status = 'completed'", run["id"]
            )
        )
        items = await db.fetch("select * from collection_run_items where run_id = $1", run["id"])
        assert sum(i["attempts"] for i in items) > 2 * len(items)  # some calls were retried
        done = [i for i in items if i["status"] == "done"]
        assert all(i["cost_cents"] == 10 for i in done)  # retries of free failures cost nothing
        assert row["actual_cost_cents"] == 5 + sum(i["cost_cents"] for i in items)


class TestProgressStream:
    @pytest.fixture
    def executor_overrides(self) -> dict[str, Any]:
        return {"sandbox_latency_ms": 30, "max_calls_in_flight": 2}

    async def test_stream_sends_progress_and_transitions_until_the_run_ends(
        self, api: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin()
        run = await start(api, admin, ["garden"])
        response = await asyncio.wait_for(
            api.get(f"/collection/runs/{run['id']}/events", headers=admin.headers), 30
        )
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = []
        for block in response.text.strip().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            events.append((fields["event"], json.loads(fields["data"])))
        progress = [data for kind, data in events if kind == "progress"]
        transitions = [(d["from_status"], d["to_status"]) for kind, d in events if kind == "transition"]
        assert ("running", "completed") in transitions
        processed = [p["processed_items"] for p in progress]
        assert processed == sorted(processed) and len(set(processed)) > 2
        assert progress[-1]["status"] == "completed"
        assert progress[-1]["actual_cost_cents"] == (await run_row(db, run["id"]))["actual_cost_cents"]

    async def test_stream_of_an_unknown_run_is_404(self, api: httpx.AsyncClient, world: World) -> None:
        admin = await world.admin()
        response = await api.get(
            "/collection/runs/00000000-0000-4000-8000-000000000000/events", headers=admin.headers
        )
        assert response.status_code == 404
