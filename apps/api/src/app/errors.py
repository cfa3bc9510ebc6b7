"""Domain errors. Each carries its HTTP status and a machine-readable code; one handler maps them all.

The response body stays compatible with FastAPI's own errors: ``{"detail": "...", "error": "code"}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


class CollectionError(Exception):
    status_code = 400
    error = "collection_error"
    headers: Mapping[str, str] | None = None

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code


class RunNotFound(CollectionError):
    status_code = 404
    error = "run_not_found"

    def __init__(self, message: str = "Collection run not found") -> None:
        super().__init__(message)


class BudgetExceeded(CollectionError):
    status_code = 400
    error = "budget_exceeded"

    def __init__(self, estimated_cost_cents: int, budget_cap_cents: int) -> None:
        super().__init__(
            f"Estimated cost {format_dollars(estimated_cost_cents)} exceeds budget cap "
            f"{format_dollars(budget_cap_cents)}"
        )
        self.estimated_cost_cents = estimated_cost_cents
        self.budget_cap_cents = budget_cap_cents


class ConcurrentRunLimit(CollectionError):
    status_code = 429
    error = "concurrent_run_limit"

    def __init__(self, max_concurrent_runs: int) -> None:
        super().__init__(
            f"The organisation already has {max_concurrent_runs} active runs (pending, running or "
            f"paused), its limit; finish or cancel one first"
        )
        self.max_concurrent_runs = max_concurrent_runs


class InvalidTransition(CollectionError):
    status_code = 400
    error = "invalid_transition"

    def __init__(self, action: str, status: str) -> None:
        super().__init__(f"Cannot {action} a run that is {status}")
        self.action = action
        self.status = status


class LeaseLost(CollectionError):
    """The executor no longer holds the run: another process took it over."""

    status_code = 409
    error = "lease_lost"

    def __init__(self) -> None:
        super().__init__("This process no longer holds the run's lease")


class ConstraintViolation(CollectionError):
    status_code = 400
    error = "constraint_violation"


class NotAuthenticated(CollectionError):
    status_code = 401
    error = "not_authenticated"
    headers = {"WWW-Authenticate": 'Bearer realm="collection-api"'}

    def __init__(self, message: str = "Missing or invalid bearer token") -> None:
        super().__init__(message)


class PermissionDenied(CollectionError):
    status_code = 403
    error = "permission_denied"


class OrganisationRequired(CollectionError):
    status_code = 400
    error = "organisation_required"


class InvalidCursor(CollectionError):
    status_code = 400
    error = "invalid_cursor"

    def __init__(self) -> None:
        super().__init__("Invalid cursor: pass back a next_cursor exactly as a list returned it")


class DatabaseUnavailable(CollectionError):
    status_code = 503
    error = "database_unavailable"
    headers = {"Retry-After": "2"}

    def __init__(self, message: str = "The database is unavailable; retry shortly") -> None:
        super().__init__(message)


class SchemaOutOfDate(DatabaseUnavailable):
    """The database lacks a function or table this service calls: its migrations are not applied."""

    def __init__(self) -> None:
        super().__init__("The database schema is not up to date; retry shortly")


def from_sqlstate(
    sqlstate: str | None, detail: str | None, constraint: str | None = None
) -> CollectionError | None:
    """The domain error an error raised by one of our SQL functions stands for (None: not one of ours).
    Both store modes map errors through this one table."""
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
    if sqlstate in ("42883", "42P01"):  # undefined function or table
        return SchemaOutOfDate()
    return None


def format_dollars(cents: int) -> str:
    sign = "-" if cents < 0 else ""
    whole, rest = divmod(abs(cents), 100)
    return f"{sign}${whole:,}.{rest:02d}"
