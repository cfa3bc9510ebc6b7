"""The collection executor: one manager per process, sharing one provider account with every other
process on the database, through CollectionService as the API does.

A process does not own runs: it asks for units of work (a category's discovery, or an item) as it has
room for calls (`CollectionService.next_work`). Each unit comes in the fair turn between organisations,
with its worst-case cost reserved on its run's budget and a slot of the account's rate for its first
call; every later call takes a slot of its own (`take_slot`). So the account's limits hold for all
processes together, whatever their number, and a single large run spreads over all of them.

How many calls a process keeps in flight follows Little's law: its share of the account's rate times
the calls' observed latency (with room to spare), bounded by MAX_CALLS_IN_FLIGHT.

Durability rules (each enforced by a SQL function, fenced by the unit's lease):
- a unit's cost is reserved before its first call; a run that cannot afford its next unit pauses
  (`budget_exhausted`) instead;
- each finished unit lands in one atomic statement (result, counters, cost, checkpoint), once: only the
  holder of its lease can record it;
- a process that dies leaves its units leased; once the lease expires they are handed out again, and
  what they had reserved becomes an uncertain charge, so the provider can never have charged more
  than the cap.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from app.config import Pricing, Settings
from app.errors import CollectionError, DatabaseUnavailable, LeaseLost
from app.observability import Metrics
from app.operations import ExecutorView, Work
from app.providers.base import CallResult, Provider, ProviderFatalError, Source
from app.services.collection import CollectionService, FailureRule, ItemOutcome

logger = logging.getLogger(__name__)

T = TypeVar("T")

ACCOUNT = "provider"  # every call of the account
RENDERED = "provider:rendered"  # the calls that render a page (amazon_bestsellers)
# How far ahead a process books the account's slots: all a dead process can waste of the rate.
HORIZON_S = 1.0
# Little's law, with room to spare: calls in flight = rate x latency x HEADROOM (+1).
HEADROOM = 1.25
# At most this many units asked for in one call (the scheduler is held while they are chosen).
FEED_BATCH = 16
# The source of a unit's first call, whose slot comes with the unit.
FIRST_CALL = {"discovery": Source.AMAZON_BESTSELLERS, "item": Source.AMAZON_PRODUCT}
# A source whose calls succeed less than this share of the time over the window is slowed for everyone,
# as Oxylabs slows a domain (under 40 % over 5 minutes: 1 request a second).
SOURCE_SUCCESS_FLOOR = 0.4
SOURCE_WINDOW_S = 300.0
SOURCE_MIN_CALLS = 10
SOURCE_SLOW_PER_S = 1.0
SOURCE_SLOW_FOR_S = 60.0


def buckets_of(source: Source) -> list[str]:
    """The limits a call to `source` must keep within."""
    rendered = [RENDERED] if source is Source.AMAZON_BESTSELLERS else []
    return [ACCOUNT, *rendered, f"source:{source.value}"]


class Latency:
    """An exponentially weighted mean of the provider calls' latency, in seconds."""

    def __init__(self, initial_s: float, weight: float = 0.2) -> None:
        self.seconds = initial_s
        self._weight = weight

    def observe(self, seconds: float) -> None:
        self.seconds += self._weight * (seconds - self.seconds)


class SourceHealth:
    """This process's recent calls to each source, to tell when one keeps failing."""

    def __init__(self) -> None:
        self._calls: dict[Source, deque[tuple[float, bool]]] = {}
        self._slowed_at: dict[Source, float] = {}

    def failing(self, source: Source, ok: bool, now: float) -> bool:
        """Record a call; whether the source should be slowed now (at most once a SOURCE_SLOW_FOR_S)."""
        calls = self._calls.setdefault(source, deque())
        calls.append((now, ok))
        while calls and calls[0][0] < now - SOURCE_WINDOW_S:
            calls.popleft()
        if len(calls) < SOURCE_MIN_CALLS or now - self._slowed_at.get(source, -math.inf) < SOURCE_SLOW_FOR_S:
            return False
        if sum(ok for _, ok in calls) / len(calls) >= SOURCE_SUCCESS_FLOOR:
            return False
        self._slowed_at[source] = now
        return True


@dataclass(frozen=True)
class ExecutorLimits:
    max_calls_in_flight: int
    max_attempts: int
    backoff_s: float
    failure: FailureRule
    lease_s: int
    tick_s: float
    grace_s: float
    rates: dict[str, float]

    @classmethod
    def from_settings(cls, settings: Settings) -> ExecutorLimits:
        return cls(
            max_calls_in_flight=settings.max_calls_in_flight,
            max_attempts=settings.provider_max_attempts,
            backoff_s=settings.provider_backoff_s,
            failure=FailureRule(settings.max_failed_share, settings.min_items_for_failure_share),
            lease_s=settings.lease_ttl_s,
            tick_s=settings.executor_tick_s,
            grace_s=settings.shutdown_grace_s,
            rates={ACCOUNT: settings.provider_rate_per_s, RENDERED: settings.provider_rendered_rate_per_s},
        )


class CollectionManager:
    """This process's executor: a heartbeat every EXECUTOR_TICK_S, and as many workers as its share of
    the account's rate needs, each taking one unit of work at a time."""

    def __init__(
        self,
        service: CollectionService,
        provider: Provider,
        settings: Settings,
        metrics: Metrics | None = None,
    ) -> None:
        self.service = service
        self.provider = provider
        self.pricing: Pricing = service.pricing
        self.metrics = metrics
        self.limits = ExecutorLimits.from_settings(settings)
        self.owner = settings.effective_worker_id
        self.token = uuid.uuid4()
        self.view = ExecutorView(executors=1, rates={})
        self.latency = Latency(initial_s=0.5)
        self.health = SourceHealth()
        self.wanted = 1  # workers this process keeps
        self.in_flight = 0  # provider calls under way
        self.workers: dict[int, asyncio.Task[None]] = {}
        # Units handed to this process, each with the moment its first call's slot comes (monotonic).
        # One feeder asks the database for as many as workers are waiting, in one call.
        self._ready: deque[tuple[Work, float]] = deque()
        self._hungry = 0  # workers waiting for a unit
        self._fed = asyncio.Condition()
        self._feeder: asyncio.Task[None] | None = None
        self.stopping = asyncio.Event()  # no new work
        # The heartbeat stops last: the units of calls finishing in the grace time stay leased to us.
        self._heartbeat_stopping = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._db_down_logged = False
        self._ceilings: dict[str, float] = {}  # limits the provider's headers reported, told once each
        # Units given up whose release has not reached the database yet (it was out of reach): until
        # they are released, this process's heartbeats would keep them leased to nobody.
        self._abandoned: list[Work] = []

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="collection-manager")
        self._feeder = asyncio.create_task(self._feed(), name="collection-feeder")
        logger.info(
            "collection manager started: worker %s, provider %s, account rate %s calls/s "
            "(rendered %s), at most %d calls in flight",
            self.owner,
            self.provider.name,
            self.limits.rates[ACCOUNT] or "unlimited",
            self.limits.rates[RENDERED] or "unlimited",
            self.limits.max_calls_in_flight,
        )

    # The heartbeat ---------------------------------------------------------------------------------
    async def _loop(self) -> None:
        configured = False
        while not self._heartbeat_stopping.is_set():
            try:
                if not configured:
                    await self._configure()
                    configured = True
                self.view = await self.service.heartbeat(self.owner, self.token, self.limits.lease_s)
                await self._release_abandoned()
                if not self.stopping.is_set():
                    self._resize()
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
                await asyncio.wait_for(self._heartbeat_stopping.wait(), self.limits.tick_s)
            except TimeoutError:
                pass

    async def _configure(self) -> None:
        stored = await self.service.configure_rates(self.limits.rates)
        logger.info(
            "provider account limits: %s",
            ", ".join(
                f"{name} {per_s:g}/s" if per_s else f"{name} unlimited" for name, per_s in stored.items()
            ),
        )

    def _resize(self) -> None:
        """Little's law: this process's share of the account's rate times the calls' latency."""
        rate = self.view.rates.get(ACCOUNT)
        if not rate:
            wanted = self.limits.max_calls_in_flight
        else:
            share = rate / max(1, self.view.executors)
            wanted = math.ceil(share * self.latency.seconds * HEADROOM) + 1
        self.wanted = max(1, min(wanted, self.limits.max_calls_in_flight))
        for index in range(self.wanted):
            if index not in self.workers:
                task = asyncio.create_task(self._worker(index), name=f"collection-worker-{index}")
                self.workers[index] = task
                task.add_done_callback(self._forget_worker)
        if self.metrics is not None:
            self.metrics.workers.set(self.wanted)

    def _forget_worker(self, task: asyncio.Task[None]) -> None:
        for index, worker in list(self.workers.items()):
            if worker is task:
                del self.workers[index]

    # Units of work -----------------------------------------------------------------------------------
    async def _feed(self) -> None:
        """Ask for as many units as workers wait for, in one call (one hold of the scheduler for them
        all), and hand them out in the order they came."""
        while not self.stopping.is_set():
            async with self._fed:
                await self._fed.wait_for(lambda: self._hungry > len(self._ready) or self.stopping.is_set())
                wanted = self._hungry - len(self._ready)
            if self.stopping.is_set():
                return
            try:
                sent = time.monotonic()
                units = await self.service.next_work(
                    self.owner, self.token, self.limits.lease_s, HORIZON_S, min(wanted, FEED_BATCH)
                )
                # The database measured each wait from its own now: about half the round trip ago.
                answered_at = (sent + time.monotonic()) / 2
            except DatabaseUnavailable:
                await self._pause(self.limits.tick_s)
                continue
            except Exception:
                logger.exception("collection executor: asking for work failed")
                await self._pause(self.limits.tick_s)
                continue
            if not units:  # nothing to do anywhere
                await self._pause(self.limits.tick_s)
                continue
            if units[0].kind == "wait":  # the account's rate is taken for now
                await self._pause(units[0].wait_s)
                continue
            async with self._fed:
                self._ready.extend((work, answered_at + work.wait_s) for work in units)
                self._fed.notify_all()

    async def _next_unit(self) -> tuple[Work, float] | None:
        """The next unit handed to this process, and when its slot comes (None: stopping)."""
        async with self._fed:
            self._hungry += 1
            self._fed.notify_all()
            try:
                await self._fed.wait_for(lambda: bool(self._ready) or self.stopping.is_set())
            finally:
                self._hungry -= 1
            if self.stopping.is_set():
                return None
            return self._ready.popleft()

    async def _worker(self, index: int) -> None:
        while not self.stopping.is_set() and index < self.wanted:
            unit = await self._next_unit()
            if unit is None:
                return
            work, due = unit
            if not await self._pause(due - time.monotonic()):
                await self._give_back(work)  # stopping before its first call: nothing was spent
                return
            if self._missed(due):
                # Woken late (a busy loop): going now would crowd the next call's slot; take a new one.
                await self._slot(buckets_of(FIRST_CALL[work.kind]))
            await self._do(work)

    def _missed(self, due: float) -> bool:
        """Half a slot or more past `due`: the account's next call is about to leave too."""
        rate = self.view.rates.get(ACCOUNT)
        return rate is not None and rate > 0 and time.monotonic() - due > 0.5 / rate

    async def _pause(self, seconds: float) -> bool:
        """Sleep unless the process is stopping; True when it slept the whole time."""
        if seconds <= 0:
            return not self.stopping.is_set()
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
            return False
        except TimeoutError:
            return True

    async def _give_back(self, work: Work) -> None:
        try:
            await self.service.give_back(self.token, work, calls_made=False)
        except CollectionError as exc:
            logger.warning(
                "run %s: unit not given back (%s); its lease will expire", work.run_id, exc.message
            )

    async def _do(self, work: Work) -> None:
        try:
            if work.kind == "discovery":
                await self._discover(work)
            else:
                await self._item(work)
            return
        except ProviderFatalError as exc:
            reason = str(exc)
            logger.error("run %s failed: %s", work.run_id, reason)
            try:
                await self._record(lambda: self.service.fail_run(self.token, work, reason), work)
                return
            except CollectionError as failed:
                logger.warning("run %s: not failed: %s", work.run_id, failed.message)
        except CollectionError as exc:
            logger.warning(
                "run %s: unit %s not recorded: %s", work.run_id, work.asin or work.category_id, exc.message
            )
        except Exception:
            logger.exception("run %s: unit %s failed", work.run_id, work.asin or work.category_id)
        # Its calls were made but nothing is recorded: it goes back, to be done again.
        self._abandoned.append(work)
        await self._release_abandoned()

    async def _release_abandoned(self) -> None:
        for work in list(self._abandoned):
            try:
                await self.service.give_back(self.token, work, calls_made=True)
            except LeaseLost:
                pass  # no longer ours anyway
            except CollectionError:
                return  # the database is out of reach: the next heartbeat tries again
            if work in self._abandoned:
                self._abandoned.remove(work)

    async def _discover(self, work: Work) -> None:
        assert work.category_id is not None
        result, _ = await self._call(self.provider.bestsellers, work.category_id, Source.AMAZON_BESTSELLERS)
        products = [{"asin": p.asin, "title": p.title} for p in result.value or []]
        cost = self.pricing.bestsellers_cents if result.charged else 0
        error = None if result.ok else f"amazon_bestsellers: {result.error}"
        await self._record(
            lambda: self.service.checkpoint_discovery(self.token, work, products, cost, error), work
        )

    async def _item(self, work: Work) -> None:
        outcome = await self._work(work)
        run = await self._record(
            lambda: self.service.checkpoint(self.token, work, outcome, self.owner, self.limits.failure), work
        )
        if run is not None and self.metrics is not None:
            self.metrics.items.labels(outcome.status).inc()
            self.metrics.cents_charged.inc(outcome.cost_cents)

    async def _record(self, write: Callable[[], Awaitable[T]], work: Work) -> T | None:
        """A checkpoint, retried while the database is out of reach (the unit stays leased to this
        process as long as its heartbeats reach the database), for at most a lease."""
        deadline = time.monotonic() + self.limits.lease_s
        while True:
            try:
                return await write()
            except LeaseLost:
                logger.warning(
                    "run %s: unit %s was taken over; not recorded", work.run_id, work.asin or work.category_id
                )
                return None
            except DatabaseUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(min(1.0, self.limits.tick_s * 2))

    async def _work(self, work: Work) -> ItemOutcome:
        assert work.asin is not None
        outcome = ItemOutcome()
        product_call, attempts = await self._call(self.provider.product, work.asin, Source.AMAZON_PRODUCT)
        outcome.attempts += attempts
        outcome.cost_cents += self.pricing.amazon_product_cents if product_call.charged else 0
        product = product_call.value
        if product is None:
            outcome.error = f"amazon_product: {product_call.error}"
            return outcome
        outcome.result = {"title": product.title, "price_cents": product.price_cents, "brand": product.brand}
        sellers: dict[str, dict[str, Any]] = {}
        for search in range(self.pricing.ebay_searches_per_product):
            query = product.title if search == 0 else f"{product.brand or ''} {product.title}".strip()
            ebay_call, attempts = await self._call(
                self.provider.ebay_search, query, Source.EBAY_SEARCH, slotted=False
            )
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

    # Calls -----------------------------------------------------------------------------------------
    async def _call(
        self,
        call: Callable[[str], Awaitable[CallResult[T]]],
        query: str,
        source: Source,
        slotted: bool = True,
    ) -> tuple[CallResult[T], int]:
        """One provider call, each attempt in a slot of the account's rate (`slotted`: the first one's
        slot came with the unit); free failures retried with backoff, a bounded number of times; never
        a charged one."""
        buckets = buckets_of(source)
        attempt = 0
        while True:
            attempt += 1
            if attempt > 1 or not slotted:
                await self._slot(buckets)
            started = time.monotonic()
            self.in_flight += 1
            try:
                result = await call(query)
            except ProviderFatalError:
                self._count_error(source, "fatal")
                raise
            finally:
                self.in_flight -= 1
            now = time.monotonic()
            self.latency.observe(now - started)
            await self._learn(result, source, buckets, now)
            if result.ok or result.charged or attempt >= self.limits.max_attempts:
                return result, attempt
            delay = self.limits.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            await asyncio.sleep(delay)

    async def _slot(self, buckets: list[str]) -> None:
        """Wait for a slot of every limit in `buckets` (at once when none of them limits anything)."""
        if all(self.view.rates.get(name) is None for name in buckets):
            return
        while True:
            sent = time.monotonic()
            slot = await self.service.take_slot(buckets, HORIZON_S)
            # Measured by the database from its own now: about half the round trip ago.
            due = (sent + time.monotonic()) / 2 + slot.wait_s
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if slot.granted:
                return

    async def _learn(self, result: CallResult[Any], source: Source, buckets: list[str], now: float) -> None:
        """What a call tells about the account and the source, told to every process."""
        if not result.ok:
            self._count_error(source, "charged" if result.charged else "free")
        for limit in result.rate_limits:
            bucket = RENDERED if "render" in limit.name else ACCOUNT
            if self._ceilings.get(bucket) != limit.limit and 0 < limit.limit < (
                self.limits.rates[bucket] or math.inf
            ):
                self._ceilings[bucket] = limit.limit
                logger.warning(
                    "provider reports a %s limit of %s calls/s: planning for it", bucket, limit.limit
                )
                await self.service.observe_rate_limit(bucket, float(limit.limit))
        if result.throttled:
            refused = [name for name in buckets if not name.startswith("source:")]
            logger.warning("provider refused a call for the account's rate (429): every process slows down")
            if self.metrics is not None:
                self.metrics.throttled.labels(source.value).inc()
            rate = self.view.rates.get(ACCOUNT) or float(self.limits.max_calls_in_flight) / max(
                self.latency.seconds, 0.01
            )
            await self.service.throttle(refused, rate)
        elif self.health.failing(source, result.ok, now):
            logger.warning(
                "%s: under %d%% of calls succeeded over the last %d s: slowed to %g/s for every process",
                source.value,
                SOURCE_SUCCESS_FLOOR * 100,
                SOURCE_WINDOW_S,
                SOURCE_SLOW_PER_S,
            )
            await self.service.slow_source(source.value, SOURCE_SLOW_PER_S, SOURCE_SLOW_FOR_S)

    def _count_error(self, source: Source, error_class: str) -> None:
        if self.metrics is not None:
            self.metrics.provider_errors.labels(source.value, error_class).inc()

    # Shutdown --------------------------------------------------------------------------------------
    async def stop(self) -> None:
        """Stop taking work; workers waiting for a slot give their unit back, calls in flight get
        SHUTDOWN_GRACE_S to finish and be recorded; then whatever is left is abandoned and every unit
        still held goes back (its reservation an uncertain charge)."""
        self.stopping.set()
        async with self._fed:
            self._fed.notify_all()
        if self._feeder is not None:
            await self._feeder
        workers = list(self.workers.values())
        if workers:
            _, pending = await asyncio.wait(workers, timeout=self.limits.grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if pending:
                logger.warning(
                    "%d unit(s) still in flight after %.1fs: abandoned", len(pending), self.limits.grace_s
                )
        for work, _ in self._ready:  # handed to this process, never started
            await self._give_back(work)
        self._ready.clear()
        self._heartbeat_stopping.set()
        if self._loop_task is not None:
            await self._loop_task
        try:
            await self.service.release_work(self.token)
        except CollectionError as exc:
            logger.warning("could not give this process's units back: %s", exc.message)
