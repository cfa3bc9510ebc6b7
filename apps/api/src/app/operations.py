"""Every data operation of the service, declared once: the SQL function it calls, the function's named
arguments with their Postgres types, the shape of its result and the model each row is read into.

Both store modes execute these declarations (`store.py`: asyncpg with named arguments, supabase-py's
`rpc` with the same names), and rows become the same typed models in both, from the same code (`read`):
pydantic turns the REST API's JSON strings into the UUIDs and datetimes asyncpg hands back, so nothing
guesses a column's type from its name. tests/test_operations.py holds this table to `pg_proc`: every
name, type and result shape here is the function's own.

Arguments are bound by name only (`store.call(CREATE_RUN, org_id=..., total_items=...)`, or taken by
name from a model's fields), so two integers can never swap places silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from functools import cached_property
from typing import Any, ClassVar, Generic, Literal, TypeVar
from uuid import UUID

from pydantic import BaseModel, TypeAdapter

from app.models import (
    CollectionRunResponse,
    CollectionRunStatus,
    CollectionSettingsResponse,
    IncompleteRuns,
    RunItemListResponse,
    RunTransitionEvent,
    SellerListResponse,
)

R = TypeVar("R")
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


class Shape(StrEnum):
    ONE = "one"  # exactly one row (a function returning one composite)
    MAYBE = "maybe"  # no row or one (a set-returning function)
    ROWS = "rows"  # any number of rows
    VALUE = "value"  # one scalar value (jsonb, text, an array, void)


# What a Python argument must be for each Postgres type used here (None is SQL null, always allowed).
PYTHON_TYPES: Mapping[str, tuple[type, ...]] = {
    "uuid": (UUID,),
    "text": (str,),
    "integer": (int,),
    "bigint": (int,),
    "boolean": (bool,),
    "double precision": (float, int),
    "jsonb": (dict, list),
    "text[]": (list, tuple),
    "timestamp with time zone": (datetime,),
}


class Operation(Generic[R]):
    """One SQL function in `public`, called with named arguments (`p_` + each name here)."""

    shape: ClassVar[Shape]

    def __init__(self, function: str, args: Mapping[str, str]) -> None:
        unknown = {t for t in args.values() if t not in PYTHON_TYPES}
        assert not unknown, f"{function}: no Python type for {unknown}"
        self.function = function
        self.args = dict(args)  # argument name (without p_) -> Postgres type, in the function's order

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.function})"

    @cached_property
    def sql(self) -> str:
        """The statement asyncpg prepares: the function called with named arguments."""
        named = ", ".join(f"p_{name} => ${n}" for n, name in enumerate(self.args, start=1))
        call = f"public.{self.function}({named})"
        return f"select {call}" if self.shape is Shape.VALUE else f"select * from {call}"

    def bind(self, source: BaseModel | None, given: Mapping[str, Any]) -> dict[str, Any]:
        """The call's arguments as `{p_name: value}` in the function's order: each named in `given`,
        or else a field of the same name of `source`. A name the function does not take, one missing,
        or a value of the wrong type is a bug in the caller: TypeError, before anything is sent."""
        extra = set(given) - self.args.keys()
        if extra:
            raise TypeError(f"{self.function} takes no argument {', '.join(sorted(extra))}")
        bound: dict[str, Any] = {}
        for name, pg_type in self.args.items():
            if name in given:
                value = given[name]
            elif source is not None and name in type(source).model_fields:
                value = getattr(source, name)
            else:
                raise TypeError(f"{self.function}: argument {name} not given")
            if value is not None and (
                not isinstance(value, PYTHON_TYPES[pg_type])
                or (isinstance(value, bool) and pg_type != "boolean")
            ):
                raise TypeError(f"{self.function}: {name} must be {pg_type}, got {type(value).__name__}")
            bound[f"p_{name}"] = value
        return bound

    def read(self, result: Any) -> R:
        """The typed result of a call, from what a transport returned: a list of row mappings for the
        row shapes, the value itself for VALUE."""
        raise NotImplementedError


class One(Operation[M]):
    shape = Shape.ONE

    def __init__(self, function: str, model: type[M], args: Mapping[str, str]) -> None:
        super().__init__(function, args)
        self.model = model

    def read(self, result: Any) -> M:
        rows: Sequence[Mapping[str, Any]] = result
        if len(rows) != 1:
            raise RuntimeError(f"{self.function} returned {len(rows)} rows, not one")
        return self.model.model_validate(rows[0])


class Maybe(Operation[M | None], Generic[M]):
    shape = Shape.MAYBE

    def __init__(self, function: str, model: type[M], args: Mapping[str, str]) -> None:
        super().__init__(function, args)
        self.model = model

    def read(self, result: Any) -> M | None:
        rows: Sequence[Mapping[str, Any]] = result
        if len(rows) > 1:
            raise RuntimeError(f"{self.function} returned {len(rows)} rows, not one or none")
        return self.model.model_validate(rows[0]) if rows else None


class Rows(Operation[list[M]], Generic[M]):
    shape = Shape.ROWS

    def __init__(self, function: str, model: type[M], args: Mapping[str, str]) -> None:
        super().__init__(function, args)
        self.model = model

    def read(self, result: Any) -> list[M]:
        validate = self.model.model_validate
        return [validate(row) for row in result]


class Value(Operation[T], Generic[T]):
    shape = Shape.VALUE

    def __init__(self, function: str, kind: Any, args: Mapping[str, str], returns: str) -> None:
        super().__init__(function, args)
        self.adapter: TypeAdapter[T] = TypeAdapter(kind)
        self.returns = returns  # the function's Postgres result type (checked against pg_proc)

    def read(self, result: Any) -> T:
        # A void function has no value, whatever a transport shows for it (PostgREST: 204, no body).
        return self.adapter.validate_python(None if self.returns == "void" else result)


# --------------------------------------------------------------------------------------------------
# Rows that are not API resources as they are
# --------------------------------------------------------------------------------------------------
class OrgAccess(BaseModel):
    """An organisation the user belongs to, with the permissions their role there grants."""

    org_id: UUID
    org_slug: str
    role: str
    permissions: frozenset[str]


class CategoryHistory(BaseModel):
    products: int
    discovery_cost_cents: int
    items_processed: int
    item_cost_cents: int


class EstimateInputs(BaseModel):
    settings: CollectionSettingsResponse
    history: dict[str, CategoryHistory]


class RunPage(BaseModel):
    runs: list[CollectionRunResponse]
    total: int
    total_estimated: bool


class Work(BaseModel):
    """A unit of work handed to an executor process: a category's discovery or an item, its budget
    reserved, with the wait for its first call's slot; or `wait`: no slot for the account yet."""

    kind: Literal["discovery", "item", "wait"]
    run_id: UUID | None
    org_id: UUID | None
    category_id: str | None
    category_position: int | None
    asin: str | None
    item_position: int | None
    reserved_cents: int
    wait_s: float


class Slot(BaseModel):
    granted: bool
    wait_s: float


class ExecutorView(BaseModel):
    """What a heartbeat tells a process: how many executors share the account, the rates in force
    (calls a second; None: no limit)."""

    executors: int
    rates: dict[str, float | None]


class RateLimit(BaseModel):
    name: str
    per_s: float


class StatusCount(BaseModel):
    status: CollectionRunStatus
    runs: int


# --------------------------------------------------------------------------------------------------
# The operations
# --------------------------------------------------------------------------------------------------
Run = CollectionRunResponse

# Authorisation and readiness
# Every set of rows is small and bounded (a user's organisations, a run's statuses, a page of events, the
# account's limits), far below PostgREST's max-rows: one call each.
USER_ACCESS = Rows("collection_user_access", OrgAccess, {"user_id": "uuid"})
APPLIED_MIGRATIONS: Value[list[str]] = Value("collection_applied_migrations", list[str], {}, "text[]")

# Settings and estimates
GET_SETTINGS = One("collection_get_settings", CollectionSettingsResponse, {"org_id": "uuid"})
UPDATE_SETTINGS = One(
    "collection_update_settings",
    CollectionSettingsResponse,
    {
        "org_id": "uuid",
        "budget_cap_cents": "bigint",
        "soft_warning_percent": "integer",
        "max_concurrent_runs": "integer",
        "rate_weight": "integer",
    },
)
ESTIMATE_INPUTS: Value[EstimateInputs] = Value(
    "collection_estimate_inputs", EstimateInputs, {"org_id": "uuid", "category_ids": "text[]"}, "jsonb"
)

# Runs
CREATE_RUN = One(
    "collection_create_run",
    Run,
    {
        "org_id": "uuid",
        "created_by": "uuid",
        "name": "text",
        "category_ids": "text[]",
        "estimated_cost_cents": "bigint",
        "total_items": "integer",
        "provider": "text",
    },
)
GET_RUN = Maybe("collection_get_run", Run, {"org_id": "uuid", "run_id": "uuid"})
LIST_RUNS: Value[RunPage] = Value(
    "collection_list_runs",
    RunPage,
    {
        "org_id": "uuid",
        "limit": "integer",
        "offset": "integer",
        "status": "text",
        "after_created_at": "timestamp with time zone",
        "after_id": "uuid",
    },
    "jsonb",
)
TRANSITION_RUN = One(
    "collection_transition_run",
    Run,
    {"org_id": "uuid", "run_id": "uuid", "action": "text", "actor": "uuid", "reason": "text"},
)
INCOMPLETE_RUNS: Value[IncompleteRuns] = Value(
    "collection_incomplete_runs", IncompleteRuns, {"limit": "integer"}, "jsonb"
)
RUN_STATUS_COUNTS = Rows("collection_run_status_counts", StatusCount, {})

# Items, sellers, events
LIST_ITEMS: Value[RunItemListResponse] = Value(
    "collection_list_items",
    RunItemListResponse,
    {"org_id": "uuid", "run_id": "uuid", "status": "text", "limit": "integer", "offset": "integer"},
    "jsonb",
)
LIST_SELLERS: Value[SellerListResponse] = Value(
    "collection_list_sellers",
    SellerListResponse,
    {"org_id": "uuid", "limit": "integer", "offset": "integer"},
    "jsonb",
)
RUN_EVENTS_SINCE = Rows(
    "collection_run_events_since",
    RunTransitionEvent,
    {"org_id": "uuid", "run_id": "uuid", "after_id": "bigint", "limit": "integer"},
)

# The executor: sharing the account, units of work, their checkpoints
UNIT = {"run_id": "uuid", "token": "uuid", "category_id": "text", "asin": "text"}  # asin null: discovery
CONFIGURE_RATES = Rows("collection_configure_rates", RateLimit, {"rates": "jsonb"})
HEARTBEAT: Value[ExecutorView] = Value(
    "collection_heartbeat", ExecutorView, {"owner": "text", "token": "uuid", "lease_s": "integer"}, "jsonb"
)
NEXT_WORK = Rows(
    "collection_next_work",
    Work,
    {
        "owner": "text",
        "token": "uuid",
        "lease_s": "integer",
        "horizon_s": "double precision",
        "item_cents": "bigint",
        "discovery_cents": "bigint",
        "limit": "integer",
    },
)
TAKE_SLOT = One("collection_take_slot", Slot, {"buckets": "text[]", "horizon_s": "double precision"})
THROTTLE: Value[None] = Value(
    "collection_throttle", None, {"buckets": "text[]", "refused_per_s": "double precision"}, "void"
)
OBSERVE_RATE_LIMIT: Value[None] = Value(
    "collection_observe_rate_limit", None, {"bucket": "text", "limit_per_s": "double precision"}, "void"
)
SLOW_SOURCE: Value[None] = Value(
    "collection_slow_source",
    None,
    {"source": "text", "per_s": "double precision", "for_s": "double precision"},
    "void",
)
RELEASE_WORK: Value[None] = Value("collection_release_work", None, {"token": "uuid"}, "void")
GIVE_BACK_WORK: Value[None] = Value(
    "collection_give_back_work", None, {**UNIT, "calls_made": "boolean"}, "void"
)
FAIL_RUN = Maybe("collection_fail_run", Run, {**UNIT, "reason": "text"})
RECORD_DISCOVERY = One(
    "collection_record_discovery",
    Run,
    {
        "run_id": "uuid",
        "token": "uuid",
        "category_id": "text",
        "products": "jsonb",
        "cost_cents": "bigint",
        "error": "text",
        "estimated_per_category": "integer",
    },
)
RECORD_ITEM = One(
    "collection_record_item",
    Run,
    {
        "run_id": "uuid",
        "token": "uuid",
        "category_id": "text",
        "asin": "text",
        "status": "text",
        "attempts": "integer",
        "cost_cents": "bigint",
        "result": "jsonb",
        "error": "text",
        "sellers": "jsonb",
        "worker": "text",
        "max_failed_share": "double precision",
        "min_items": "integer",
    },
)

OPERATIONS: tuple[Operation[Any], ...] = tuple(
    value for value in list(globals().values()) if isinstance(value, Operation)
)
