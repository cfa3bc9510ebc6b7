"""CollectionService: the rules of collection runs. Budget, limits and transitions are enforced by
the SQL functions behind the store; this layer prices, names and shapes."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from app.config import Pricing
from app.errors import InvalidCursor, RunNotFound
from app.models import (
    CollectionRunCreate,
    CollectionRunListResponse,
    CollectionRunResponse,
    CollectionRunStatus,
    CollectionSettingsResponse,
    CollectionSettingsUpdate,
    CostEstimate,
    IncompleteRun,
    IncompleteRuns,
    ItemStatus,
    RunAction,
    RunItemListResponse,
    RunItemResponse,
    RunProgress,
    RunTransitionEvent,
    SellerListResponse,
    SellerResponse,
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


def encode_cursor(created_at: datetime, run_id: UUID) -> str:
    """Where a page ended: opaque to clients (they pass it back), exact to the microsecond."""
    raw = f"{created_at.isoformat()}|{run_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, _, run_id = raw.partition("|")
        created_at = datetime.fromisoformat(stamp)
        if created_at.tzinfo is None:
            raise ValueError("a cursor's time has a zone")
        return created_at, UUID(run_id)
    except ValueError:  # base64, UTF-8, time and UUID errors alike
        raise InvalidCursor() from None


TERMINAL_STATUSES = frozenset(
    {CollectionRunStatus.COMPLETED, CollectionRunStatus.FAILED, CollectionRunStatus.CANCELLED}
)


class CollectionService:
    def __init__(self, store: Store, pricing: Pricing, provider_name: str = "sandbox") -> None:
        self.store = store
        self.pricing = pricing
        self.provider_name = provider_name

    # Settings ------------------------------------------------------------------------------------
    async def get_settings(self, org_id: UUID) -> CollectionSettingsResponse:
        return CollectionSettingsResponse.model_validate(await self.store.get_settings(org_id))

    async def update_settings(
        self, org_id: UUID, update: CollectionSettingsUpdate
    ) -> CollectionSettingsResponse:
        row = await self.store.update_settings(org_id, update.model_dump(exclude_unset=True))
        return CollectionSettingsResponse.model_validate(row)

    # Estimate ------------------------------------------------------------------------------------
    def price(self, inputs: Mapping[str, Any], category_ids: Sequence[str]) -> CostEstimate:
        """Price each category from what earlier runs observed of it, or from the plan's defaults.

        From history: its discovery cost plus its last product count times the observed cost per
        product (charged retries included), rounded up.
        """
        settings = CollectionSettingsResponse.model_validate(inputs["settings"])
        history: Mapping[str, Mapping[str, int]] = inputs["history"]
        breakdown: dict[str, int] = {}
        from_history: list[str] = []
        total_items = 0
        for category_id in category_ids:
            seen = history.get(category_id)
            if seen:
                products = seen["products"]
                per_products = -(-products * seen["item_cost_cents"] // seen["items_processed"])
                breakdown[category_id] = seen["discovery_cost_cents"] + per_products
                from_history.append(category_id)
            else:
                products = self.pricing.products_per_category
                breakdown[category_id] = self.pricing.cents_per_category
            total_items += products
        total = sum(breakdown.values())
        threshold = settings.budget_cap_cents * settings.soft_warning_percent // 100
        return CostEstimate(
            total_cents=total,
            breakdown=breakdown,
            within_budget=total <= settings.budget_cap_cents,
            budget_cap_cents=settings.budget_cap_cents,
            warning_threshold_cents=threshold,
            exceeds_warning=total > threshold,
            estimated_from_history=from_history,
            total_items=total_items,
        )

    async def estimate_cost(self, org_id: UUID, category_ids: Sequence[str]) -> CostEstimate:
        return self.price(await self.store.estimate_inputs(org_id, category_ids), category_ids)

    # Runs ----------------------------------------------------------------------------------------
    async def create_run(
        self, org_id: UUID, created_by: UUID | None, request: CollectionRunCreate
    ) -> CollectionRunResponse:
        """Price the run, then let the database check the cap and the concurrency limit atomically."""
        estimate = await self.estimate_cost(org_id, request.category_ids)
        # A name is kept verbatim; only a blank one is replaced.
        name = request.name if request.name and request.name.strip() else default_run_name()
        row = await self.store.create_run(
            org_id=org_id,
            created_by=created_by,
            name=name,
            category_ids=request.category_ids,
            estimated_cost_cents=estimate.total_cents,
            total_items=estimate.total_items,
            provider=self.provider_name,
        )
        return CollectionRunResponse.model_validate(row)

    async def get_run(self, org_id: UUID, run_id: str | UUID) -> CollectionRunResponse:
        row = await self.store.get_run(org_id, parse_run_id(run_id))
        if row is None:
            raise RunNotFound()
        return CollectionRunResponse.model_validate(row)

    async def list_runs(
        self,
        org_id: UUID,
        limit: int,
        offset: int,
        status: CollectionRunStatus | None = None,
        cursor: str | None = None,
    ) -> CollectionRunListResponse:
        """A page of the org's runs, newest first; `total` counts the runs matching `status`.
        With a cursor, the page after the run it names (keyset: as fast at any depth)."""
        after = decode_cursor(cursor) if cursor else None
        rows, total, estimated = await self.store.list_runs(
            org_id, limit, 0 if after else offset, status.value if status else None, after
        )
        runs = [CollectionRunResponse.model_validate(row) for row in rows]
        last = runs[-1] if len(runs) == limit else None
        return CollectionRunListResponse(
            runs=runs,
            total=total,
            total_estimated=estimated,
            next_cursor=encode_cursor(last.created_at, last.id) if last else None,
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
        return CollectionRunResponse.model_validate(row)

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
        return CollectionRunResponse.model_validate(row)

    # Items, sellers, progress ---------------------------------------------------------------------
    async def list_items(
        self, org_id: UUID, run_id: str | UUID, status: ItemStatus | None, limit: int, offset: int
    ) -> RunItemListResponse:
        run = await self.get_run(org_id, run_id)  # 404 for another org's run, not an empty page
        rows, total = await self.store.list_items(
            org_id, run.id, status.value if status else None, limit, offset
        )
        return RunItemListResponse(items=[RunItemResponse.model_validate(r) for r in rows], total=total)

    async def list_sellers(self, org_id: UUID, limit: int, offset: int) -> SellerListResponse:
        rows, total = await self.store.list_sellers(org_id, limit, offset)
        return SellerListResponse(sellers=[SellerResponse.model_validate(r) for r in rows], total=total)

    async def watch_run(
        self, org_id: UUID, run_id: UUID, poll_s: float = 0.25, stop: asyncio.Event | None = None
    ) -> AsyncIterator[RunProgress | RunTransitionEvent]:
        """Every transition, and a progress snapshot whenever it changed (at most 1/poll_s a second),
        until the run ends or `stop` is set (the server is shutting down; clients reconnect)."""
        stop = stop or asyncio.Event()
        last_event_id = 0
        last_progress: RunProgress | None = None
        while True:
            # The run before its events: a status change and its event are written in one transaction,
            # so a run read as finished has the transition that finished it among the events read next.
            row = await self.store.get_run(org_id, run_id)
            for event in await self.store.run_events_since(org_id, run_id, last_event_id):
                last_event_id = event["id"]
                if event["from_status"] is not None:
                    yield RunTransitionEvent.model_validate(event)
            if row is None:
                return
            progress = RunProgress.model_validate(row)
            if progress != last_progress:
                yield progress
                last_progress = progress
            if progress.status in TERMINAL_STATUSES:
                return
            try:
                await asyncio.wait_for(stop.wait(), poll_s)
                return
            except TimeoutError:
                pass

    # Recovery ------------------------------------------------------------------------------------
    async def get_incomplete_runs(self, limit: int = 50) -> IncompleteRuns:
        rows, total = await self.store.incomplete_runs(limit)
        return IncompleteRuns(total=total, runs=[IncompleteRun.model_validate(r) for r in rows])

    async def resume_incomplete_runs(self, log_limit: int = 50, executing: bool = True) -> IncompleteRuns:
        """Find the runs a previous process left running or paused and log each of them.

        Running runs continue: the collection manager claims them (this process at once if it has
        the same WORKER_ID as before, another replica once their lease expires). Paused runs stay paused.
        """
        found = await self.get_incomplete_runs(log_limit)
        logger.info(
            "start-up recovery: %d interrupted run(s) found (%s)",
            found.total,
            "running ones resume; paused stay paused" if executing else "the executor is disabled here",
        )
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
