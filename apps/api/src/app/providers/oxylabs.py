"""The Oxylabs Web Scraper API as a `Provider`, over the synchronous Realtime endpoint.

Documentation followed (developers.oxylabs.io, "Web Scraper API"; the same pages are published as Markdown in
the oxylabs/gitbook-public-english repository):

- Integration methods > Realtime: `POST https://realtime.oxylabs.io/v1/queries`, HTTP Basic auth with the API
  user, a JSON payload; the job's answer comes back on the same connection as
  `{"results": [{"content": ..., "created_at", "updated_at", "page", "url", "job_id", "status_code",
  "parser_type"}]}`, where `status_code` is the *target's* status (what Amazon or eBay answered).
- Targets > Amazon > Best Sellers (`amazon_bestsellers`): payload `{"source", "domain", "query": <browse node
  id>, "render": "html", "parse": true}` (the page marks `render` as a mandatory parameter of this source).
  Parsed content: `{"url", "page", "pages", "query", "results": [{"pos", "url", "asin", "price", "title",
  "rating", "currency", "is_prime", "price_str", "price_upper", "ratings_count"}], "parse_status_code"}`.
  `results` is a plain list here (not `results.organic`, which is `amazon_search`'s shape).
- Targets > Amazon > Product (`amazon_product`): payload `{"source", "domain", "query": <ASIN>, "parse": true,
  "context": [{"key": "autoselect_variant", "value": true}]}` (the page's own sample; the option is what it
  recommends "to get accurate pricing/buybox data"). Parsed content: `{"asin", "title", "product_name",
  "brand" (optional), "manufacturer", "price", "price_buybox", "currency", ..., "parse_status_code"}`.
  A price the parser could not read comes back as `0` (and `price_buybox` as `-1`) with a `_warnings` entry
  "Could not parse price." (the Amazon URL page's output example), so a price <= 0 means "unknown".
- Targets > eBay > Search (`ebay_search`): payload `{"source", "domain", "query"}`; HTML output only ("you can
  easily build your own parser"), so the sellers are read from the page with BeautifulSoup: the `li.s-item`
  layout (`.s-item__price`, `.s-item__seller-info-text` "name (1,234) 99.5%") and the newer `li.s-card` layout
  (`.s-card__price`, a `.s-card__attribute-row` reading "name 99.5% positive (1.2K)"), as public scrapers of
  eBay read them.
- Response codes (API): 401 "Authorization header not provided / Invalid authorization header / Client not
  found", 403 "Forbidden", 429 "Too many requests", 500 "Internal Server Error", 524 "Timeout", 612
  "Undefined Internal Error" (retry at no extra cost).
- Usage and billing > Rate limits: the account's job rate per plan (total and rendered jobs a second),
  reported with every answer as `x-ratelimit-<name>-limit` and `x-ratelimit-<name>-remaining` (one pair per
  limit that applies); past it the API answers 429. A 429 is `throttled` here: the executor slows the account.

Billing follows `base.is_charged` on the target status. Answers of the API itself (no job was done) are free,
except 401/403, which raise `ProviderFatalError`. No call is retried here: the executor retries free failures.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, TypeVar

import httpx
from bs4 import BeautifulSoup, Tag

from app.providers.base import (
    CallResult,
    Product,
    ProductRef,
    ProviderFatalError,
    RateLimitHeader,
    SellerListing,
    Source,
    is_charged,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

QUERIES_PATH = "/v1/queries"


class UnparseableContent(ValueError):
    """An answer that does not have the documented shape; the message says what is missing."""


class OxylabsProvider:
    name = "oxylabs"

    def __init__(
        self,
        username: str,
        password: str,
        base_url: str = "https://realtime.oxylabs.io",
        timeout_s: float = 60.0,
        domain: str = "com",
    ) -> None:
        # The password lives only inside httpx's BasicAuth: nothing on this object can print it.
        self._client = httpx.AsyncClient(
            base_url=base_url,
            auth=httpx.BasicAuth(username, password),
            timeout=httpx.Timeout(timeout_s),
        )
        self._timeout_s = timeout_s
        self._domain = domain
        # The first eBay page parsed imports and compiles the CSS selectors, blocking the event loop
        # long enough to delay the calls due meanwhile (which then leave together): done here, at start.
        parse_ebay_sellers('<ul class="srp-results"></ul>')

    async def bestsellers(self, category_id: str) -> CallResult[list[ProductRef]]:
        payload = {
            "source": Source.AMAZON_BESTSELLERS.value,
            "domain": self._domain,
            "query": category_id,
            "render": "html",
            "parse": True,
        }
        return await self._call(payload, parse_bestsellers)

    async def product(self, asin: str) -> CallResult[Product]:
        payload = {
            "source": Source.AMAZON_PRODUCT.value,
            "domain": self._domain,
            "query": asin,
            "parse": True,
            "context": [{"key": "autoselect_variant", "value": True}],
        }
        return await self._call(payload, lambda content: parse_product(asin, content))

    async def ebay_search(self, query: str) -> CallResult[list[SellerListing]]:
        payload = {"source": Source.EBAY_SEARCH.value, "domain": self._domain, "query": query}
        return await self._call(payload, parse_ebay_sellers)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, payload: dict[str, Any], parse: Callable[[Any], T]) -> CallResult[T]:
        what = f"{payload['source']} {payload['query']!r}"
        try:
            response = await self._client.post(QUERIES_PATH, json=payload)
        except httpx.TimeoutException as exc:
            error = f"no answer from Oxylabs within {self._timeout_s:g}s ({type(exc).__name__})"
            return _failure(what, 0, charged=False, error=error)
        except httpx.TransportError as exc:
            return _failure(
                what, 0, charged=False, error=f"could not reach Oxylabs ({type(exc).__name__}: {exc})"
            )

        limits = read_rate_limits(response.headers)
        if response.status_code in (401, 403):
            message = f"Oxylabs rejected the credentials (HTTP {response.status_code})"
            logger.error("%s: %s", what, message)
            raise ProviderFatalError(message)
        if not response.is_success:
            # Oxylabs refused or failed the request itself (429, 5xx, 524, 612, a 400 on the payload): no job
            # was done, so nothing was billed.
            error = f"Oxylabs answered HTTP {response.status_code}{_body_excerpt(response)}"
            return _failure(
                what,
                response.status_code,
                charged=False,
                error=error,
                throttled=response.status_code == 429,
                limits=limits,
            )

        try:
            target_status, content = read_envelope(response)
        except UnparseableContent as exc:
            # The API said 200, so a job may well have run and been billed: count it against the budget
            # rather than retry it as if it were free.
            return _failure(
                what,
                response.status_code,
                charged=True,
                error=f"unreadable Oxylabs answer: {exc}",
                limits=limits,
            )

        charged = is_charged(target_status)
        if not 200 <= target_status < 300:
            return _failure(
                what,
                target_status,
                charged=charged,
                error=f"the target answered {target_status}",
                limits=limits,
            )
        try:
            value = parse(content)
        except UnparseableContent as exc:
            return _failure(
                what, target_status, charged=charged, error=f"unparseable result: {exc}", limits=limits
            )
        return CallResult(value=value, status_code=target_status, charged=charged, rate_limits=limits)


def _failure(
    what: str,
    status_code: int,
    *,
    charged: bool,
    error: str,
    throttled: bool = False,
    limits: tuple[RateLimitHeader, ...] = (),
) -> CallResult[Any]:
    logger.warning("Oxylabs %s failed (status %s, %s): %s", what, status_code, _billing(charged), error)
    return CallResult(
        value=None,
        status_code=status_code,
        charged=charged,
        error=error,
        throttled=throttled,
        rate_limits=limits,
    )


_RATE_LIMIT_HEADER = re.compile(r"^x-ratelimit-(?P<name>.+)-(?P<kind>limit|remaining)$")


def read_rate_limits(headers: httpx.Headers) -> tuple[RateLimitHeader, ...]:
    """The limits an answer reports (Usage and billing > Rate limits: `x-ratelimit-<name>-limit` and
    `x-ratelimit-<name>-remaining`, possibly several names). A value that is not a whole number is
    ignored."""
    found: dict[str, dict[str, int]] = {}
    for key, value in headers.items():
        match = _RATE_LIMIT_HEADER.match(key.lower())
        if match is None:
            continue
        try:
            number = int(value.strip())
        except ValueError:
            continue
        found.setdefault(match.group("name"), {})[match.group("kind")] = number
    return tuple(
        RateLimitHeader(name, values["limit"], values.get("remaining"))
        for name, values in sorted(found.items())
        if "limit" in values
    )


def _billing(charged: bool) -> str:
    return "charged" if charged else "free"


def _body_excerpt(response: httpx.Response, limit: int = 200) -> str:
    text = " ".join(response.text.split())
    if not text:
        return ""
    return f": {text[:limit]}{'...' if len(text) > limit else ''}"


def read_envelope(response: httpx.Response) -> tuple[int, Any]:
    """The target status and the content of `results[0]` of a Realtime answer."""
    try:
        body = response.json()
    except ValueError as exc:  # JSONDecodeError, or bytes that are not text at all
        raise UnparseableContent(f"the body is not JSON ({exc})") from exc
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list) or not results or not isinstance(results[0], dict):
        raise UnparseableContent("the body has no results[0]")
    status = results[0].get("status_code")
    if not isinstance(status, int) or isinstance(status, bool):
        raise UnparseableContent("results[0] has no status_code")
    return status, results[0].get("content")


# --- Amazon (dedicated parsers, parse=true) -----------------------------------------------------------------


def parse_bestsellers(content: Any) -> list[ProductRef]:
    if not isinstance(content, dict):
        raise UnparseableContent(f"the content is {type(content).__name__}, not a parsed best-sellers page")
    items = content.get("results")
    if not isinstance(items, list):
        raise UnparseableContent(f"no results list in the content{_parse_status(content)}")
    refs: list[ProductRef] = []
    seen: set[str] = set()
    for item in items:
        asin = _text(item.get("asin")) if isinstance(item, dict) else None
        if asin is None or asin in seen:
            continue
        seen.add(asin)
        refs.append(ProductRef(asin=asin, title=_text(item.get("title"))))
    if not refs:
        # A best-sellers page always lists products: an empty list is a page the parser could not read.
        raise UnparseableContent(
            f"no product with an ASIN among {len(items)} results{_parse_status(content)}"
        )
    return refs


def parse_product(asin: str, content: Any) -> Product:
    if not isinstance(content, dict):
        raise UnparseableContent(f"the content is {type(content).__name__}, not a parsed product page")
    title = _text(content.get("title")) or _text(content.get("product_name"))
    if title is None:
        raise UnparseableContent(f"the product has no title{_parse_status(content)}")
    price_cents = amount_cents(content.get("price"))
    if price_cents is None:
        price_cents = amount_cents(content.get("price_buybox"))
    return Product(
        # The ASIN asked for, not `content.asin`: with autoselect_variant the page may be a variation's,
        # and the item stays keyed by the ASIN the best-sellers list gave.
        asin=asin,
        title=title,
        price_cents=price_cents,
        brand=_text(content.get("brand")) or _text(content.get("manufacturer")),
    )


def _parse_status(content: dict[str, Any]) -> str:
    code = content.get("parse_status_code")
    return "" if code is None else f" (parse_status_code {code})"


def _text(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    return " ".join(value.split()) or None


# --- Money --------------------------------------------------------------------------------------------------

_AMOUNT = re.compile(r"\d+(?:[.,]\d+)*")


def amount_cents(value: Any) -> int | None:
    """A price as the parsers give it (number or text) in integer cents; None when absent or not positive."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        amount: Decimal | None = Decimal(value)
    elif isinstance(value, float):
        # str() gives the shortest repr (19.99, not 19.989999...), so no binary rounding reaches the cents.
        amount = Decimal(str(value)) if math.isfinite(value) else None
    elif isinstance(value, str):
        return price_cents(value)
    else:
        return None
    return _to_cents(amount)


def price_cents(text: str) -> int | None:
    """The first amount in a price text ("$1,299.99", "EUR 12,99", "$9.99 to $14.99") in integer cents."""
    match = _AMOUNT.search(text)
    if match is None:
        return None
    token = match.group()
    last_dot, last_comma = token.rfind("."), token.rfind(",")
    if last_dot >= 0 and last_comma >= 0:
        decimal_mark = "." if last_dot > last_comma else ","
        grouping = "," if decimal_mark == "." else "."
        token = token.replace(grouping, "").replace(decimal_mark, ".")
    elif last_comma >= 0:
        # "12,99" has a decimal comma; "1,299" and "1,299,000" group thousands.
        is_decimal = token.count(",") == 1 and len(token) - last_comma - 1 == 2
        token = token.replace(",", ".") if is_decimal else token.replace(",", "")
    elif token.count(".") > 1:
        token = token.replace(".", "")
    try:
        return _to_cents(Decimal(token))
    except InvalidOperation:
        return None


def _to_cents(amount: Decimal | None) -> int | None:
    if amount is None or not amount.is_finite() or amount <= 0:
        return None
    return int((amount * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


# --- eBay (HTML) --------------------------------------------------------------------------------------------

# eBay renders a hidden template item first in the `s-item` layout.
_PLACEHOLDER_TITLES = {"shop on ebay"}
_SELLER_PATTERNS = (
    # s-item: "name (1,234) 99.5%"
    re.compile(r"^(?P<name>\S+)\s+\([\d.,]+K?\)"),
    # s-card: "name 99.5% positive (1.2K)"
    re.compile(r"^(?P<name>\S+)\s+\d{1,3}(?:[.,]\d+)?%\s+positive", re.IGNORECASE),
)
# Results after this marker match only some words of the query: other products.
_FEWER_WORDS_MARKER = "srp-river-answer--REWRITE_START"


def parse_ebay_sellers(content: Any) -> list[SellerListing]:
    """The sellers of an eBay search page: how many of its listings are theirs and their lowest price."""
    if not isinstance(content, str) or not content.strip():
        raise UnparseableContent("the content is not an HTML page")
    soup = BeautifulSoup(content, "html.parser")
    prices_by_seller: dict[str, list[int | None]] = {}
    listings_seen = 0
    for node in soup.select(f"li.s-item, li.s-card, li.{_FEWER_WORDS_MARKER}"):
        if _FEWER_WORDS_MARKER in node.get_attribute_list("class"):
            break
        title = _ebay_title(node)
        if title is None or title.lower() in _PLACEHOLDER_TITLES:
            continue
        listings_seen += 1
        seller = _ebay_seller(node)
        if seller is not None:
            prices_by_seller.setdefault(seller, []).append(_ebay_price(node))

    if listings_seen == 0:
        if soup.select_one("ul.srp-results, .srp-save-null-search") is not None:
            return []  # a search that found nothing
        raise UnparseableContent("no eBay search results markup in the page")
    if not prices_by_seller:
        raise UnparseableContent(f"{listings_seen} listings, none showing its seller")
    return [
        SellerListing(
            seller=seller,
            listings=len(prices),
            price_cents=min((p for p in prices if p is not None), default=None),
        )
        for seller, prices in prices_by_seller.items()
    ]


def _ebay_title(node: Tag) -> str | None:
    element = node.select_one(".s-item__title, .s-card__title")
    return None if element is None else _text(element.get_text(" ", strip=True))


def _ebay_seller(node: Tag) -> str | None:
    for element in node.select(".s-item__seller-info-text, .s-card__attribute-row"):
        text = element.get_text(" ", strip=True)
        for pattern in _SELLER_PATTERNS:
            match = pattern.match(text)
            if match:
                return match.group("name")
    return None


def _ebay_price(node: Tag) -> int | None:
    for element in node.select(".s-item__price, .s-card__price"):
        if any("strikethrough" in name.lower() for name in element.get_attribute_list("class")):
            continue  # the was-price next to a discounted one
        cents = price_cents(element.get_text(" ", strip=True))
        if cents is not None:
            return cents
    return None
