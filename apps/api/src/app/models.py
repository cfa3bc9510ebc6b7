"""Request and response models of the collection API."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

MAX_CATEGORIES = 100
MAX_BUDGET_CENTS = 1_000_000_000_000  # $10bn: far above any real cap, well inside bigint


def _printable(value: str) -> str:
    # Postgres text cannot hold NUL, and control characters in names only ever come from mistakes.
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError("must not contain control characters")
    if not value.strip():
        raise ValueError("must not be blank")
    return value


CategoryId = Annotated[
    str, StringConstraints(min_length=1, max_length=64), AfterValidator(_printable)
]


def _distinct(ids: list[str]) -> list[str]:
    duplicates = sorted(c for c, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise ValueError(f"duplicate category ids: {', '.join(duplicates)}")
    return ids


CategoryIds = Annotated[
    list[CategoryId],
    Field(min_length=1, max_length=MAX_CATEGORIES, examples=[["electronics", "home-garden"]]),
    AfterValidator(_distinct),
]


class CollectionRunStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RunAction(StrEnum):
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
    updated_at: datetime | None = None


class CollectionSettingsUpdate(StrictModel):
    budget_cap_cents: Annotated[int, Field(strict=True, ge=0, le=MAX_BUDGET_CENTS)] | None = None
    soft_warning_percent: Annotated[int, Field(strict=True, ge=0, le=100)] | None = None
    max_concurrent_runs: Annotated[int, Field(strict=True, ge=1, le=1000)] | None = None


class EstimateRequest(StrictModel):
    category_ids: CategoryIds


class CostEstimate(BaseModel):
    total_cents: int
    breakdown: dict[str, int]
    within_budget: bool
    budget_cap_cents: int
    warning_threshold_cents: int
    exceeds_warning: bool


class CollectionRunCreate(StrictModel):
    name: Annotated[str, StringConstraints(max_length=200)] | None = Field(
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


class CollectionRunListResponse(BaseModel):
    runs: list[CollectionRunResponse]
    total: int


class RunTransitionResponse(BaseModel):
    ok: Literal[True] = True
    status: CollectionRunStatus


class ErrorResponse(BaseModel):
    detail: str
    error: str


class ValidationErrorResponse(BaseModel):
    detail: list[dict[str, Any]]
    error: str = "validation_error"


class IncompleteRun(BaseModel):
    id: UUID
    org_id: UUID
    name: str
    status: CollectionRunStatus
    has_checkpoint: bool


class IncompleteRuns(BaseModel):
    total: int
    runs: list[IncompleteRun]
