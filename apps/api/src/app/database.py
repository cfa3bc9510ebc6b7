"""The Postgres pool, and how its failures become domain errors."""

from __future__ import annotations

import asyncio
import json

import asyncpg

from app.config import Settings
from app.errors import DatabaseUnavailable

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


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
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
        init=_init_connection,
        reset=_keep_session,
    )


def as_unavailable(exc: BaseException) -> DatabaseUnavailable:
    """'The database cannot answer' (one of UNAVAILABLE_ERRORS) as DatabaseUnavailable (503 +
    Retry-After)."""
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError | asyncio.TimeoutError):
        return DatabaseUnavailable("The database did not answer in time; retry shortly")
    return DatabaseUnavailable()
