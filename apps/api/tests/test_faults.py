"""A slow database: statements held by a lock time out with a clear 503 after the configured
statement timeout instead of piling up, and the pool does not leak connections."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.main import create_app
from conftest import World, make_settings


@pytest.fixture
async def slow_app(migrated_dsn: str, tmp_path: Path) -> AsyncIterator[FastAPI]:
    settings = make_settings(
        migrated_dsn, tmp_path, db_statement_timeout_ms=300, db_pool_max_size=4, db_acquire_timeout_s=1.0
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
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
