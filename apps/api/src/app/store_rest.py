"""The operations through Supabase's REST API (PostgREST), with supabase-py's async client.

For projects that hold only a URL and the service-role key. Every operation is one `rpc` call of the
same SQL function the direct mode calls, with the same named arguments: PostgREST runs each call in one
transaction, so budget, concurrency, transitions, leases and checkpoints keep their atomic semantics.
Listing totals come from the list functions themselves, computed in the same call as the page, exactly
as in the direct mode (same `total`, same `total_estimated`); PostgREST's `Prefer: count=` is not used.

PostgREST answers an error as `{code, message, details, hint}`. Our functions' SQLSTATEs (CR001..CR005,
23514) become the same domain errors as in the direct mode (`errors.from_sqlstate`); whatever means "the data
cannot be reached now" becomes DatabaseUnavailable (503 + Retry-After): transport errors and timeouts,
PGRST000..003, Postgres classes 08/53/57, non-JSON 5xx pages of a proxy, a refused key (logged: an
operator must fix it), functions missing from the schema cache (migrations not applied). Anything else
is a bug and is raised as RestStoreError, answered 500 like an unexpected asyncpg error in the direct mode.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

import httpx
from postgrest.exceptions import APIError
from supabase import AsyncClient, AsyncClientOptions, AsyncSupabaseException, create_async_client

from app.config import Settings
from app.errors import CollectionError, DatabaseUnavailable, SchemaOutOfDate, from_sqlstate
from app.operations import Operation, Shape

logger = logging.getLogger(__name__)

# PostgREST's own "cannot reach the database" errors (Errors > PostgREST Error Codes, group 0).
UNAVAILABLE_CODES = frozenset({"PGRST000", "PGRST001", "PGRST002", "PGRST003"})
# Postgres classes PostgREST passes on with 503 or 500 that mean "not now" (the direct mode's
# UNAVAILABLE_ERRORS): connection exception, insufficient resources, operator intervention
# (57014: statement_timeout), lock_not_available.
UNAVAILABLE_CLASSES = ("08", "53", "57")
TIMEOUT_CODES = frozenset({"PGRST003", "57014", "55P03", "504"})
# The function (or its table) is not in the API's schema cache: the migrations are not applied yet.
SCHEMA_MISSING_CODES = frozenset({"PGRST202", "PGRST205"})
# The key was refused: by the gateway (401 without a PostgREST body), by PostgREST (JWT errors, group
# 3) or by Postgres (the key's role lacks a grant).
CREDENTIALS_REFUSED_CODES = frozenset({"401", "403", "PGRST300", "PGRST301", "PGRST302", "PGRST303", "42501"})

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
    mapped = from_sqlstate(code, details, constraint.group(1) if constraint else None)
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
        return SchemaOutOfDate()
    if code in CREDENTIALS_REFUSED_CODES or not code:
        logger.error(
            "the Supabase REST API refused this service's key (check SUPABASE_SERVICE_ROLE_KEY): %s %s",
            code or "(no code)",
            error.message,
        )
        return DatabaseUnavailable()
    return None


class RestTransport:
    def __init__(self, client: AsyncClient, http: httpx.AsyncClient) -> None:
        self._client = client
        self._http = http

    @classmethod
    async def connect(cls, settings: Settings) -> RestTransport:
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
        return cls(client, http)

    async def execute(self, operation: Operation[Any], args: Mapping[str, Any]) -> Any:
        data = await self._rpc(operation.function, args)
        if operation.shape is Shape.VALUE:
            return data
        # A function returning one composite (or OUT parameters) is answered as one JSON object, a set
        # as an array.
        return [data] if isinstance(data, dict) else data

    async def _rpc(self, function: str, params: Mapping[str, Any]) -> Any:
        try:
            response = await self._client.rpc(function, dict(params)).execute()
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

    async def close(self) -> None:
        # The client's sub-clients (PostgREST, auth) share this one HTTP client; nothing else is open.
        await self._http.aclose()
