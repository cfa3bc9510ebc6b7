"""CollectionService: the rules of collection runs. Budget, limits and transitions are enforced by
the SQL functions behind the store; this layer prices, names and shapes."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from app.config import Pricing
from app.errors import RunNotFound
from app.models import (
    CollectionRunCreate,
    CollectionRunListResponse,
    CollectionRunResponse,
    CollectionSettingsResponse,
    CollectionSettingsUpdate,
    CostEstimate,
    IncompleteRun,
    IncompleteRuns,
    RunAction,
)
from app.store import Store

logger = logging.getLogger(__name__)


def default_run_name(now: datetime | None = None) -> str:
    return f"Collection {(now or datetime.now(UTC)):%Y-%m-%d %H:%M}"


def parse_run_id(run_id: str | UUID) -> UUID:
    """A malformed id names no run: 404, like an unknown one, so ids reveal nothing."""
    if isinstance(run_id, UUID):
        return run_id
    try:
        return UUID(run_id)
    except ValueError:
        raise RunNotFound() from None


class CollectionService:
    def __init__(self, store: Store, pricing: Pricing) -> None:
        self.store = store
        self.pricing = pricing

    # Settings ------------------------------------------------------------------------------------
    async def get_settings(self, org_id: UUID) -> CollectionSettingsResponse:
        return CollectionSettingsResponse.model_validate(dict(await self.store.get_settings(org_id)))

    async def update_settings(
        self, org_id: UUID, update: CollectionSettingsUpdate
    ) -> CollectionSettingsResponse:
        row = await self.store.update_settings(org_id, update.model_dump(exclude_unset=True))
        return CollectionSettingsResponse.model_validate(dict(row))

    # Estimate ------------------------------------------------------------------------------------
    def price_categories(self, category_ids: Sequence[str]) -> dict[str, int]:
        return {category_id: self.pricing.cents_per_category for category_id in category_ids}

    async def estimate_cost(self, org_id: UUID, category_ids: Sequence[str]) -> CostEstimate:
        breakdown = self.price_categories(category_ids)
        total = sum(breakdown.values())
        settings = await self.get_settings(org_id)
        threshold = settings.budget_cap_cents * settings.soft_warning_percent // 100
        return CostEstimate(
            total_cents=total,
            breakdown=breakdown,
            within_budget=total <= settings.budget_cap_cents,
            budget_cap_cents=settings.budget_cap_cents,
            warning_threshold_cents=threshold,
            exceeds_warning=total > threshold,
        )

    # Runs ----------------------------------------------------------------------------------------
    async def create_run(
        self, org_id: UUID, created_by: UUID | None, request: CollectionRunCreate
    ) -> CollectionRunResponse:
        """Price the run, then let the database check the cap and the concurrency limit atomically."""
        breakdown = self.price_categories(request.category_ids)
        name = (request.name or "").strip() or default_run_name()
        row = await self.store.create_run(
            org_id=org_id,
            created_by=created_by,
            name=name,
            category_ids=request.category_ids,
            estimated_cost_cents=sum(breakdown.values()),
            total_items=len(request.category_ids) * self.pricing.products_per_category,
        )
        return CollectionRunResponse.model_validate(dict(row))

    async def get_run(self, org_id: UUID, run_id: str | UUID) -> CollectionRunResponse:
        row = await self.store.get_run(org_id, parse_run_id(run_id))
        if row is None:
            raise RunNotFound()
        return CollectionRunResponse.model_validate(dict(row))

    async def list_runs(self, org_id: UUID, limit: int, offset: int) -> CollectionRunListResponse:
        rows, total = await self.store.list_runs(org_id, limit, offset)
        return CollectionRunListResponse(
            runs=[CollectionRunResponse.model_validate(row) for row in rows], total=total
        )

    async def transition(
        self,
        org_id: UUID,
        run_id: str | UUID,
        action: RunAction,
        actor: UUID | None,
        reason: str | None = None,
    ) -> CollectionRunResponse:
        row = await self.store.transition_run(org_id, parse_run_id(run_id), action.value, actor, reason)
        return CollectionRunResponse.model_validate(dict(row))

    async def start_run(self, org_id: UUID, run_id: str | UUID, actor: UUID | None) -> CollectionRunResponse:
        return await self.transition(org_id, run_id, RunAction.START, actor)

    async def pause_run(self, org_id: UUID, run_id: str | UUID, actor: UUID | None) -> CollectionRunResponse:
        return await self.transition(org_id, run_id, RunAction.PAUSE, actor)

    async def resume_run(self, org_id: UUID, run_id: str | UUID, actor: UUID | None) -> CollectionRunResponse:
        return await self.transition(org_id, run_id, RunAction.RESUME, actor)

    async def cancel_run(self, org_id: UUID, run_id: str | UUID, actor: UUID | None) -> CollectionRunResponse:
        return await self.transition(org_id, run_id, RunAction.CANCEL, actor)

    async def checkpoint(
        self,
        org_id: UUID,
        run_id: str | UUID,
        step_key: str,
        checkpoint: Mapping[str, Any],
        processed_delta: int = 0,
        failed_delta: int = 0,
        cost_cents: int = 0,
    ) -> CollectionRunResponse:
        """Record one unit of work once: checkpoint, counters and actual cost in one statement."""
        row = await self.store.checkpoint(
            org_id, parse_run_id(run_id), step_key, checkpoint, processed_delta, failed_delta, cost_cents
        )
        return CollectionRunResponse.model_validate(dict(row))

    # Recovery ------------------------------------------------------------------------------------
    async def get_incomplete_runs(self, limit: int = 50) -> IncompleteRuns:
        rows, total = await self.store.incomplete_runs(limit)
        return IncompleteRuns(total=total, runs=[IncompleteRun.model_validate(r) for r in rows])

    async def resume_incomplete_runs(self, log_limit: int = 50) -> IncompleteRuns:
        """Find the runs a previous process left running or paused and log each of them.

        Running them again is the executor's job (plan 07); until then they are reported, not resumed.
        """
        found = await self.get_incomplete_runs(log_limit)
        logger.info("start-up recovery: %d interrupted run(s) found", found.total)
        for run in found.runs:
            logger.info(
                "interrupted run id=%s name=%r status=%s checkpoint=%s",
                run.id,
                run.name,
                run.status.value,
                "yes" if run.has_checkpoint else "no",
            )
        if found.total > len(found.runs):
            logger.info("... and %d more interrupted run(s)", found.total - len(found.runs))
        return found
