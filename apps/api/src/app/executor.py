"""The collection executor: a manager per process that claims running runs under a lease, and one
RunExecutor per claimed run that walks its categories and items. Every lease, reservation, checkpoint
and transition goes through CollectionService, as the API's do.

Durability rules (each enforced by a SQL function, fenced by the lease token):
- before each charged call its cost is reserved; a reservation that would pass the run's cap pauses
  the run (`budget_exhausted`) instead;
- each finished item lands in one atomic, idempotent statement (result, counters, cost, checkpoint);
- a process that dies leaves its reservations behind; whoever takes the run over counts them as
  uncertain charges, so the provider can never have charged more than the cap.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID

from app.config import Pricing, Settings
from app.errors import CollectionError, DatabaseUnavailable, InvalidTransition, LeaseLost
from app.models import CollectionRunResponse, CollectionRunStatus, RunAction
from app.observability import Metrics
from app.operations import PendingItem, RunCategory
from app.providers.base import CallResult, Provider, ProviderFatalError
from app.services.collection import CollectionService, ItemOutcome, Lease

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RateLimiter:
    """At most `rate` provider calls a second from this process (0: no limit)."""

    def __init__(self, rate_per_s: float) -> None:
        self._interval = 1 / rate_per_s if rate_per_s > 0 else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        if not self._interval:
            return
        async with self._lock:
            now = time.monotonic()
            wait = self._next - now
            self._next = max(now, self._next) + self._interval
        if wait > 0:
            await asyncio.sleep(wait)


@dataclass(frozen=True)
class ExecutorLimits:
    items_in_flight: int
    max_attempts: int
    backoff_s: float
    max_failed_share: float
    min_items_for_failure_share: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ExecutorLimits:
        return cls(
            items_in_flight=settings.items_in_flight_per_run,
            max_attempts=settings.provider_max_attempts,
            backoff_s=settings.provider_backoff_s,
            max_failed_share=settings.max_failed_share,
            min_items_for_failure_share=settings.min_items_for_failure_share,
        )


class RunExecutor:
    def __init__(
        self,
        service: CollectionService,
        provider: Provider,
        limits: ExecutorLimits,
        limiter: RateLimiter,
        lease: Lease,
        worker_id: str,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.service = service
        self.provider = provider
        self.pricing: Pricing = service.pricing
        self.limits = limits
        self.limiter = limiter
        self.lease = lease
        self.run_id = lease.run_id
        self.worker_id = worker_id
        self.stopping = asyncio.Event()
        self.stop_reason: str | None = None
        self.failure: str | None = None

    def stop(self, reason: str) -> None:
        """No new item starts; items in flight finish and are checkpointed."""
        if not self.stopping.is_set():
            self.stop_reason = reason
            self.stopping.set()

    async def execute(self) -> None:
        try:
            for category in await self.service.run_categories(self.run_id):
                if self.stopping.is_set():
                    break
                if category.discovered_at is None:
                    await self._discover(category)
                    if self.stopping.is_set():
                        break
                await self._process_category(category.category_id)
            await self._finish()
        except LeaseLost:
            logger.warning("run %s: lease lost to another process; stopping without writing", self.run_id)
        except DatabaseUnavailable as exc:
            # The lease stays ours; the manager resumes the run when the database is back.
            logger.warning("run %s: paused work, database unavailable: %s", self.run_id, exc.message)

    # Categories and items ----------------------------------------------------------------------
    async def _discover(self, category: RunCategory) -> None:
        cents = self.pricing.bestsellers_cents
        if not await self._reserve(cents):
            return
        try:
            result, attempts = await self._call(self.provider.bestsellers, category.category_id)
        except ProviderFatalError as exc:
            await self.service.release_budget(self.lease, cents)
            self._fail(str(exc))
            return
        products = [{"asin": p.asin, "title": p.title} for p in result.value or []]
        await self.service.checkpoint_discovery(
            self.lease,
            category,
            products,
            cost_cents=cents if result.charged else 0,
            reserved_cents=cents,
            error=None if result.ok else f"amazon_bestsellers: {result.error}",
        )

    async def _process_category(self, category_id: str) -> None:
        slots = asyncio.Semaphore(self.limits.items_in_flight)
        async with asyncio.TaskGroup() as group:
            for item in await self.service.pending_items(self.run_id, category_id):
                await slots.acquire()
                if self.stopping.is_set():
                    slots.release()
                    break
                group.create_task(self._item(item, slots))

    async def _item(self, item: PendingItem, slots: asyncio.Semaphore) -> None:
        cents = self.pricing.cents_per_product
        try:
            if not await self._reserve(cents):
                return
            try:
                outcome = await self._work(item)
            except ProviderFatalError as exc:
                await self.service.release_budget(self.lease, cents)
                self._fail(str(exc))
                return
            run = await self.service.checkpoint(self.lease, item, outcome, cents, self.worker_id)
            if self.metrics is not None:
                self.metrics.items.labels(outcome.status).inc()
                self.metrics.cents_charged.inc(outcome.cost_cents)
            self._check_failure_share(run)
        except LeaseLost:
            self.stop("lease_lost")
        except CollectionError as exc:
            # Database down mid-item: what it may have cost stays reserved, and becomes an uncertain
            # charge if the run is released or taken over before the item is done again.
            logger.warning("run %s item %s not recorded: %s", self.run_id, item.asin, exc.message)
            self.stop("database_unavailable")
        finally:
            slots.release()

    async def _work(self, item: PendingItem) -> ItemOutcome:
        outcome = ItemOutcome()
        product_call, attempts = await self._call(self.provider.product, item.asin)
        outcome.attempts += attempts
        outcome.cost_cents += self.pricing.amazon_product_cents if product_call.charged else 0
        product = product_call.value
        if product is None:
            outcome.error = f"amazon_product: {product_call.error}"
            return outcome
        outcome.result = {
            "title": product.title,
            "price_cents": product.price_cents,
            "brand": product.brand,
        }
        sellers: dict[str, dict[str, Any]] = {}
        for search in range(self.pricing.ebay_searches_per_product):
            query = product.title if search == 0 else f"{product.brand or ''} {product.title}".strip()
            ebay_call, attempts = await self._call(self.provider.ebay_search, query)
            outcome.attempts += attempts
            outcome.cost_cents += self.pricing.ebay_search_cents if ebay_call.charged else 0
            if ebay_call.value is None:
                outcome.error = f"ebay_search: {ebay_call.error}"
                return outcome
            for listing in ebay_call.value:
                seen = sellers.setdefault(
                    listing.seller, {"seller": listing.seller, "listings": 0, "price_cents": None}
                )
                seen["listings"] += listing.listings
                if listing.price_cents is not None:
                    seen["price_cents"] = min(filter(None, (seen["price_cents"], listing.price_cents)))
        outcome.status = "done"
        outcome.sellers = sorted(sellers.values(), key=lambda s: (-s["listings"], s["seller"]))
        outcome.result["sellers"] = outcome.sellers
        return outcome

    async def _call(
        self, call: Callable[[str], Awaitable[CallResult[T]]], query: str
    ) -> tuple[CallResult[T], int]:
        """Retry free failures with backoff, a bounded number of times; never retry a charged one."""
        attempt = 0
        while True:
            attempt += 1
            await self.limiter.acquire()
            try:
                result = await call(query)
            except ProviderFatalError:
                self._count_error(call, "fatal")
                raise
            if not result.ok:
                self._count_error(call, "charged" if result.charged else "free")
            if result.ok or result.charged or attempt >= self.limits.max_attempts:
                return result, attempt
            delay = self.limits.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            await asyncio.sleep(delay)

    def _count_error(self, call: Callable[..., Any], error_class: str) -> None:
        if self.metrics is not None:
            self.metrics.provider_errors.labels(getattr(call, "__name__", "call"), error_class).inc()

    # Budget, failures, the end -----------------------------------------------------------------
    async def _reserve(self, cents: int) -> bool:
        outcome = await self.service.reserve_budget(self.lease, cents)
        if outcome == "ok":
            return True
        self.stop(outcome)
        if outcome == "budget_exhausted":
            logger.info("run %s paused: budget exhausted", self.run_id)
        return False

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        self.stop("failed")

    def _check_failure_share(self, run: CollectionRunResponse) -> None:
        processed, failed = run.processed_items, run.failed_items
        if (
            processed >= self.limits.min_items_for_failure_share
            and failed > processed * self.limits.max_failed_share
        ):
            self._fail(
                f"{failed} of {processed} products failed, more than {self.limits.max_failed_share:.0%}"
            )

    async def _finish(self) -> None:
        if self.stop_reason == "lease_lost":
            return
        try:
            if self.failure is not None:
                await self.service.finish_run(self.lease, RunAction.FAIL, self.failure)
                logger.warning("run %s failed: %s", self.run_id, self.failure)
                return
            if not self.stopping.is_set():
                categories = await self.service.run_categories(self.run_id)
                if categories and all(c.error for c in categories):
                    # Nothing could be collected: calling that "completed" would hide the failure.
                    self.failure = f"no category could be discovered ({categories[0].error})"
                    await self.service.finish_run(self.lease, RunAction.FAIL, self.failure)
                    logger.warning("run %s failed: %s", self.run_id, self.failure)
                    return
                finished = await self.service.finish_run(self.lease, RunAction.COMPLETE, None)
                if finished is not None:
                    logger.info(
                        "run %s completed: %s items, %s failed, %s cents (estimated %s)",
                        self.run_id,
                        finished.processed_items,
                        finished.failed_items,
                        finished.actual_cost_cents,
                        finished.estimated_cost_cents,
                    )
                    return
        except InvalidTransition:
            pass  # paused or cancelled meanwhile: give the run back as it is
        await self.service.release_run(self.lease)


class CollectionManager:
    """Claims running runs for this process, heartbeats their leases and runs an executor for each."""

    def __init__(
        self,
        service: CollectionService,
        provider: Provider,
        settings: Settings,
        metrics: Metrics | None = None,
    ) -> None:
        self.service = service
        self.provider = provider
        self.settings = settings
        self.metrics = metrics
        self.worker_id = settings.effective_worker_id
        self.token = uuid.uuid4()
        self.limits = ExecutorLimits.from_settings(settings)
        self.limiter = RateLimiter(settings.provider_rate_per_s)
        self.executors: dict[UUID, tuple[RunExecutor, asyncio.Task[None]]] = {}
        self._stopped = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._db_down_logged = False

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="collection-manager")
        logger.info(
            "collection manager started: worker %s, provider %s, up to %d runs x %d items in flight",
            self.worker_id,
            self.provider.name,
            self.settings.runs_per_process,
            self.limits.items_in_flight,
        )

    async def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                await self.tick()
                if self._db_down_logged:
                    logger.info("collection manager: database reachable again")
                    self._db_down_logged = False
            except DatabaseUnavailable as exc:
                if not self._db_down_logged:
                    logger.warning("collection manager waiting for the database: %s", exc.message)
                    self._db_down_logged = True
            except Exception:
                logger.exception("collection manager tick failed")
            try:
                await asyncio.wait_for(self._stopped.wait(), self.settings.executor_tick_s)
            except TimeoutError:
                pass

    async def tick(self) -> None:
        """Heartbeat what we hold, stop what we no longer hold, then claim what we have room for."""
        ttl = self.settings.lease_ttl_s
        held = await self.service.heartbeat(self.token, ttl)
        for run_id, (executor, _) in list(self.executors.items()):
            status = held.get(run_id)
            if status is None:
                executor.stop("lease_lost")
            elif status is not CollectionRunStatus.RUNNING:
                executor.stop(status.value)
        for run_id, status in held.items():
            if run_id in self.executors:
                continue
            if status is CollectionRunStatus.RUNNING:
                self._spawn(run_id)  # ours, but its executor ended early (e.g. the database was down)
            else:
                await self.service.release_run(Lease(run_id, self.token))
        room = self.settings.runs_per_process - len(self.executors)
        if room > 0:
            for run in await self.service.claim_runs(self.worker_id, self.token, ttl, room):
                logger.info("run %s (%s) claimed by %s", run.id, run.name, self.worker_id)
                self._spawn(run.id)

    def _spawn(self, run_id: UUID) -> None:
        executor = RunExecutor(
            self.service,
            self.provider,
            self.limits,
            self.limiter,
            Lease(run_id, self.token),
            self.worker_id,
            self.metrics,
        )
        task = asyncio.create_task(executor.execute(), name=f"run-{run_id}")
        self.executors[run_id] = (executor, task)
        task.add_done_callback(lambda _: self.executors.pop(run_id, None))

    async def stop(self) -> None:
        """Stop claiming, let items in flight finish and give the runs back (within the grace time)."""
        self._stopped.set()
        if self._loop_task is not None:
            await self._loop_task
        running = list(self.executors.items())
        for executor, _ in self.executors.values():
            executor.stop("shutdown")
        if not running:
            return
        grace = self.settings.shutdown_grace_s
        _, pending = await asyncio.wait([task for _, (_, task) in running], timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for run_id, (_, task) in running:
            if task not in pending:
                continue
            # Its calls were abandoned mid-flight: give the run back now rather than after the lease
            # expires; what they had reserved becomes an uncertain charge (release_run).
            logger.warning("run %s: calls still in flight after %.1fs; run given back", run_id, grace)
            try:
                await self.service.release_run(Lease(run_id, self.token))
            except CollectionError as exc:
                logger.warning("run %s: could not give it back: %s", run_id, exc.message)
