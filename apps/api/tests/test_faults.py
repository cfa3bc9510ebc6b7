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

from app.database import PostgresTransport
from app.errors import DatabaseUnavailable
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
            pool = transport_of(slow_app).pool
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


class Held:
    """Both of the small pool's connections, taken until `release()` (at the latest when the test ends,
    so that a failing assertion cannot leave the pool waiting for them forever)."""

    def __init__(self, transport: PostgresTransport) -> None:
        self._free = asyncio.Event()

        async def hold() -> None:
            async with transport.connection():
                await self._free.wait()

        self._holders = [asyncio.create_task(hold()) for _ in range(2)]

    async def release(self) -> None:
        self._free.set()
        await asyncio.gather(*self._holders)


def transport_of(app: FastAPI) -> PostgresTransport:
    transport = app.state.store.transport
    assert isinstance(transport, PostgresTransport)
    return transport


async def every_connection_free(transport: PostgresTransport, timeout: float = 0.5) -> bool:
    """Whether every turn and connection of the pool can be taken at once (none leaked)."""
    size = transport.pool.get_max_size()
    everyone = asyncio.Barrier(size + 1)

    async def take() -> None:
        async with transport.connection():
            await everyone.wait()

    takers = [asyncio.create_task(take()) for _ in range(size)]
    try:
        async with asyncio.timeout(timeout):
            await everyone.wait()
        await asyncio.gather(*takers)
        return transport.pool.get_idle_size() == transport.pool.get_size()
    except TimeoutError:
        for taker in takers:
            taker.cancel()
        await asyncio.gather(*takers, return_exceptions=True)
        return False


@pytest.fixture
async def held(small_pool_app: FastAPI) -> AsyncIterator[Held]:
    holding = Held(transport_of(small_pool_app))
    await asyncio.sleep(0.1)
    try:
        yield holding
    finally:
        await holding.release()


class TestWaitingForAConnection:
    async def test_turns_come_back_after_cancelled_waits_and_failed_statements(
        self, small_pool_app: FastAPI, held: Held, world: World
    ) -> None:
        admin = await world.admin()
        transport = transport_of(small_pool_app)
        waiting = asyncio.create_task(small_pool_app.state.service.get_settings(admin.org_id))
        await asyncio.sleep(0.1)
        assert not waiting.done()  # behind the two held connections
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await held.release()
        with pytest.raises(asyncpg.PostgresError):
            async with transport.connection() as conn:
                await conn.execute("select 1/0")
        assert await every_connection_free(transport)

    async def test_waits_nothing_else_bounds_each_end_in_503_after_their_own_acquire_timeout(
        self, small_pool_app: FastAPI, held: Held, world: World
    ) -> None:
        admin = await world.admin()
        transport = transport_of(small_pool_app)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=small_pool_app), base_url="http://t"
        ) as client:

            async def waited(delay: float) -> tuple[tuple[int, str], float]:
                await asyncio.sleep(delay)
                started = time.monotonic()
                response = await client.get("/collection/settings", headers=admin.headers)
                return (response.status_code, response.json()["error"]), time.monotonic() - started

            answers = await asyncio.gather(*(waited(0.15 * i) for i in range(4)))
            assert [answer for answer, _ in answers] == [(503, "database_unavailable")] * 4
            # Each after its own 0.5 s, not all at the first one's deadline.
            assert all(0.45 < elapsed < 0.9 for _, elapsed in answers), answers
            await held.release()
            assert await every_connection_free(transport)
            assert (await client.get("/collection/settings", headers=admin.headers)).status_code == 200

    async def test_connections_go_to_waiters_in_the_order_they_asked(
        self, small_pool_app: FastAPI, held: Held, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        transport = transport_of(small_pool_app)
        served: list[str] = []

        async def use(name: str) -> None:
            async with transport.connection():
                served.append(name)
                await asyncio.sleep(0.01)

        newcomers: list[asyncio.Task[None]] = []
        give_back = asyncpg.pool.Pool.release

        async def release_as_a_newcomer_asks(pool: Any, connection: Any, *, timeout: Any = None) -> None:
            if len(newcomers) < 2:

                async def newcomer(name: str) -> None:
                    await asyncio.sleep(0)  # asks just after the connection is back, before its waiter runs
                    await use(name)

                newcomers.append(asyncio.create_task(newcomer(f"newcomer-{len(newcomers) + 1}")))
            await give_back(pool, connection, timeout=timeout)

        waiting = []
        for name in ("first", "second"):
            waiting.append(asyncio.create_task(use(name)))
            await asyncio.sleep(0.01)  # each asks after the one before
        monkeypatch.setattr(asyncpg.pool.Pool, "release", release_as_a_newcomer_asks)
        await held.release()
        await asyncio.gather(*waiting, *newcomers)
        monkeypatch.undo()
        # asyncpg's own queue lets a newcomer take a connection given back before the waiter woken
        # for it runs; a turn per connection keeps the order.
        assert served == ["first", "second", "newcomer-1", "newcomer-2"]
        assert await every_connection_free(transport)

    async def test_a_connection_still_coming_back_after_a_cancelled_release_is_waited_for_bounded(
        self, small_pool_app: FastAPI, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        transport = transport_of(small_pool_app)
        slow = asyncio.Event()
        give_back = asyncpg.pool.PoolConnectionHolder.release

        async def slow_release(holder: Any, timeout: Any) -> None:
            await slow.wait()  # as when asyncpg waits for a cancelled statement's cancellation
            await give_back(holder, timeout)

        monkeypatch.setattr(asyncpg.pool.PoolConnectionHolder, "release", slow_release)

        async def use() -> None:
            async with transport.connection() as conn:
                await conn.fetchval("select 1")

        users = [asyncio.create_task(use()) for _ in range(2)]
        try:
            await asyncio.sleep(0.2)  # both in their (slow, shielded) release
            for user in users:
                user.cancel()
            await asyncio.gather(*users, return_exceptions=True)
            # Their turns are back, their connections not yet: a newcomer waits in asyncpg's queue,
            # but no longer than the acquire timeout (0.5 s), as any wait for a connection.
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable):
                await use()
            assert 0.45 < time.monotonic() - started < 1.5
            slow.set()
            await asyncio.wait_for(use(), 2)  # once the connections are back, at once
        finally:
            monkeypatch.undo()
            slow.set()  # whatever happened above: the pool must get its connections back
        assert await every_connection_free(transport)
