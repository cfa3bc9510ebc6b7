"""The executor against a local server that speaks Oxylabs' realtime API: a whole run, and each
failure class's billing and retry rule as the run records it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.main import create_app
from conftest import World, create_run, make_settings
from oxylabs_fake import (
    BESTSELLERS,
    BESTSELLERS_CATEGORY,
    PASSWORD,
    USERNAME,
    Answer,
    FakeOxylabs,
    serve_fake_oxylabs,
)
from test_executor import wait_for

ASINS = [item["asin"] for item in BESTSELLERS]


@pytest.fixture(scope="module")
def oxylabs_server() -> Iterator[FakeOxylabs]:
    with serve_fake_oxylabs() as fake:
        yield fake


@pytest.fixture
def oxylabs(oxylabs_server: FakeOxylabs) -> FakeOxylabs:
    oxylabs_server.reset()
    return oxylabs_server


@pytest.fixture
def executor_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
async def api(
    migrated_dsn: str, tmp_path: Path, oxylabs: FakeOxylabs, executor_overrides: dict[str, Any]
) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(
        migrated_dsn,
        tmp_path,
        executor_enabled=True,
        executor_tick_s=0.05,
        provider_backoff_s=0.0,
        provider_rate_per_s=0,
        provider_max_attempts=3,
        oxylabs_username=USERNAME,
        oxylabs_password=PASSWORD,
        oxylabs_base_url=oxylabs.base_url,
        oxylabs_timeout_s=5.0,
        **{"max_calls_in_flight": 1, **executor_overrides},
    )
    app: FastAPI = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            yield client


async def run_to_end(api: httpx.AsyncClient, world: World, db: asyncpg.Pool) -> tuple[Any, list[Any]]:
    admin = await world.admin()
    run = await create_run(api, admin, [BESTSELLERS_CATEGORY])
    assert run["provider"] == "oxylabs"
    assert (await api.post(f"/collection/runs/{run['id']}/start", headers=admin.headers)).status_code == 200
    row = await wait_for(
        lambda: db.fetchrow(
            "select * from collection_runs where id = $1 and status in ('completed', 'failed')", run["id"]
        )
    )
    items = await db.fetch(
        "select * from collection_run_items where run_id = $1 order by position", run["id"]
    )
    return row, items


def item(items: list[Any], asin: str) -> Any:
    return next(i for i in items if i["asin"] == asin)


class TestOxylabsRun:
    async def test_a_run_completes_through_oxylabs(
        self, api: httpx.AsyncClient, world: World, db: asyncpg.Pool, oxylabs: FakeOxylabs
    ) -> None:
        row, items = await run_to_end(api, world, db)
        assert row["status"] == "completed"
        assert [i["asin"] for i in items] == ASINS
        assert all(i["status"] == "done" for i in items)
        assert row["actual_cost_cents"] == 5 + 10 * len(ASINS)
        sources = [r.payload["source"] for r in oxylabs.requests]
        assert sources.count("amazon_bestsellers") == 1
        assert sources.count("amazon_product") == sources.count("ebay_search") == len(ASINS)
        sellers = await db.fetch("select seller, listings_seen from collection_sellers")
        assert sellers, "the eBay pages list sellers"
        first = json.loads(item(items, ASINS[0])["result"])
        assert first["title"] and first["sellers"]


class TestFailureClasses:
    @pytest.mark.parametrize(
        "answer",
        [
            pytest.param(Answer(target_status=503), id="target-503"),
            pytest.param(Answer(target_status=612), id="target-612"),
            pytest.param(Answer(target_status=429), id="target-429"),
            pytest.param(Answer(http_status=429), id="api-429"),
            pytest.param(Answer(http_status=500), id="api-500"),
        ],
    )
    async def test_free_failures_are_retried_and_not_charged(
        self, api: httpx.AsyncClient, world: World, db: asyncpg.Pool, oxylabs: FakeOxylabs, answer: Answer
    ) -> None:
        oxylabs.script(ASINS[0], answer, answer)  # fails twice, the third attempt succeeds
        oxylabs.script(ASINS[1], answer, answer, answer)  # fails every attempt: the item fails, free
        row, items = await run_to_end(api, world, db)
        retried, exhausted = item(items, ASINS[0]), item(items, ASINS[1])
        assert (retried["status"], retried["attempts"], retried["cost_cents"]) == ("done", 3 + 1, 10)
        assert (exhausted["status"], exhausted["attempts"], exhausted["cost_cents"]) == ("failed", 3, 0)
        assert exhausted["last_error"].startswith("amazon_product")
        assert row["status"] == "completed" and row["failed_items"] == 1
        assert row["actual_cost_cents"] == 5 + 10 * (len(ASINS) - 1)

    async def test_a_charged_failure_is_never_retried(
        self, api: httpx.AsyncClient, world: World, db: asyncpg.Pool, oxylabs: FakeOxylabs
    ) -> None:
        oxylabs.script(ASINS[0], Answer(target_status=404))
        row, items = await run_to_end(api, world, db)
        failed = item(items, ASINS[0])
        assert (failed["status"], failed["attempts"], failed["cost_cents"]) == ("failed", 1, 5)
        assert [r.payload["query"] for r in oxylabs.requests].count(ASINS[0]) == 1
        assert row["actual_cost_cents"] == 5 + 5 + 10 * (len(ASINS) - 1)

    async def test_refused_credentials_fail_the_run_with_a_clear_reason(
        self, api: httpx.AsyncClient, world: World, db: asyncpg.Pool, oxylabs: FakeOxylabs
    ) -> None:
        oxylabs.script(ASINS[1], Answer(http_status=401))
        row, _ = await run_to_end(api, world, db)
        assert row["status"] == "failed"
        assert "credentials" in row["status_reason"] and PASSWORD not in row["status_reason"]
        assert row["reserved_cents"] == 0
        held = await db.fetchval(
            "select count(*) from collection_run_items where run_id = $1 and lease_token is not null",
            row["id"],
        )
        assert held == 0
        # Whatever was in flight finished and was recorded; nothing was charged for the refused call.
        costs = await db.fetchval(
            "select coalesce(sum(cost_cents), 0) from collection_run_items where run_id = $1", row["id"]
        )
        assert row["actual_cost_cents"] == 5 + costs


class TestFailureShare:
    @pytest.fixture
    def executor_overrides(self) -> dict[str, Any]:
        return {"min_items_for_failure_share": 2, "max_failed_share": 0.5}

    async def test_run_fails_once_failures_pass_the_configured_share(
        self, api: httpx.AsyncClient, world: World, db: asyncpg.Pool, oxylabs: FakeOxylabs
    ) -> None:
        for asin in ASINS:
            oxylabs.script(asin, Answer(target_status=404))
        row, items = await run_to_end(api, world, db)
        assert row["status"] == "failed"
        assert "failed, more than 50%" in row["status_reason"]
        assert row["failed_items"] > row["processed_items"] * 0.5
        assert row["actual_cost_cents"] == 5 + sum(i["cost_cents"] for i in items)
