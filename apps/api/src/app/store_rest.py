"""The Store through Supabase's REST API (PostgREST), with supabase-py's async client.

For projects that hold only a URL and the service-role key. Every operation is one `rpc` call of the
same SQL function `PostgresStore` calls, with named arguments: PostgREST runs each call in one
transaction, so budget, concurrency, transitions, leases and checkpoints keep their atomic semantics.
Listing totals come from the list functions themselves, computed in the same call as the page, exactly
as in the direct mode (same `total`, same `total_estimated`); PostgREST's `Prefer: count=` is not used.

PostgREST answers an error as `{code, message, details, hint}`. Our functions' SQLSTATEs (CR001..CR005,
23514) become the same domain errors as in the direct mode (`domain_error`); whatever means "the data
cannot be reached now" becomes DatabaseUnavailable (503 + Retry-After): transport errors and timeouts,
PGRST000..003, Postgres classes 08/53/57, non-JSON 5xx pages of a proxy, a refused key (logged: an
operator must fix it), functions missing from the schema cache (migrations not applied). Anything else
is a bug and is raised as RestStoreError, answered 500 like an unexpected asyncpg error in the direct mode.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import httpx
from postgrest.exceptions import APIError
from supabase import AsyncClient, AsyncClientOptions, AsyncSupabaseException, create_async_client

from app.config import Settings
from app.errors import CollectionError, DatabaseUnavailable
from app.store import OrgAccess, Row, domain_error

logger = logging.getLogger(__name__)

# PostgREST's own "cannot reach the database" errors (Errors > PostgREST Error Codes, group 0).
UNAVAILABLE_CODES = frozenset({"PGRST000", "PGRST001", "PGRST002", "PGRST003"})
# Postgres classes PostgREST passes on with 503 or 500 that mean "not now" (the direct mode's
# UNAVAILABLE_ERRORS): connection exception, insufficient resources, operator intervention
# (57014: statement_timeout), lock_not_available.
UNAVAILABLE_CLASSES = ("08", "53", "57")
TIMEOUT_CODES = frozenset({"PGRST003", "57014", "55P03", "504"})
# The function (or its table) is not in the API's schema cache: the migrations are not applied yet.
SCHEMA_MISSING_CODES = frozenset({"PGRST202", "PGRST205", "42883", "42P01"})
# The key was refused: by the gateway (401 without a PostgREST body), by PostgREST (JWT errors, group
# 3) or by Postgres (the key's role lacks a grant).
CREDENTIALS_REFUSED_CODES = frozenset({"401", "403", "PGRST300", "PGRST301", "PGRST302", "PGRST303", "42501"})

# Columns that asyncpg hands back as UUID (and PostgREST as strings) in rows of runs, items, sellers,
# events and access; timestamps are every column named *_at.
UUID_COLUMNS = frozenset(
    {"id", "org_id", "run_id", "created_by", "actor", "lease_token", "first_run_id", "last_run_id"}
)
CONSTRAINT_NAME = re.compile(r'constraint "([^"]+)"')


class RestStoreError(RuntimeError):
    """A PostgREST error that is neither a domain error nor unavailability: a bug, answered 500."""

    def __init__(self, function: str, error: APIError) -> None:
        super().__init__(f"{function}: {error.code} {error.message} ({error.details})")
        self.code = error.code


def rest_error(error: APIError) -> CollectionError | None:
    """The domain error (or DatabaseUnavailable) an error answer of the REST API stands for."""
    code = str(error.code or "")
    details = (
        error.details
        if isinstance(error.details, str) or error.details is None
        else json.dumps(error.details)
    )
    constraint = CONSTRAINT_NAME.search(error.message or "")
    mapped = domain_error(code, details, constraint.group(1) if constraint else None)
    if mapped is not None:
        return mapped
    if code in TIMEOUT_CODES:
        return DatabaseUnavailable("The database did not answer in time; retry shortly")
    if code in UNAVAILABLE_CODES or (code[:2] in UNAVAILABLE_CLASSES and code != "53400"):
        return DatabaseUnavailable()
    if len(code) == 3 and code.isdigit() and code >= "500":
        # Not PostgREST's JSON but a gateway's or proxy's own page: postgrest-py puts the HTTP status
        # (three digits; a SQLSTATE has five) where the code goes.
        return DatabaseUnavailable()
    if code in SCHEMA_MISSING_CODES:
        logger.error("the REST API does not know a function of this service: %s %s", code, error.message)
        return DatabaseUnavailable("The database schema is not up to date; retry shortly")
    if code in CREDENTIALS_REFUSED_CODES or not code:
        logger.error(
            "the Supabase REST API refused this service's key (check SUPABASE_SERVICE_ROLE_KEY): %s %s",
            code or "(no code)",
            error.message,
        )
        return DatabaseUnavailable()
    return None


def typed(row: Mapping[str, Any]) -> Row:
    """A row as PostgresStore returns it: uuids and timestamps as Python objects, not JSON strings."""
    converted = dict(row)
    for column, value in row.items():
        if not isinstance(value, str):
            continue
        if column in UUID_COLUMNS:
            converted[column] = UUID(value)
        elif column.endswith("_at"):
            converted[column] = datetime.fromisoformat(value)
    return converted


class SupabaseRestStore:
    # Set-returning reads fetched page by page: PostgREST cuts every answer at its max-rows (Supabase's
    # default: 1000). Only stable functions: paging re-runs the call.
    page_size = 1000

    def __init__(self, client: AsyncClient, http: httpx.AsyncClient, migrations: Sequence[str]) -> None:
        self._client = client
        self._http = http
        self._migrations = list(migrations)

    @classmethod
    async def connect(cls, settings: Settings, migrations: Sequence[str]) -> SupabaseRestStore:
        """One client per process. Opens no connection: a service started while the API is down
        still starts, answers 503, and reaches the API once it is back."""
        assert settings.supabase_url is not None and settings.supabase_service_role_key is not None
        # Our own HTTP client, so its timeouts are the direct mode's: a statement's time plus a second
        # to read, the connect timeout to connect, the acquire timeout to wait for a free connection.
        http = httpx.AsyncClient(
            http2=True,
            follow_redirects=False,
            timeout=httpx.Timeout(
                settings.db_statement_timeout_ms / 1000 + 1,
                connect=settings.db_connect_timeout_s,
                pool=settings.db_acquire_timeout_s,
            ),
        )
        options = AsyncClientOptions(
            httpx_client=http,
            # Never resend a call: most of ours are not idempotent, and a 503 reaches our caller at once.
            postgrest_client_retry=False,
            auto_refresh_token=False,
            persist_session=False,
        )
        try:
            client = await create_async_client(
                settings.supabase_url, settings.supabase_service_role_key.get_secret_value(), options
            )
        except AsyncSupabaseException as exc:
            await http.aclose()
            raise RuntimeError(f"cannot use SUPABASE_URL {settings.supabase_url}: {exc.message}") from exc
        return cls(client, http, migrations)

    async def _rpc(
        self, function: str, params: Mapping[str, Any], order: str | None = None, page: int = 0
    ) -> Any:
        request = self._client.rpc(function, dict(params))
        if order is not None:
            request = request.order(order).range(page, page + self.page_size - 1)
        try:
            response = await request.execute()
        except APIError as exc:
            mapped = rest_error(exc)
            if mapped is None:
                raise RestStoreError(function, exc) from exc
            raise mapped from exc
        except httpx.TimeoutException as exc:
            raise DatabaseUnavailable("The database did not answer in time; retry shortly") from exc
        except httpx.HTTPError as exc:
            raise DatabaseUnavailable() from exc
        return response.data

    async def _row(self, function: str, params: Mapping[str, Any]) -> Row:
        # A function returning one composite: PostgREST answers one JSON object.
        data = await self._rpc(function, params)
        assert isinstance(data, dict), f"{function} answered {type(data).__name__}, not one row"
        return typed(data)

    async def _rows(self, function: str, params: Mapping[str, Any]) -> list[Row]:
        return [typed(row) for row in await self._rpc(function, params)]

    async def _all_rows(self, function: str, params: Mapping[str, Any], order: str) -> list[Row]:
        """Every row of a stable set-returning function, in `order`, however low max-rows is set."""
        rows: list[Row] = []
        while True:
            page = await self._rpc(function, params, order, len(rows))
            if not page:
                return rows
            rows.extend(typed(row) for row in page)

    async def user_access(self, user_id: UUID) -> list[OrgAccess]:
        rows = await self._rpc("collection_user_access", {"p_user_id": user_id})
        return [
            OrgAccess(UUID(r["org_id"]), r["org_slug"], r["role"], frozenset(r["permissions"])) for r in rows
        ]

    async def get_settings(self, org_id: UUID) -> Row:
        return await self._row("collection_get_settings", {"p_org_id": org_id})

    async def update_settings(self, org_id: UUID, changes: Mapping[str, int | None]) -> Row:
        return await self._row(
            "collection_update_settings",
            {
                "p_org_id": org_id,
                "p_budget_cap_cents": changes.get("budget_cap_cents"),
                "p_soft_warning_percent": changes.get("soft_warning_percent"),
                "p_max_concurrent_runs": changes.get("max_concurrent_runs"),
            },
        )

    async def estimate_inputs(self, org_id: UUID, category_ids: Sequence[str]) -> Row:
        inputs: Row = await self._rpc(
            "collection_estimate_inputs", {"p_org_id": org_id, "p_category_ids": list(category_ids)}
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
        return await self._row(
            "collection_create_run",
            {
                "p_org_id": org_id,
                "p_created_by": created_by,
                "p_name": name,
                "p_category_ids": list(category_ids),
                "p_estimated_cost_cents": estimated_cost_cents,
                "p_total_items": total_items,
                "p_provider": provider,
            },
        )

    async def get_run(self, org_id: UUID, run_id: UUID) -> Row | None:
        rows = await self._rows("collection_get_run", {"p_org_id": org_id, "p_run_id": run_id})
        return rows[0] if rows else None

    async def list_runs(
        self,
        org_id: UUID,
        limit: int,
        offset: int,
        status: str | None = None,
        after: tuple[datetime, UUID] | None = None,
    ) -> tuple[list[Row], int, bool]:
        if after is None:
            page = await self._rpc(
                "collection_list_runs",
                {"p_org_id": org_id, "p_limit": limit, "p_offset": offset, "p_status": status},
            )
        else:
            page = await self._rpc(
                "collection_list_runs_after",
                {
                    "p_org_id": org_id,
                    "p_limit": limit,
                    "p_after_created_at": after[0].isoformat(),
                    "p_after_id": after[1],
                    "p_status": status,
                },
            )
        return page["runs"], page["total"], page.get("total_estimated", False)

    async def transition_run(
        self, org_id: UUID, run_id: UUID, action: str, actor: UUID | None, reason: str | None
    ) -> Row:
        return await self._row(
            "collection_transition_run",
            {
                "p_org_id": org_id,
                "p_run_id": run_id,
                "p_action": action,
                "p_actor": actor,
                "p_reason": reason,
            },
        )

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
        return await self._row(
            "collection_checkpoint",
            {
                "p_org_id": org_id,
                "p_run_id": run_id,
                "p_step_key": step_key,
                "p_checkpoint": dict(checkpoint),
                "p_processed_delta": processed_delta,
                "p_failed_delta": failed_delta,
                "p_cost_cents": cost_cents,
            },
        )

    async def incomplete_runs(self, limit: int) -> tuple[list[Row], int]:
        found = await self._rpc("collection_incomplete_runs", {"p_limit": limit})
        return found["runs"], found["total"]

    async def list_items(
        self, org_id: UUID, run_id: UUID, status: str | None, limit: int, offset: int
    ) -> tuple[list[Row], int]:
        page = await self._rpc(
            "collection_list_items",
            {
                "p_org_id": org_id,
                "p_run_id": run_id,
                "p_status": status,
                "p_limit": limit,
                "p_offset": offset,
            },
        )
        return page["items"], page["total"]

    async def list_sellers(self, org_id: UUID, limit: int, offset: int) -> tuple[list[Row], int]:
        page = await self._rpc(
            "collection_list_sellers", {"p_org_id": org_id, "p_limit": limit, "p_offset": offset}
        )
        return page["sellers"], page["total"]

    async def run_events_since(self, org_id: UUID, run_id: UUID, after_id: int) -> list[Row]:
        # One page, oldest first, not every page: the progress stream polls several times a second
        # from the last id it saw, so a page cut at max-rows only moves the rest to its next poll.
        rows = await self._rpc(
            "collection_run_events_since",
            {"p_org_id": org_id, "p_run_id": run_id, "p_after_id": after_id},
            "id",
        )
        return [typed(row) for row in rows]

    # Volatile set-returning functions are called once, never paged: paging would run them again.
    # They return at most `limit` runs (claim) or the runs this process holds (heartbeat), which
    # RUNS_PER_PROCESS keeps far below any max-rows.
    async def claim_runs(self, owner: str, token: UUID, lease_s: int, limit: int) -> list[Row]:
        return await self._rows(
            "collection_claim_runs",
            {"p_owner": owner, "p_token": token, "p_lease_s": lease_s, "p_limit": limit},
        )

    async def heartbeat(self, token: UUID, lease_s: int) -> dict[UUID, str]:
        rows = await self._rows("collection_heartbeat", {"p_token": token, "p_lease_s": lease_s})
        return {row["id"]: row["status"] for row in rows}

    async def release_run(self, run_id: UUID, token: UUID) -> None:
        await self._rpc("collection_release_run", {"p_run_id": run_id, "p_token": token})

    async def run_categories(self, run_id: UUID) -> list[Row]:
        return await self._all_rows("collection_run_categories_of", {"p_run_id": run_id}, "position")

    async def pending_items(self, run_id: UUID, category_id: str) -> list[Row]:
        return await self._all_rows(
            "collection_pending_items", {"p_run_id": run_id, "p_category_id": category_id}, "position"
        )

    async def reserve(self, run_id: UUID, token: UUID, cents: int) -> str:
        outcome: str = await self._rpc(
            "collection_reserve", {"p_run_id": run_id, "p_token": token, "p_cents": cents}
        )
        return outcome

    async def release_reservation(self, run_id: UUID, token: UUID, cents: int) -> None:
        await self._rpc(
            "collection_release_reservation", {"p_run_id": run_id, "p_token": token, "p_cents": cents}
        )

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
        return await self._row(
            "collection_record_discovery",
            {
                "p_run_id": run_id,
                "p_token": token,
                "p_position": position,
                "p_products": products,
                "p_cost_cents": cost_cents,
                "p_reserved_cents": reserved_cents,
                "p_error": error,
                "p_estimated_per_category": estimated_per_category,
            },
        )

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
        return await self._row(
            "collection_record_item",
            {
                "p_run_id": run_id,
                "p_token": token,
                "p_category_id": category_id,
                "p_asin": asin,
                "p_status": status,
                "p_attempts": attempts,
                "p_cost_cents": cost_cents,
                "p_reserved_cents": reserved_cents,
                "p_result": result,
                "p_error": error,
                "p_sellers": sellers,
                "p_worker": worker,
            },
        )

    async def finish_run(self, run_id: UUID, token: UUID, action: str, reason: str | None) -> Row | None:
        row = await self._rpc(
            "collection_finish_run",
            {"p_run_id": run_id, "p_token": token, "p_action": action, "p_reason": reason},
        )
        # A null composite comes back as an object of nulls (PostgREST selects `fn.*` from the call).
        return typed(row) if isinstance(row, dict) and row.get("id") is not None else None

    async def run_status_counts(self) -> dict[str, int]:
        rows = await self._rpc("collection_run_status_counts", {})
        return {row["status"]: row["runs"] for row in rows}

    async def readiness(self) -> str | None:
        """None when ready; otherwise why not (API or database down, key refused, migrations missing)."""
        try:
            applied = await self._rpc("collection_applied_migrations", {})
        except DatabaseUnavailable as exc:
            if isinstance(exc.__cause__, APIError) and exc.__cause__.code in SCHEMA_MISSING_CODES:
                return (
                    "migrations have not been applied (the REST API knows no "
                    "collection_applied_migrations(); `supabase db push`)"
                )
            return exc.message
        except CollectionError as exc:
            return exc.message
        missing = sorted(set(self._migrations) - set(applied))
        if missing:
            return f"migrations not applied: {', '.join(missing)}"
        return None

    async def close(self) -> None:
        # The client's sub-clients (PostgREST, auth) share this one HTTP client; nothing else is open.
        await self._http.aclose()
