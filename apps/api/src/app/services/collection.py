"""CollectionService: the rules of collection runs, for every caller (the routers and the executor).

Budget checks, run state transitions and checkpoint writes all go through here, and from here through
the store to one SQL function each, which enforces the invariant atomically; this layer prices, names
and shapes."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from app import operations as ops
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
    IncompleteRuns,
    ItemStatus,
    RunAction,
    RunItemListResponse,
    RunProgress,
    RunTransitionEvent,
    SellerListResponse,
)
from app.operations import EstimateInputs, ExecutorView, OrgAccess, Slot, Work
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


@dataclass(frozen=True, slots=True)
class FailureRule:
    """A run fails when more than `max_failed_share` of its processed products failed, once at least
    `min_items` were processed."""

    max_failed_share: float
    min_items: int


def _unit(token: UUID, work: Work) -> dict[str, Any]:
    """A unit's identity for the functions fenced by its lease (asin None: a category's discovery)."""
    return {"run_id": work.run_id, "token": token, "category_id": work.category_id, "asin": work.asin}


@dataclass(slots=True)
class ItemOutcome:
    """What working one item came to (filled in as its calls come back): recorded once by
    `CollectionService.checkpoint`."""

    status: str = "failed"  # done | failed
    attempts: int = 0
    cost_cents: int = 0
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    sellers: list[dict[str, Any]] = field(default_factory=list)


EVENTS_PER_POLL = 500


class CollectionService:
    def __init__(self, store: Store, pricing: Pricing, provider_name: str = "sandbox") -> None:
        self.store = store
        self.pricing = pricing
        self.provider_name = provider_name

    # Settings ------------------------------------------------------------------------------------
    async def get_settings(self, org_id: UUID) -> CollectionSettingsResponse:
        return await self.store.call(ops.GET_SETTINGS, org_id=org_id)

    async def update_settings(
        self, org_id: UUID, update: CollectionSettingsUpdate
    ) -> CollectionSettingsResponse:
        # Fields left out are None: the function leaves them as they are.
        return await self.store.call(ops.UPDATE_SETTINGS, update, org_id=org_id)

    # Estimate ------------------------------------------------------------------------------------
    def price(self, inputs: EstimateInputs, category_ids: Sequence[str]) -> CostEstimate:
        """Price each category from what earlier runs observed of it, or from the plan's defaults.

        From history: its discovery cost plus its last product count times the observed cost per
        product (charged retries included), rounded up.
        """
        settings = inputs.settings
        breakdown: dict[str, int] = {}
        from_history: list[str] = []
        total_items = 0
        for category_id in category_ids:
            seen = inputs.history.get(category_id)
            if seen:
                products = seen.products
                per_products = -(-products * seen.item_cost_cents // seen.items_processed)
                breakdown[category_id] = seen.discovery_cost_cents + per_products
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
        inputs = await self.store.call(ops.ESTIMATE_INPUTS, org_id=org_id, category_ids=list(category_ids))
        return self.price(inputs, category_ids)

    # Runs ----------------------------------------------------------------------------------------
    async def create_run(
        self, org_id: UUID, created_by: UUID | None, request: CollectionRunCreate
    ) -> CollectionRunResponse:
        """Price the run, then let the database check the cap and the concurrency limit atomically."""
        estimate = await self.estimate_cost(org_id, request.category_ids)
        # A name is kept verbatim; only a blank one is replaced.
        name = request.name if request.name and request.name.strip() else default_run_name()
        return await self.store.call(
            ops.CREATE_RUN,
            request,
            org_id=org_id,
            created_by=created_by,
            name=name,
            estimated_cost_cents=estimate.total_cents,
            total_items=estimate.total_items,
            provider=self.provider_name,
        )

    async def get_run(self, org_id: UUID, run_id: str | UUID) -> CollectionRunResponse:
        run = await self.store.call(ops.GET_RUN, org_id=org_id, run_id=parse_run_id(run_id))
        if run is None:
            raise RunNotFound()
        return run

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
        after_created_at, after_id = decode_cursor(cursor) if cursor else (None, None)
        page = await self.store.call(
            ops.LIST_RUNS,
            org_id=org_id,
            limit=limit,
            offset=0 if cursor else offset,
            status=status.value if status else None,
            after_created_at=after_created_at,
            after_id=after_id,
        )
        last = page.runs[-1] if len(page.runs) == limit else None
        return CollectionRunListResponse(
            runs=page.runs,
            total=page.total,
            total_estimated=page.total_estimated,
            next_cursor=encode_cursor(last.created_at, last.id) if last else None,
        )

    async def start_run(self, org_id: UUID, run_id: str | UUID, actor: UUID | None) -> CollectionRunResponse:
        """pending → running."""
        return await self._transition(org_id, run_id, RunAction.START, actor)

    async def pause_run(self, org_id: UUID, run_id: str | UUID, actor: UUID | None) -> CollectionRunResponse:
        """running → paused."""
        return await self._transition(org_id, run_id, RunAction.PAUSE, actor)

    async def resume_run(self, org_id: UUID, run_id: str | UUID, actor: UUID | None) -> CollectionRunResponse:
        """paused → running."""
        return await self._transition(org_id, run_id, RunAction.RESUME, actor)

    async def cancel_run(self, org_id: UUID, run_id: str | UUID, actor: UUID | None) -> CollectionRunResponse:
        """pending, running or paused → cancelled."""
        return await self._transition(org_id, run_id, RunAction.CANCEL, actor)

    async def _transition(
        self, org_id: UUID, run_id: str | UUID, action: RunAction, actor: UUID | None
    ) -> CollectionRunResponse:
        return await self.store.call(
            ops.TRANSITION_RUN,
            org_id=org_id,
            run_id=parse_run_id(run_id),
            action=action.value,
            actor=actor,
            reason=None,
        )

    # Items, sellers, progress ---------------------------------------------------------------------
    async def list_items(
        self, org_id: UUID, run_id: str, status: ItemStatus | None, limit: int, offset: int
    ) -> RunItemListResponse:
        run = await self.get_run(org_id, run_id)  # 404 for another org's run, not an empty page
        return await self.store.call(
            ops.LIST_ITEMS,
            org_id=org_id,
            run_id=run.id,
            status=status.value if status else None,
            limit=limit,
            offset=offset,
        )

    async def list_sellers(self, org_id: UUID, limit: int, offset: int) -> SellerListResponse:
        return await self.store.call(ops.LIST_SELLERS, org_id=org_id, limit=limit, offset=offset)

    async def watch_run(
        self,
        org_id: UUID,
        run_id: UUID,
        after_event_id: int = 0,
        poll_s: float = 0.25,
        stop: asyncio.Event | None = None,
    ) -> AsyncIterator[tuple[RunProgress | RunTransitionEvent, int]]:
        """Every transition after `after_event_id`, and a progress snapshot first and whenever it
        changed (at most 1/poll_s a second), until the run ends or `stop` is set (the server is shutting
        down; clients reconnect). Each comes with the id of the last event read so far: where a client
        that reconnects resumes."""
        stop = stop or asyncio.Event()
        last_event_id = after_event_id
        last_progress: RunProgress | None = None
        while True:
            # The run before its events: a status change and its event are written in one transaction,
            # so a run read as finished has the transition that finished it among the events read next.
            run = await self.store.call(ops.GET_RUN, org_id=org_id, run_id=run_id)
            while True:
                events = await self.store.call(
                    ops.RUN_EVENTS_SINCE,
                    org_id=org_id,
                    run_id=run_id,
                    after_id=last_event_id,
                    limit=EVENTS_PER_POLL,
                )
                for event in events:
                    last_event_id = event.id
                    if event.from_status is not None:
                        yield event, last_event_id
                if len(events) < EVENTS_PER_POLL:
                    break
            if run is None:
                return
            progress = RunProgress.model_validate(run, from_attributes=True)
            if progress != last_progress:
                yield progress, last_event_id
                last_progress = progress
            if progress.status in TERMINAL_STATUSES:
                return
            try:
                await asyncio.wait_for(stop.wait(), poll_s)
                return
            except TimeoutError:
                pass

    # Authorisation ---------------------------------------------------------------------------------
    async def user_access(self, user_id: UUID) -> list[OrgAccess]:
        """The user's organisations and the permissions their role grants in each."""
        return await self.store.call(ops.USER_ACCESS, user_id=user_id)

    # The executor: sharing the account, units of work, checkpoints ---------------------------------
    async def configure_rates(self, rates: dict[str, float]) -> dict[str, float]:
        """The account's limits as this process's settings give them (calls a second; 0: none); answers
        what each limit was set to."""
        return {r.name: r.per_s for r in await self.store.call(ops.CONFIGURE_RATES, rates=rates)}

    async def heartbeat(self, owner: str, token: UUID, lease_s: int) -> ExecutorView:
        """This process is alive: its units' leases renewed; dead processes' units freed (what they had
        reserved becomes uncertain cost). Answers how many executors share the account, and its rates."""
        return await self.store.call(ops.HEARTBEAT, owner=owner, token=token, lease_s=lease_s)

    async def next_work(
        self, owner: str, token: UUID, lease_s: int, horizon_s: float, limit: int = 1
    ) -> list[Work]:
        """Up to `limit` units of work, each in the fair turn between organisations, its budget reserved
        first (a run that cannot afford it pauses at its cap instead) and a slot of the account's rate
        for its first call; one `wait` when the account has no slot within `horizon_s`; none: no work
        anywhere."""
        return await self.store.call(
            ops.NEXT_WORK,
            owner=owner,
            token=token,
            lease_s=lease_s,
            horizon_s=horizon_s,
            item_cents=self.pricing.cents_per_product,
            discovery_cents=self.pricing.bestsellers_cents,
            limit=limit,
        )

    async def take_slot(self, buckets: list[str], horizon_s: float) -> Slot:
        """A slot of the account's rate (and each of `buckets`) for the next call."""
        return await self.store.call(ops.TAKE_SLOT, buckets=buckets, horizon_s=horizon_s)

    async def throttle(self, buckets: list[str], refused_per_s: float) -> None:
        """The provider refused a call for the account's rate (429): every process slows down."""
        await self.store.call(ops.THROTTLE, buckets=buckets, refused_per_s=refused_per_s)

    async def observe_rate_limit(self, bucket: str, limit_per_s: float) -> None:
        """The provider said what a limit is (its x-ratelimit headers): never plan above it."""
        await self.store.call(ops.OBSERVE_RATE_LIMIT, bucket=bucket, limit_per_s=limit_per_s)

    async def slow_source(self, source: str, per_s: float, for_s: float) -> None:
        """A source that keeps failing: every process calls it at `per_s` at most for `for_s`."""
        await self.store.call(ops.SLOW_SOURCE, source=source, per_s=per_s, for_s=for_s)

    async def give_back(self, token: UUID, work: Work, calls_made: bool) -> None:
        """A unit given back, to be done by whoever asks next: before any call was made, its reservation
        is released and nothing charged; after (its checkpoint could not be written), what it had
        reserved may have been charged (uncertain cost)."""
        await self.store.call(ops.GIVE_BACK_WORK, **_unit(token, work), calls_made=calls_made)

    async def release_work(self, token: UUID) -> None:
        """This process stops: every unit it holds goes back (reservations: uncertain cost)."""
        await self.store.call(ops.RELEASE_WORK, token=token)

    async def fail_run(self, token: UUID, work: Work, reason: str) -> CollectionRunResponse | None:
        """The provider cannot serve the run (e.g. refused the credentials): fail it with the reason."""
        return await self.store.call(ops.FAIL_RUN, **_unit(token, work), reason=reason)

    async def checkpoint_discovery(
        self, token: UUID, work: Work, products: list[dict[str, Any]], cost_cents: int, error: str | None
    ) -> CollectionRunResponse:
        """A category's products, found (or not: `error`), its cost and the run's checkpoint, once; the
        run completes when nothing is left, fails when no category could be discovered."""
        return await self.store.call(
            ops.RECORD_DISCOVERY,
            run_id=work.run_id,
            token=token,
            category_id=work.category_id,
            products=products,
            cost_cents=cost_cents,
            error=error,
            estimated_per_category=self.pricing.products_per_category,
        )

    async def checkpoint(
        self, token: UUID, work: Work, outcome: ItemOutcome, worker: str, failure: FailureRule
    ) -> CollectionRunResponse:
        """Record one unit of work once: the item's result, the run's counters, its actual cost (its
        reservation released), the sellers found and the checkpoint, in one statement; the run fails
        past the failure rule and completes when nothing is left."""
        return await self.store.call(
            ops.RECORD_ITEM,
            run_id=work.run_id,
            token=token,
            category_id=work.category_id,
            asin=work.asin,
            status=outcome.status,
            attempts=outcome.attempts,
            cost_cents=outcome.cost_cents,
            result=outcome.result,
            error=outcome.error,
            sellers=outcome.sellers,
            worker=worker,
            max_failed_share=failure.max_failed_share,
            min_items=failure.min_items,
        )

    async def run_status_counts(self) -> dict[CollectionRunStatus, int]:
        """Runs in each status, all organisations (for /metrics)."""
        return {count.status: count.runs for count in await self.store.call(ops.RUN_STATUS_COUNTS)}

    # Recovery ------------------------------------------------------------------------------------
    async def get_incomplete_runs(self, limit: int = 50) -> IncompleteRuns:
        return await self.store.call(ops.INCOMPLETE_RUNS, limit=limit)

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
