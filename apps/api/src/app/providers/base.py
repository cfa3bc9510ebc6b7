"""What the executor needs from a scraping provider, and how calls are billed.

Billing follows Oxylabs: a result whose *target* status is 2xx or 4xx is charged (except 429);
5xx, 6xx (e.g. 612, "no data") and 429 are free. A free failure may be retried; a charged one never
is. Credentials refused (HTTP 401 from the provider itself) is fatal for the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class Source(StrEnum):
    AMAZON_BESTSELLERS = "amazon_bestsellers"
    AMAZON_PRODUCT = "amazon_product"
    EBAY_SEARCH = "ebay_search"


@dataclass(frozen=True, slots=True)
class ProductRef:
    """A product found in a category's best sellers."""

    asin: str
    title: str | None = None


@dataclass(frozen=True, slots=True)
class Product:
    asin: str
    title: str
    price_cents: int | None
    brand: str | None


@dataclass(frozen=True, slots=True)
class SellerListing:
    """One eBay seller found for a product: how many of the search's listings are theirs."""

    seller: str
    listings: int
    price_cents: int | None


@dataclass(frozen=True, slots=True)
class RateLimitHeader:
    """A limit the provider reported with an answer (Oxylabs: `x-ratelimit-<name>-limit` and
    `x-ratelimit-<name>-remaining`)."""

    name: str
    limit: int
    remaining: int | None


@dataclass(frozen=True, slots=True)
class CallResult(Generic[T]):
    """The outcome of one provider call. `value` is None when the call failed."""

    value: T | None
    status_code: int  # the target's status as the provider reports it; 0: no answer at all
    charged: bool
    error: str | None = None
    # The provider refused the call for the account's rate (HTTP 429 from the API itself, not the target).
    throttled: bool = False
    rate_limits: tuple[RateLimitHeader, ...] = ()

    @property
    def ok(self) -> bool:
        return self.value is not None


class ProviderFatalError(Exception):
    """The provider cannot serve this run at all (e.g. credentials refused): fail the run."""


class Provider(Protocol):
    name: str

    async def bestsellers(self, category_id: str) -> CallResult[list[ProductRef]]: ...
    async def product(self, asin: str) -> CallResult[Product]: ...
    async def ebay_search(self, query: str) -> CallResult[list[SellerListing]]: ...
    async def aclose(self) -> None: ...


def is_charged(status_code: int) -> bool:
    """Whether a result with this target status is billed."""
    return 200 <= status_code < 300 or (400 <= status_code < 500 and status_code != 429)
