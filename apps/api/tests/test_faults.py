"""A slow database: statements held by a lock time out with a clear 503 after the configured
statement timeout instead of piling up, and the pool does not leak connections."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.main import create_app
from conftest import World, make_settings


@asynccontextmanager
async def serving(dsn: str, tmp_path: Path, **database: Any) -> AsyncIterator[FastAPI]:
    app = create_app(make_settings(dsn, tmp_path, **database))
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def slow_app(migrated_dsn: str, tmp_path: Path) -> AsyncIterator[FastAPI]:
    async with serving(
        migrated_dsn, tmp_path, db_statement_timeout_ms=300, db_pool_max_size=4, db_acquire_timeout_s=1.0
    ) as app:
        yield app


class TestSlowDatabase:
    async def test_held_statements_time_out_as_503_and_the_pool_recovers(
        self, slow_app: FastAPI, world: World, migrated_dsn: str
    ) -> None:
        admin = await world.admin()
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=slow_app), base_url="http://t"
        ) as client:
            assert (await client.get("/collection/settings", headers=admin.headers)).status_code == 200
            blocker = await asyncpg.connect(migrated_dsn)
            try:
                transaction = blocker.transaction()
                await transaction.start()
                await blocker.execute("lock table collection_settings in access exclusive mode")
                started = time.monotonic()
                responses = await asyncio.gather(
                    *(client.get("/collection/settings", headers=admin.headers) for _ in range(12))
                )
                elapsed = time.monotonic() - started
                await transaction.rollback()
            finally:
                await blocker.close()
            assert {r.status_code for r in responses} == {503}
            assert all(r.headers["retry-after"] for r in responses)
            assert {r.json()["error"] for r in responses} == {"database_unavailable"}
            # 12 requests through 4 connections, each bounded by the 300 ms timeout (or the 1 s wait
            # for a connection): nothing piles up behind the lock.
            assert elapsed < 4.0
            # The pool gave every connection back and serves again at once.
            pool = slow_app.state.store._pool
            assert pool.get_size() <= 4
            assert pool.get_idle_size() == pool.get_size()
            assert (await client.get("/collection/settings", headers=admin.headers)).status_code == 200


@pytest.fixture
async def small_pool_app(migrated_dsn: str, tmp_path: Path) -> AsyncIterator[FastAPI]:
    # Statements may run 5 s, longer than the 0.5 s a request waits for a connection: a wait behind
    # the two connections is bounded by nothing but the acquire timeout.
    async with serving(
        migrated_dsn, tmp_path, db_statement_timeout_ms=5000, db_pool_max_size=2, db_acquire_timeout_s=0.5
    ) as app:
        yield app


async def holding_every_connection(store: Any, release: asyncio.Event) -> list[asyncio.Task[None]]:
    """Both of the small pool's connections, taken until `release` is set."""

    async def hold() -> None:
        async with store._connection():
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(2)]
    await asyncio.sleep(0.1)
    return holders


class TestWaitingForAConnection:
    async def test_a_wait_nothing_else_bounds_ends_in_503_after_the_acquire_timeout(
        self, small_pool_app: FastAPI, world: World
    ) -> None:
        admin = await world.admin()
        store = small_pool_app.state.store
        release = asyncio.Event()
        holders = await holding_every_connection(store, release)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=small_pool_app), base_url="http://t"
        ) as client:
            started = time.monotonic()
            waited = await client.get("/collection/settings", headers=admin.headers)
            elapsed = time.monotonic() - started
            assert waited.status_code == 503, waited.text
            assert waited.json()["error"] == "database_unavailable"
            assert 0.4 < elapsed < 2.0
            release.set()
            await asyncio.gather(*holders)
            assert store._checkouts == 0
            assert (await client.get("/collection/settings", headers=admin.headers)).status_code == 200

    async def test_checkouts_are_counted_back_after_cancelled_waits_and_failed_statements(
        self, small_pool_app: FastAPI, world: World
    ) -> None:
        admin = await world.admin()
        store = small_pool_app.state.store
        release = asyncio.Event()
        holders = await holding_every_connection(store, release)
        waiting = asyncio.create_task(store.get_settings(admin.org_id))
        await asyncio.sleep(0.1)
        assert store._checkouts == 3
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        await asyncio.gather(*holders)
        with pytest.raises(asyncpg.PostgresError):
            async with store._connection() as conn:
                await conn.execute("select 1/0")
        assert store._checkouts == 0
        pool = store._pool
        assert pool.get_idle_size() == pool.get_size()
