"""The sandbox provider: a deterministic catalogue derived from the category id, billed like Oxylabs.

Used when no Oxylabs credentials are set. Each category has 35..65 products (around the plan's 50),
each product 0..3 eBay sellers. Knobs: latency per call, and the share of calls that fail free
(target 503/612/429) or charged (target 404).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from pathlib import Path
from typing import Any

from app.providers.base import CallResult, Product, ProductRef, SellerListing, Source

BRANDS = (
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Stark",
    "Wayne",
    "Tyrell",
    "Soylent",
    "Cyberdyne",
)
SELLERS = tuple(
    f"{adjective}-{noun}"
    for adjective in ("best", "quick", "prime", "value", "smart", "top", "daily", "urban")
    for noun in ("deals", "outlet", "store", "market", "goods")
)
FREE_FAILURES = (503, 612, 429)


def _digest(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("|".join(parts).encode(), digest_size=8).digest(), "big")


def catalogue(category_id: str) -> list[str]:
    """The ASINs of a category's best sellers, always the same for the same id."""
    count = 35 + _digest("count", category_id) % 31
    return [f"B0{_digest('product', category_id, str(i)) % 16**8:08X}" for i in range(count)]


def product_of(asin: str) -> Product:
    """A product is derived from its ASIN alone, so any process answers the same."""
    seed = _digest("asin", asin)
    brand = BRANDS[seed % len(BRANDS)]
    return Product(asin=asin, title=f"{brand} product {asin}", price_cents=199 + seed % 20_000, brand=brand)


def ebay_listings(title: str) -> list[SellerListing]:
    count = _digest("sellers", title) % 4
    listings: dict[str, SellerListing] = {}
    for index in range(count):
        seed = _digest("seller", title, str(index))
        seller = SELLERS[seed % len(SELLERS)]
        listing = SellerListing(seller=seller, listings=1 + seed % 5, price_cents=99 + seed % 15_000)
        previous = listings.get(seller)
        if previous is not None:  # the same seller twice: merge, as the HTML parser would
            listing = SellerListing(
                seller,
                previous.listings + listing.listings,
                min(previous.price_cents or 0, listing.price_cents or 0),
            )
        listings[seller] = listing
    return list(listings.values())


class SandboxProvider:
    name = "sandbox"

    def __init__(
        self,
        latency_ms: int = 100,
        failure_rate: float = 0.0,
        charged_failure_rate: float = 0.0,
        seed: int | None = None,
        call_log: Path | None = None,
        worker_id: str = "",
    ) -> None:
        self.latency_s = latency_ms / 1000
        self.failure_rate = failure_rate
        self.charged_failure_rate = charged_failure_rate
        self._rng = random.Random(seed)
        self._call_log = call_log
        self._worker_id = worker_id

    async def _answer(self, source: Source, query: str) -> int | None:
        """Wait like a real call; return the failure status to answer with, if any."""
        if self.latency_s:
            await asyncio.sleep(self.latency_s * self._rng.uniform(0.5, 1.5))
        if self._call_log is not None:
            await asyncio.to_thread(self._log_call, source, query)
        roll = self._rng.random()
        if roll < self.failure_rate:
            return self._rng.choice(FREE_FAILURES)
        if roll < self.failure_rate + self.charged_failure_rate:
            return 404
        return None

    def _log_call(self, source: Source, query: str) -> None:
        assert self._call_log is not None
        with self._call_log.open("a") as log:
            log.write(f"{self._worker_id}\t{source.value}\t{query}\n")

    @staticmethod
    def _failed(status: int) -> CallResult[Any]:
        charged = status == 404
        return CallResult(value=None, status_code=status, charged=charged, error=f"target answered {status}")

    async def bestsellers(self, category_id: str) -> CallResult[list[ProductRef]]:
        failure = await self._answer(Source.AMAZON_BESTSELLERS, category_id)
        if failure is not None:
            return self._failed(failure)
        refs = [ProductRef(asin, product_of(asin).title) for asin in catalogue(category_id)]
        return CallResult(refs, 200, charged=True)

    async def product(self, asin: str) -> CallResult[Product]:
        failure = await self._answer(Source.AMAZON_PRODUCT, asin)
        if failure is not None:
            return self._failed(failure)
        return CallResult(product_of(asin), 200, charged=True)

    async def ebay_search(self, query: str) -> CallResult[list[SellerListing]]:
        failure = await self._answer(Source.EBAY_SEARCH, query)
        if failure is not None:
            return self._failed(failure)
        return CallResult(ebay_listings(query), 200, charged=True)

    async def aclose(self) -> None:
        return None
