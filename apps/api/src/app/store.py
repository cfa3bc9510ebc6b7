"""The one seam between the service and the database: `Store.call(operation, ...)`.

Every operation is one call of a SQL function (one round trip, atomic), declared once in
`operations.py`. A `Transport` runs it: `database.PostgresTransport` through an asyncpg pool, or
`store_rest.RestTransport` through Supabase's REST API (PostgREST) with supabase-py. A transport only
moves the call and its rows and turns its errors into domain errors (`errors.from_sqlstate`); binding
the arguments and reading the rows into models is the operation's, the same in both modes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from app.errors import CollectionError, SchemaOutOfDate
from app.operations import APPLIED_MIGRATIONS, Operation

R = TypeVar("R")


class Transport(Protocol):
    async def execute(self, operation: Operation[Any], args: Mapping[str, Any]) -> Any:
        """The call's rows (a list of mappings) for the row shapes, its value for a VALUE operation."""
        ...

    async def close(self) -> None: ...


class Store:
    def __init__(self, transport: Transport, migrations: Sequence[str]) -> None:
        self.transport = transport
        self._migrations = list(migrations)

    async def call(self, operation: Operation[R], source: BaseModel | None = None, /, **args: Any) -> R:
        """Run `operation` with its arguments by name: each given here, or else the field of the same
        name of `source` (a request model, so that a new field reaches its function unchanged)."""
        return operation.read(await self.transport.execute(operation, operation.bind(source, args)))

    async def readiness(self) -> str | None:
        """None when ready; otherwise why not (database unreachable, migrations missing)."""
        if not self._migrations:
            return "this installation carries no migrations (app/supabase/migrations is empty)"
        try:
            applied = await self.call(APPLIED_MIGRATIONS)
        except SchemaOutOfDate:
            return "migrations have not been applied (`collection-api migrate` or `supabase db push`)"
        except CollectionError as exc:
            return exc.message
        missing = sorted(set(self._migrations) - set(applied))
        if missing:
            return f"migrations not applied: {', '.join(missing)}"
        return None

    async def close(self) -> None:
        await self.transport.close()
