"""The one seam between the service and the database.

Every operation is one call of a SQL function from supabase/migrations (one round trip, atomic).
`Store` is what the service depends on; `PostgresStore` reaches Postgres directly through asyncpg.
A second implementation (Supabase's REST API through supabase-py) calls the same functions.

Errors raised by the SQL functions carry SQLSTATE class 'CR' and become domain errors here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from app.database import UNAVAILABLE_ERRORS, as_unavailable
from app.errors import (
    BudgetExceeded,
    CollectionError,
    ConcurrentRunLimit,
    ConstraintViolation,
    InvalidTransition,
    LeaseLost,
    RunNotFound,
)

Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class OrgAccess:
    org_id: UUID
    org_slug: str
    role: str
    permissions: frozenset[str]


class Store(Protocol):
    async def user_access(self, user_id: UUID) -> list[OrgAccess]: ...
    async def get_settings(self, org_id: UUID) -> Row: ...
    async def update_settings(self, org_id: UUID, changes: Mapping[str, int | None]) -> Row: ...
    async def estimate_inputs(self, org_id: UUID, category_ids: Sequence[str]) -> Row: ...
    async def create_run(
        self,
        org_id: UUID,
        created_by: UUID | None,
        name: str,
        category_ids: Sequence[str],
        estimated_cost_cents: int,
        total_items: int,
        provider: str,
    ) -> Row: ...
    async def get_run(self, org_id: UUID, run_id: UUID) -> Row | None: ...
    # A page (after the run `after` = (created_at, id) names, else at `offset`), the total, and
    # whether the total is an estimate.
    async def list_runs(
        self,
        org_id: UUID,
        limit: int,
        offset: int,
        status: str | None = None,
        after: tuple[datetime, UUID] | None = None,
    ) -> tuple[list[Row], int, bool]: ...
    async def transition_run(
        self, org_id: UUID, run_id: UUID, action: str, actor: UUID | None, reason: str | None
    ) -> Row: ...
    async def checkpoint(
        self,
        org_id: UUID,
        run_id: UUID,
        step_key: str,
        checkpoint: Mapping[str, Any],
        processed_delta: int,
        failed_delta: int,
        cost_cents: int,
    ) -> Row: ...
    async def incomplete_runs(self, limit: int) -> tuple[list[Row], int]: ...
    async def list_items(
        self, org_id: UUID, run_id: UUID, status: str | None, limit: int, offset: int
    ) -> tuple[list[Row], int]: ...
    async def list_sellers(self, org_id: UUID, limit: int, offset: int) -> tuple[list[Row], int]: ...
    async def run_events_since(self, org_id: UUID, run_id: UUID, after_id: int) -> list[Row]: ...
    # The executor's operations: fenced by the lease token.
    async def claim_runs(self, owner: str, token: UUID, lease_s: int, limit: int) -> list[Row]: ...
    async def heartbeat(self, token: UUID, lease_s: int) -> dict[UUID, str]: ...
    async def release_run(self, run_id: UUID, token: UUID) -> None: ...
    async def run_categories(self, run_id: UUID) -> list[Row]: ...
    async def pending_items(self, run_id: UUID, category_id: str) -> list[Row]: ...
    async def reserve(self, run_id: UUID, token: UUID, cents: int) -> str: ...
    async def release_reservation(self, run_id: UUID, token: UUID, cents: int) -> None: ...
    async def record_discovery(
        self,
        run_id: UUID,
        token: UUID,
        position: int,
        products: list[dict[str, Any]],
        cost_cents: int,
        reserved_cents: int,
        error: str | None,
        estimated_per_category: int,
    ) -> Row: ...
    async def record_item(
        self,
        run_id: UUID,
        token: UUID,
        category_id: str,
        asin: str,
        status: str,
        attempts: int,
        cost_cents: int,
        reserved_cents: int,
        result: dict[str, Any] | None,
        error: str | None,
        sellers: list[dict[str, Any]],
        worker: str,
    ) -> Row: ...
    async def finish_run(self, run_id: UUID, token: UUID, action: str, reason: str | None) -> Row | None: ...
    async def run_status_counts(self) -> dict[str, int]: ...
    async def readiness(self) -> str | None: ...
    async def close(self) -> None: ...


def domain_error(
    sqlstate: str | None, detail: str | None, constraint: str | None = None
) -> CollectionError | None:
    """Map an error raised by one of our SQL functions to its domain error (None: not one of ours)."""
    info: dict[str, Any] = {}
    if detail:
        try:
            info = json.loads(detail)
        except ValueError:
            info = {}
    if sqlstate == "CR001":
        return BudgetExceeded(int(info["estimated_cost_cents"]), int(info["budget_cap_cents"]))
    if sqlstate == "CR002":
        return ConcurrentRunLimit(int(info["max_concurrent_runs"]))
    if sqlstate == "CR003":
        return RunNotFound()
    if sqlstate == "CR004":
        return InvalidTransition(str(info.get("action", "change")), str(info.get("status", "unknown")))
    if sqlstate == "CR005":
        return LeaseLost()
    if sqlstate == "23514":  # check_violation: a bound the schema enforces
        # Name the rule, never echo the row (Postgres' message carries every column of it).
        return ConstraintViolation(f"The request breaks the rule {constraint or 'of the schema'}")
    return None


def _row(record: asyncpg.Record | None) -> Row:
    # Every function called for one row returns exactly one (or raises).
    assert record is not None
    return dict(record)


class WaitBound:
    """Bounds waits that each last at most `seconds` with one timer for all of them.

    `asyncio.timeout` arms a timer of its own for every wait (a libuv timer under uvloop, started and
    stopped again: several µs a request when most waits end in a few ms). Here each wait
    (`async with bound():`) is an `asyncio.Timeout` with no deadline of its own, listed with its
    deadline; one timer, armed at the earliest deadline, gives each overdue wait its deadline when it
    fires, so that wait ends as `asyncio.timeout` would have ended it (TimeoutError in the waiting
    task, nothing else cancelled). Every wait lasts the same `seconds`, so the list is in deadline
    order and the timer only ever looks at its head. A wait that ends in time just leaves the list.
    """

    __slots__ = ("_seconds", "_waits", "_sweep", "_loop")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._waits: dict[asyncio.Timeout, float] = {}  # entered waits, in order of deadline
        self._sweep: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __call__(self) -> BoundedWait:
        return BoundedWait(self)

    def __len__(self) -> int:
        return len(self._waits)

    def _add(self, timeout: asyncio.Timeout) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._seconds
        self._waits[timeout] = deadline
        if self._sweep is None or self._loop is not loop:
            self._loop = loop
            self._sweep = loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        assert self._loop is not None
        self._sweep = None
        now = self._loop.time()
        while self._waits:
            timeout, deadline = next(iter(self._waits.items()))
            if deadline > now + 0.001:  # the loop's clock may run a hair behind the timer's
                self._sweep = self._loop.call_at(deadline, self._expire)
                return
            del self._waits[timeout]
            if timeout.expired() or timeout.when() is not None:
                continue  # already ending
            timeout.reschedule(now)  # expires on the loop's next turn, as an asyncio.timeout would

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._waits.clear()


class BoundedWait:
    """One wait of a WaitBound: `async with` around what is waited for."""

    __slots__ = ("_bound", "_timeout")

    def __init__(self, bound: WaitBound) -> None:
        self._bound = bound
        self._timeout = asyncio.Timeout(None)

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()
        self._bound._add(self._timeout)

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self._bound._waits.pop(self._timeout, None)
        await self._timeout.__aexit__(kind, exc, tb)


class Checkout:
    """`async with store._connection() as conn`: a pooled connection for one operation; a database that
    cannot answer becomes DatabaseUnavailable (503) and a rule the SQL enforces a domain error.

    A connection is taken in turn: one turn per connection of the pool, given in the order asked for.
    asyncpg's own queue lets a newcomer take a connection just given back before the waiter woken for
    it runs, which under load starves some requests (a p99 several times the median at c=64); with
    turns the wait is first come, first served. A turn goes back when its connection is back in the
    pool, so with a turn free `acquire` takes a connection at once (or opens it, which the pool's
    connect timeout and the statement timeout bound); waiting for
    a turn is bounded by DB_ACQUIRE_TIMEOUT_S through the store's `WaitBound` (one timer for all waits:
    a timer per request cost ~10 µs of it under load, benchmarks/README.md). Giving a connection back
    after a clean operation waits for nothing that the connection's command timeout does not bound
    already (asyncpg applies it to a ROLLBACK of a transaction left open and to the recycling close;
    no operation here catches a statement's error and goes on, which could leave a cancel in flight);
    after a failure (a cancelled statement may still be being cancelled) it is bounded by
    DB_ACQUIRE_TIMEOUT_S too. `_checkouts` counts connections taken or waited for (for tests and
    bookkeeping).
    """

    __slots__ = ("_store", "_conn")

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    async def __aenter__(self) -> PoolConnectionProxy[asyncpg.Record]:
        store = self._store
        turns = store._turns
        store._checkouts += 1
        try:
            if turns.locked():
                async with store._waits():
                    await turns.acquire()
            else:
                await turns.acquire()  # at once
            try:
                self._conn: PoolConnectionProxy[asyncpg.Record] = await store._pool.acquire()
            except BaseException:
                turns.release()
                raise
        except BaseException as exc:
            store._checkouts -= 1
            if isinstance(exc, UNAVAILABLE_ERRORS):
                raise as_unavailable(exc) from exc
            raise
        return self._conn

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        store = self._store
        turn_back = True
        try:
            await store._pool.release(self._conn, timeout=None if exc is None else store._acquire_timeout_s)
        except UNAVAILABLE_ERRORS as release_error:
            if exc is None:
                raise as_unavailable(release_error) from release_error
        except asyncio.CancelledError:
            # Cancelled while asyncpg's (shielded) release goes on, e.g. waiting for a statement's
            # cancellation: the turn goes back with the connection, not before it.
            holder = self._conn._holder
            if not holder.is_idle():
                turn_back = False
                store._checkouts -= 1
                released = asyncio.ensure_future(holder.wait_until_released())
                released.add_done_callback(lambda _: store._turns.release())
            raise
        finally:
            if turn_back:
                store._checkouts -= 1
                store._turns.release()
        if isinstance(exc, UNAVAILABLE_ERRORS):
            raise as_unavailable(exc) from exc
        if isinstance(exc, asyncpg.PostgresError):
            mapped = domain_error(
                exc.sqlstate, getattr(exc, "detail", None), getattr(exc, "constraint_name", None)
            )
            if mapped is not None:
                raise mapped from exc


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool, acquire_timeout_s: float, migrations: Sequence[str]) -> None:
        self._pool = pool
        self._pool_size = pool.get_max_size()
        self._checkouts = 0  # connections taken or being waited for, through Checkout (the only way)
        self._acquire_timeout_s = acquire_timeout_s
        # A turn per connection, given in the order asked for (asyncpg's own queue lets a newcomer take a
        # connection just given back before the waiter woken for it), and waits for one bounded.
        self._turns = asyncio.BoundedSemaphore(self._pool_size)
        self._waits = WaitBound(acquire_timeout_s)
        self._migrations = list(migrations)

    def _connection(self) -> Checkout:
        return Checkout(self)

    async def user_access(self, user_id: UUID) -> list[OrgAccess]:
        async with self._connection() as conn:
            rows = await conn.fetch("select * from public.collection_user_access($1)", user_id)
        return [OrgAccess(r["org_id"], r["org_slug"], r["role"], frozenset(r["permissions"])) for r in rows]

    async def get_settings(self, org_id: UUID) -> Row:
        async with self._connection() as conn:
            row = await conn.fetchrow("select * from public.collection_get_settings($1)", org_id)
        return _row(row)

    async def update_settings(self, org_id: UUID, changes: Mapping[str, int | None]) -> Row:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "select * from public.collection_update_settings($1, $2, $3, $4)",
                org_id,
                changes.get("budget_cap_cents"),
                changes.get("soft_warning_percent"),
                changes.get("max_concurrent_runs"),
            )
        return _row(row)

    async def estimate_inputs(self, org_id: UUID, category_ids: Sequence[str]) -> Row:
        inputs: Row = await self._value(
            "select public.collection_estimate_inputs($1, $2)", org_id, list(category_ids)
        )
        return inputs

    async def create_run(
        self,
        org_id: UUID,
        created_by: UUID | None,
        name: str,
        category_ids: Sequence[str],
        estimated_cost_cents: int,
        total_items: int,
        provider: str,
    ) -> Row:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "select * from public.collection_create_run($1, $2, $3, $4, $5, $6, $7)",
                org_id,
                created_by,
                name,
                list(category_ids),
                estimated_cost_cents,
                total_items,
                provider,
            )
        return _row(row)

    async def get_run(self, org_id: UUID, run_id: UUID) -> Row | None:
        async with self._connection() as conn:
            row = await conn.fetchrow("select * from public.collection_get_run($1, $2)", org_id, run_id)
        return None if row is None else dict(row)

    async def list_runs(
        self,
        org_id: UUID,
        limit: int,
        offset: int,
        status: str | None = None,
        after: tuple[datetime, UUID] | None = None,
    ) -> tuple[list[Row], int, bool]:
        async with self._connection() as conn:
            if after is None:
                page = await conn.fetchval(
                    "select public.collection_list_runs($1, $2, $3, $4)", org_id, limit, offset, status
                )
            else:
                page = await conn.fetchval(
                    "select public.collection_list_runs_after($1, $2, $3, $4, $5)",
                    org_id,
                    limit,
                    after[0],
                    after[1],
                    status,
                )
        return page["runs"], page["total"], page.get("total_estimated", False)

    async def transition_run(
        self, org_id: UUID, run_id: UUID, action: str, actor: UUID | None, reason: str | None
    ) -> Row:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "select * from public.collection_transition_run($1, $2, $3, $4, $5)",
                org_id,
                run_id,
                action,
                actor,
                reason,
            )
        return _row(row)

    async def checkpoint(
        self,
        org_id: UUID,
        run_id: UUID,
        step_key: str,
        checkpoint: Mapping[str, Any],
        processed_delta: int,
        failed_delta: int,
        cost_cents: int,
    ) -> Row:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "select * from public.collection_checkpoint($1, $2, $3, $4, $5, $6, $7)",
                org_id,
                run_id,
                step_key,
                dict(checkpoint),
                processed_delta,
                failed_delta,
                cost_cents,
            )
        return _row(row)

    async def incomplete_runs(self, limit: int) -> tuple[list[Row], int]:
        async with self._connection() as conn:
            found = await conn.fetchval("select public.collection_incomplete_runs($1)", limit)
        return found["runs"], found["total"]

    async def list_items(
        self, org_id: UUID, run_id: UUID, status: str | None, limit: int, offset: int
    ) -> tuple[list[Row], int]:
        page = await self._value(
            "select public.collection_list_items($1, $2, $3, $4, $5)", org_id, run_id, status, limit, offset
        )
        return page["items"], page["total"]

    async def list_sellers(self, org_id: UUID, limit: int, offset: int) -> tuple[list[Row], int]:
        page = await self._value("select public.collection_list_sellers($1, $2, $3)", org_id, limit, offset)
        return page["sellers"], page["total"]

    async def run_events_since(self, org_id: UUID, run_id: UUID, after_id: int) -> list[Row]:
        return await self._rows(
            "select * from public.collection_run_events_since($1, $2, $3)", org_id, run_id, after_id
        )

    async def claim_runs(self, owner: str, token: UUID, lease_s: int, limit: int) -> list[Row]:
        return await self._rows(
            "select * from public.collection_claim_runs($1, $2, $3, $4)", owner, token, lease_s, limit
        )

    async def heartbeat(self, token: UUID, lease_s: int) -> dict[UUID, str]:
        rows = await self._rows("select * from public.collection_heartbeat($1, $2)", token, lease_s)
        return {row["id"]: row["status"] for row in rows}

    async def release_run(self, run_id: UUID, token: UUID) -> None:
        await self._value("select public.collection_release_run($1, $2)", run_id, token)

    async def run_categories(self, run_id: UUID) -> list[Row]:
        return await self._rows("select * from public.collection_run_categories_of($1)", run_id)

    async def pending_items(self, run_id: UUID, category_id: str) -> list[Row]:
        return await self._rows("select * from public.collection_pending_items($1, $2)", run_id, category_id)

    async def reserve(self, run_id: UUID, token: UUID, cents: int) -> str:
        outcome: str = await self._value("select public.collection_reserve($1, $2, $3)", run_id, token, cents)
        return outcome

    async def release_reservation(self, run_id: UUID, token: UUID, cents: int) -> None:
        await self._value("select public.collection_release_reservation($1, $2, $3)", run_id, token, cents)

    async def record_discovery(
        self,
        run_id: UUID,
        token: UUID,
        position: int,
        products: list[dict[str, Any]],
        cost_cents: int,
        reserved_cents: int,
        error: str | None,
        estimated_per_category: int,
    ) -> Row:
        rows = await self._rows(
            "select * from public.collection_record_discovery($1, $2, $3, $4, $5, $6, $7, $8)",
            run_id,
            token,
            position,
            products,
            cost_cents,
            reserved_cents,
            error,
            estimated_per_category,
        )
        return rows[0]

    async def record_item(
        self,
        run_id: UUID,
        token: UUID,
        category_id: str,
        asin: str,
        status: str,
        attempts: int,
        cost_cents: int,
        reserved_cents: int,
        result: dict[str, Any] | None,
        error: str | None,
        sellers: list[dict[str, Any]],
        worker: str,
    ) -> Row:
        rows = await self._rows(
            "select * from public.collection_record_item($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            run_id,
            token,
            category_id,
            asin,
            status,
            attempts,
            cost_cents,
            reserved_cents,
            result,
            error,
            sellers,
            worker,
        )
        return rows[0]

    async def finish_run(self, run_id: UUID, token: UUID, action: str, reason: str | None) -> Row | None:
        rows = await self._rows(
            "select * from public.collection_finish_run($1, $2, $3, $4)", run_id, token, action, reason
        )
        # A composite result that is null comes back as a row of nulls.
        return rows[0] if rows and rows[0]["id"] is not None else None

    async def run_status_counts(self) -> dict[str, int]:
        rows = await self._rows("select * from public.collection_run_status_counts()")
        return {row["status"]: row["runs"] for row in rows}

    async def _rows(self, query: str, *args: Any) -> list[Row]:
        async with self._connection() as conn:
            return [dict(r) for r in await conn.fetch(query, *args)]

    async def _value(self, query: str, *args: Any) -> Any:
        async with self._connection() as conn:
            return await conn.fetchval(query, *args)

    async def readiness(self) -> str | None:
        """None when ready; otherwise why not (database unreachable, migrations missing)."""
        try:
            async with self._connection() as conn:
                applied = await conn.fetchval(
                    "select coalesce(array_agg(version), '{}') from supabase_migrations.schema_migrations"
                )
        except CollectionError as exc:
            return exc.message
        except asyncpg.UndefinedTableError:
            return "migrations have not been applied"
        missing = sorted(set(self._migrations) - set(applied))
        if missing:
            return f"migrations not applied: {', '.join(missing)}"
        return None

    async def close(self) -> None:
        self._waits.close()
        await self._pool.close()
