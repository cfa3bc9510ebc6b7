"""The Postgres pool, how connections are handed out, and how its failures become domain errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from app.config import Settings
from app.errors import DatabaseUnavailable, from_sqlstate
from app.operations import Operation, Shape

# Errors that mean "the database cannot answer right now", as opposed to "the request was wrong".
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, crash shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.QueryCanceledError,  # statement_timeout
    asyncpg.exceptions.LockNotAvailableError,  # lock_timeout
)


async def init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset on release: nothing to undo. asyncpg's default sends `SELECT pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL` after every use, a second round trip per request; our calls are
    single statements of SQL functions that set only transaction-local settings, take no session
    locks, open no cursors and never LISTEN. (asyncpg still rolls back a transaction left open.)"""


async def create_pool(settings: Settings) -> asyncpg.Pool:
    if settings.database_url is None:
        raise RuntimeError(
            "no DATABASE_URL: local mode starts the embedded Postgres first (collection-api serve)"
        )
    server_settings = {"application_name": "collection-api"}
    if not settings.uses_transaction_pooler:
        # Supabase's transaction pooler rejects start-up parameters it does not know; there the
        # client-side command_timeout alone bounds a statement.
        server_settings["statement_timeout"] = str(settings.db_statement_timeout_ms)
    # min_size=0: creating the pool opens no connection, so a server started while the database is
    # down still starts, answers 503, and connects once the database is back.
    return await asyncpg.create_pool(
        settings.database_url.get_secret_value(),
        min_size=0,
        max_size=settings.db_pool_max_size,
        timeout=settings.db_connect_timeout_s,
        command_timeout=settings.db_statement_timeout_ms / 1000 + 1,
        statement_cache_size=settings.statement_cache_size,
        server_settings=server_settings,
        init=init_connection,
        reset=keep_session,
    )


def as_unavailable(exc: BaseException) -> DatabaseUnavailable:
    """'The database cannot answer' (one of UNAVAILABLE_ERRORS) as DatabaseUnavailable (503 +
    Retry-After)."""
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError | asyncio.TimeoutError):
        return DatabaseUnavailable("The database did not answer in time; retry shortly")
    return DatabaseUnavailable()


class PostgresTransport:
    """Operations run on pooled connections, each taken in turn.

    A turn per connection of the pool, given in the order asked for: asyncpg's own queue lets a
    newcomer take a connection just given back before the waiter woken for it runs, which under load
    starves some requests (a p99 several times the median). Waiting for a turn is bounded by
    DB_ACQUIRE_TIMEOUT_S. With a turn, a connection is free at once, or can be opened (bounded by the
    connect timeout), except when a release cut short by a cancelled request is still finishing in
    the background (asyncpg shields it): from such a cancellation until every connection is back,
    asyncpg's own wait is bounded by the same timeout too.
    """

    def __init__(self, pool: asyncpg.Pool, acquire_timeout_s: float) -> None:
        self.pool = pool
        self.acquire_timeout_s = acquire_timeout_s
        self._turns = asyncio.BoundedSemaphore(pool.get_max_size())
        self._held = 0  # turns given and not yet back
        self._release_interrupted = False  # a connection may still be coming back without its turn

    def connection(self) -> Checkout:
        """`async with transport.connection() as conn:` one pooled connection, in turn; a database
        that cannot answer becomes DatabaseUnavailable (503), a rule the SQL enforces its domain error."""
        return Checkout(self)

    async def execute(self, operation: Operation[Any], args: Mapping[str, Any]) -> Any:
        async with Checkout(self) as conn:
            if operation.shape is Shape.VALUE:
                return await conn.fetchval(operation.sql, *args.values())
            return [dict(row) for row in await conn.fetch(operation.sql, *args.values())]

    async def take(self) -> PoolConnectionProxy[asyncpg.Record]:
        """A connection, in turn (give it back with `give_back`)."""
        turns, pool, timeout = self._turns, self.pool, self.acquire_timeout_s
        try:
            if turns.locked():
                async with asyncio.timeout(timeout):
                    await turns.acquire()
            else:
                await turns.acquire()  # at once
            try:
                if self._release_interrupted and pool.get_size() - pool.get_idle_size() > self._held:
                    # A connection in use without a turn: asyncpg's queue may wait for it.
                    conn = await pool.acquire(timeout=timeout)
                else:
                    self._release_interrupted = False  # every connection is back
                    conn = await pool.acquire()
            except BaseException:
                turns.release()
                raise
        except UNAVAILABLE_ERRORS as exc:
            raise as_unavailable(exc) from exc
        self._held += 1
        return conn

    async def give_back(self, conn: PoolConnectionProxy[asyncpg.Record], failed: bool) -> None:
        """The connection back to the pool, and its turn to the next in line."""
        try:
            # After a failure the release may have to wait for a statement's cancellation: bounded.
            await self.pool.release(conn, timeout=self.acquire_timeout_s if failed else None)
        except UNAVAILABLE_ERRORS as exc:
            if not failed:
                raise as_unavailable(exc) from exc
        except asyncio.CancelledError:
            self._release_interrupted = True  # the release goes on without us
            raise
        finally:
            self._held -= 1
            self._turns.release()

    async def close(self) -> None:
        await self.pool.close()


class Checkout:
    __slots__ = ("_transport", "_conn")

    def __init__(self, transport: PostgresTransport) -> None:
        self._transport = transport

    async def __aenter__(self) -> PoolConnectionProxy[asyncpg.Record]:
        self._conn = await self._transport.take()
        return self._conn

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        await self._transport.give_back(self._conn, exc is not None)
        if isinstance(exc, UNAVAILABLE_ERRORS):
            raise as_unavailable(exc) from exc
        if isinstance(exc, asyncpg.PostgresError):
            mapped = from_sqlstate(
                exc.sqlstate, getattr(exc, "detail", None), getattr(exc, "constraint_name", None)
            )
            if mapped is not None:
                raise mapped from exc
