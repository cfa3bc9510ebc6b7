"""Request and response models of the collection API."""

from __future__ import annotations

import unicodedata
from collections import Counter
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    computed_field,
)

MAX_CATEGORIES = 100
MAX_BUDGET_CENTS = 1_000_000_000_000  # $10bn: far above any real cap, well inside bigint


def _no_control_characters(value: str) -> str:
    # Postgres text cannot hold NUL or lone surrogates, and control characters (C0 and C1, as the
    # schema's [[:cntrl:]]) in names and ids only ever come from mistakes.
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):
        raise ValueError("must not contain control characters or lone surrogates")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


# The pattern states in the schema what the validators enforce: no control characters, not blank.
PRINTABLE = r"[^\x00-\x1f\x7f-\x9f]"
CategoryId = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=64, pattern=rf"^{PRINTABLE}*[^\s\x00-\x1f\x7f-\x9f]{PRINTABLE}*$"
    ),
    AfterValidator(_no_control_characters),
    AfterValidator(_not_blank),
]


def _blank_or_printable(value: str) -> str:
    # Whitespace alone (tabs and newlines included) is a blank name: the service names the run.
    return value if not value.strip() else _no_control_characters(value)


RunName = Annotated[
    str,
    StringConstraints(max_length=200, pattern=rf"^(\s*|{PRINTABLE}*)$"),
    AfterValidator(_blank_or_printable),
]


def _distinct(ids: list[str]) -> list[str]:
    duplicates = sorted(c for c, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise ValueError(f"duplicate category ids: {', '.join(duplicates)}")
    return ids


CategoryIds = Annotated[
    list[CategoryId],
    Field(
        min_length=1,
        max_length=MAX_CATEGORIES,
        examples=[["electronics", "home-garden"]],
        json_schema_extra={"uniqueItems": True},
    ),
    AfterValidator(_distinct),
]


def _whole_number(value: object) -> object:
    # JSON Schema's integer: 85 and 85.0 are integers; "85", true and 85.5 are not.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    return value


WholeNumber = Annotated[int, BeforeValidator(_whole_number)]


class CollectionRunStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RunAction(StrEnum):
    """The API's actions of the transitions table (the executor's complete and fail are its SQL's)."""

    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CollectionSettingsResponse(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    budget_cap_cents: int
    soft_warning_percent: int
    max_concurrent_runs: int
    rate_weight: int = Field(
        default=1,
        description="This organisation's share of the provider account's rate while other "
        "organisations have work too (2 gets twice the calls of 1)",
    )
    updated_at: datetime | None = None


class CollectionSettingsUpdate(StrictModel):
    """Fields left out stay as they are. null is not "no change": it is a wrong type (422), and the
    schema says so (the fields are integers, not nullable)."""

    # The None defaults only mark "left out" (exclude_unset drops them); a sent null fails as an int.
    budget_cap_cents: WholeNumber = Field(default=None, ge=0, le=MAX_BUDGET_CENTS)  # type: ignore[assignment]
    soft_warning_percent: WholeNumber = Field(default=None, ge=0, le=100)  # type: ignore[assignment]
    max_concurrent_runs: WholeNumber = Field(default=None, ge=1, le=1000)  # type: ignore[assignment]
    rate_weight: WholeNumber = Field(default=None, ge=1, le=100)  # type: ignore[assignment]


class EstimateRequest(StrictModel):
    category_ids: CategoryIds


class CostEstimate(BaseModel):
    total_cents: int
    breakdown: dict[str, int]
    within_budget: bool
    budget_cap_cents: int
    warning_threshold_cents: int
    exceeds_warning: bool
    estimated_from_history: list[str] = Field(
        default_factory=list,
        description="Categories priced from what earlier runs observed rather than the plan's defaults",
    )
    total_items: int = Field(description="Products the run is expected to process")


class CollectionRunCreate(StrictModel):
    name: RunName | None = Field(
        default=None, description="Blank or absent: 'Collection YYYY-MM-DD HH:MM' (UTC)"
    )
    category_ids: CategoryIds


class CollectionRunResponse(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: UUID
    name: str
    status: CollectionRunStatus
    estimated_cost_cents: int
    actual_cost_cents: int
    budget_cap_cents: int
    total_items: int
    processed_items: int
    failed_items: int
    category_ids: list[str]
    started_at: datetime | None
    completed_at: datetime | None
    paused_at: datetime | None
    created_by: UUID | None
    created_at: datetime
    provider: str = "sandbox"
    status_message: str | None = None
    status_reason: str | None = None
    uncertain_cost_cents: int = Field(
        default=0,
        description="Part of actual_cost_cents that may have been charged by calls whose answer was lost",
    )
    reserved_cents: int = Field(default=0, description="Cost reserved for calls in flight")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def estimate_error_cents(self) -> int | None:
        """actual - estimated, once the run has completed."""
        if self.status is not CollectionRunStatus.COMPLETED:
            return None
        return self.actual_cost_cents - self.estimated_cost_cents


class CollectionRunListResponse(BaseModel):
    runs: list[CollectionRunResponse]
    total: int = Field(
        description="Runs matching the filter: exact up to 10,000, above that the database's estimate"
    )
    total_estimated: bool = Field(default=False, description="`total` is an estimate (above 10,000)")
    next_cursor: str | None = Field(
        default=None,
        description="Pass as `cursor` for the next page (as fast at any depth); null on a last page",
    )


class RunTransitionResponse(BaseModel):
    ok: Literal[True] = True
    status: CollectionRunStatus


class ErrorResponse(BaseModel):
    detail: str
    error: str


class IncompleteRun(BaseModel):
    id: UUID
    org_id: UUID
    name: str
    status: CollectionRunStatus
    has_checkpoint: bool


class IncompleteRuns(BaseModel):
    total: int
    runs: list[IncompleteRun]


class ItemStatus(StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class RunItemResponse(BaseModel):
    run_id: UUID
    category_id: str
    category_position: int
    asin: str
    position: int
    status: ItemStatus
    attempts: int
    cost_cents: int
    result: dict[str, Any] | None
    last_error: str | None
    worked_by: str | None
    updated_at: datetime


class RunItemListResponse(BaseModel):
    items: list[RunItemResponse]
    total: int


class SellerResponse(BaseModel):
    seller: str
    listings_seen: int
    products_seen: int
    lowest_price_cents: int | None
    first_run_id: UUID | None
    last_run_id: UUID | None
    first_seen_at: datetime
    last_seen_at: datetime


class SellerListResponse(BaseModel):
    sellers: list[SellerResponse]
    total: int


class RunProgress(BaseModel):
    """A progress snapshot on the run's event stream."""

    status: CollectionRunStatus
    processed_items: int
    failed_items: int
    total_items: int
    actual_cost_cents: int
    budget_cap_cents: int
    status_message: str | None


class RunTransitionEvent(BaseModel):
    """A status change on the run's event stream."""

    id: int
    from_status: CollectionRunStatus | None
    to_status: CollectionRunStatus
    reason: str | None
    created_at: datetime
