"""The one seam between the service and the database.

Every operation is one call of a SQL function from supabase/migrations (one round trip, atomic).
`Store` is what the service depends on; `PostgresStore` reaches Postgres directly through asyncpg.
A second implementation (Supabase's REST API through supabase-py) calls the same functions.

Errors raised by the SQL functions carry SQLSTATE class 'CR' and become domain errors here.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

import asyncpg

from app.database import unavailable_as_503
from app.errors import (
    BudgetExceeded,
    CollectionError,
    ConcurrentRunLimit,
    InvalidTransition,
    RunNotFound,
)

Row = Mapping[str, Any]


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
    async def create_run(
        self,
        org_id: UUID,
        created_by: UUID | None,
        name: str,
        category_ids: Sequence[str],
        estimated_cost_cents: int,
        total_items: int,
    ) -> Row: ...
    async def get_run(self, org_id: UUID, run_id: UUID) -> Row | None: ...
    async def list_runs(self, org_id: UUID, limit: int, offset: int) -> tuple[list[Row], int]: ...
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
    async def readiness(self) -> str | None: ...
    async def close(self) -> None: ...


def domain_error(sqlstate: str | None, message: str, detail: str | None) -> CollectionError | None:
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
    return None


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool, acquire_timeout_s: float, migrations: Sequence[str]) -> None:
        self._pool = pool
        self._acquire_timeout_s = acquire_timeout_s
        self._migrations = list(migrations)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        async with unavailable_as_503():
            try:
                async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                    yield conn
            except asyncpg.PostgresError as exc:
                mapped = domain_error(exc.sqlstate, str(exc), getattr(exc, "detail", None))
                if mapped is None:
                    raise
                raise mapped from exc

    async def user_access(self, user_id: UUID) -> list[OrgAccess]:
        async with self._connection() as conn:
            rows = await conn.fetch("select * from public.collection_user_access($1)", user_id)
        return [
            OrgAccess(r["org_id"], r["org_slug"], r["role"], frozenset(r["permissions"])) for r in rows
        ]

    async def get_settings(self, org_id: UUID) -> Row:
        async with self._connection() as conn:
            row = await conn.fetchrow("select * from public.collection_get_settings($1)", org_id)
        assert row is not None
        return row

    async def update_settings(self, org_id: UUID, changes: Mapping[str, int | None]) -> Row:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "select * from public.collection_update_settings($1, $2, $3, $4)",
                org_id,
                changes.get("budget_cap_cents"),
                changes.get("soft_warning_percent"),
                changes.get("max_concurrent_runs"),
            )
        assert row is not None
        return row

    async def create_run(
        self,
        org_id: UUID,
        created_by: UUID | None,
        name: str,
        category_ids: Sequence[str],
        estimated_cost_cents: int,
        total_items: int,
    ) -> Row:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "select * from public.collection_create_run($1, $2, $3, $4, $5, $6)",
                org_id,
                created_by,
                name,
                list(category_ids),
                estimated_cost_cents,
                total_items,
            )
        assert row is not None
        return row

    async def get_run(self, org_id: UUID, run_id: UUID) -> Row | None:
        async with self._connection() as conn:
            row: Row | None = await conn.fetchrow(
                "select * from public.collection_get_run($1, $2)", org_id, run_id
            )
        return row

    async def list_runs(self, org_id: UUID, limit: int, offset: int) -> tuple[list[Row], int]:
        async with self._connection() as conn:
            page = await conn.fetchval(
                "select public.collection_list_runs($1, $2, $3)", org_id, limit, offset
            )
        return page["runs"], page["total"]

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
        assert row is not None
        return row

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
        assert row is not None
        return row

    async def incomplete_runs(self, limit: int) -> tuple[list[Row], int]:
        async with self._connection() as conn:
            found = await conn.fetchval("select public.collection_incomplete_runs($1)", limit)
        return found["runs"], found["total"]

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
        await self._pool.close()
