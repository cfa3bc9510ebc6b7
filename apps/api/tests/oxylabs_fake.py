"""A local Oxylabs: a real HTTP server on 127.0.0.1 answering `POST /v1/queries` as the Realtime API does.

It checks HTTP Basic auth, records every request it receives (payload and Authorization header), and answers
in Oxylabs' documented envelope `{"results": [{"content": ..., "status_code": <target status>, ...}]}` with
canned content per source: a parsed `amazon_bestsellers` page, parsed `amazon_product` pages (shapes from
the Best Sellers and Product pages of the Web Scraper API docs), and eBay search pages as HTML (`ebay_search`
has no dedicated parser) in both eBay layouts, `li.s-item` and `li.s-card`.

A test scripts what a query gets, in order, to provoke each failure class:

    fake.script("B0EXAMPLE1", Answer(target_status=503), Answer())  # a free failure, then the canned page
    fake.script("172541", Answer(http_status=401))                  # the API refuses the credentials
    fake.script("headphones", Answer(delay_s=2.0))                  # longer than the client waits

Unscripted queries get `Answer()`: HTTP 200, target 200, the canned content.

    with serve_fake_oxylabs() as fake:
        provider = OxylabsProvider(USERNAME, PASSWORD, base_url=fake.base_url)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

USERNAME = "collector_api_user"
PASSWORD = "Sup3r-s3cret_Oxy+pass"

SOURCES = ("amazon_bestsellers", "amazon_product", "ebay_search")

# HTTP-level messages, as on the Response codes page.
API_MESSAGES = {
    400: "Bad request",
    401: "Invalid authorization header",
    403: "Forbidden",
    422: "Unprocessable Entity",
    429: "Too many requests",
    500: "Internal Server Error",
    524: "Timeout",
}


class _Canned:
    def __repr__(self) -> str:
        return "CANNED"


CANNED: Any = _Canned()
"""Stands for "the canned content for this source and query" in an `Answer`."""


@dataclass(frozen=True)
class Answer:
    """What one request gets. `raw_body` replaces the whole HTTP body (e.g. to send malformed JSON)."""

    http_status: int = 200
    target_status: int = 200
    content: Any = CANNED
    raw_body: str | None = None
    delay_s: float = 0.0


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    authorization: str | None
    payload: Any  # the JSON body, or None when it was not JSON

    @property
    def credentials(self) -> tuple[str, str] | None:
        """(username, password) of a Basic Authorization header, or None."""
        scheme, _, encoded = (self.authorization or "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            username, colon, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return (username, password) if colon else None


@dataclass
class FakeOxylabs:
    username: str = USERNAME
    password: str = PASSWORD
    base_url: str = ""
    _scripts: defaultdict[str, deque[Answer]] = field(default_factory=lambda: defaultdict(deque))
    _requests: list[ReceivedRequest] = field(default_factory=list)
    # The server runs on its own thread and event loop; tests read and script from theirs.
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def script(self, query: str, *answers: Answer) -> None:
        """Queue answers for a query; each request for it takes the next one, then the default `Answer()`."""
        with self._lock:
            self._scripts[query].extend(answers)

    @property
    def requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        with self._lock:
            self._scripts.clear()
            self._requests.clear()

    def _record(self, received: ReceivedRequest) -> None:
        with self._lock:
            self._requests.append(received)

    def _next_answer(self, query: str) -> Answer:
        with self._lock:
            queued = self._scripts.get(query)
            return queued.popleft() if queued else Answer()

    def _authorized(self, received: ReceivedRequest) -> bool:
        return received.credentials == (self.username, self.password)


def build_app(fake: FakeOxylabs) -> Starlette:
    async def queries(request: Request) -> Response:
        body = await request.body()
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        received = ReceivedRequest(
            method=request.method,
            path=request.url.path,
            authorization=request.headers.get("authorization"),
            payload=payload,
        )
        fake._record(received)
        if received.authorization is None:
            return JSONResponse({"message": "Authorization header not provided"}, status_code=401)
        if not fake._authorized(received):
            return JSONResponse({"message": API_MESSAGES[401]}, status_code=401)
        if not isinstance(payload, dict) or not isinstance(payload.get("query"), str):
            return JSONResponse({"message": "query is required"}, status_code=400)
        source = payload.get("source")
        if source not in SOURCES:
            return JSONResponse({"message": f"Unsupported source: {source}"}, status_code=400)

        query = payload["query"]
        answer = fake._next_answer(query)
        if answer.delay_s:
            await asyncio.sleep(answer.delay_s)
        if answer.raw_body is not None:
            return Response(answer.raw_body, status_code=answer.http_status, media_type="application/json")
        if answer.http_status != 200:
            message = API_MESSAGES.get(answer.http_status, "Error")
            return JSONResponse({"message": message}, status_code=answer.http_status)
        content = answer.content
        if content is CANNED:
            content = canned_content(source, query) if 200 <= answer.target_status < 300 else ""
        return JSONResponse(envelope(source, query, answer.target_status, content))

    return Starlette(routes=[Route("/v1/queries", queries, methods=["POST"])])


@contextmanager
def serve_fake_oxylabs(username: str = USERNAME, password: str = PASSWORD) -> Iterator[FakeOxylabs]:
    """Run the fake on a free loopback port (uvicorn on a background thread) for the duration of the block."""
    fake = FakeOxylabs(username=username, password=password)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        build_app(fake), log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fake-oxylabs", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the fake Oxylabs server did not start")
        time.sleep(0.01)
    fake.base_url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# --- The envelope and the canned content --------------------------------------------------------------------

_job_ids = iter(range(7_300_000_000_000_000_001, 8_000_000_000_000_000_000))


def envelope(source: str, query: str, target_status: int, content: Any) -> dict[str, Any]:
    return {
        "results": [
            {
                "content": content,
                "created_at": "2025-03-04 10:15:02",
                "updated_at": "2025-03-04 10:15:09",
                "page": 1,
                "url": target_url(source, query),
                "job_id": str(next(_job_ids)),
                "status_code": target_status,
                "parser_type": "",
            }
        ]
    }


def target_url(source: str, query: str) -> str:
    if source == "amazon_bestsellers":
        return f"https://www.amazon.com/gp/bestsellers/x/{query}/?pg=1"
    if source == "amazon_product":
        return f"https://www.amazon.com/dp/{query}"
    return f"https://www.ebay.com/sch/i.html?_nkw={query.replace(' ', '+')}"


def canned_content(source: str, query: str) -> Any:
    if source == "amazon_bestsellers":
        return bestsellers_content(query)
    if source == "amazon_product":
        return PRODUCTS.get(query) or product_content(query, f"Product {query}", 19.99, brand="Generic")
    return EBAY_PAGES.get(query, EBAY_PAGE_S_ITEM)


# amazon_bestsellers, parse=true: `results` is a list of items (Best Sellers page, "Structured data").
BESTSELLERS_CATEGORY = "172541"
BESTSELLERS: list[dict[str, Any]] = [
    {
        "asin": "B0C1HX4P2K",
        "title": "Northwind Studio Over-Ear Wireless Headphones, 40h Battery, Black",
        "price": 129.99,
        "rating": 4.6,
        "ratings_count": 18233,
    },
    {
        "asin": "B09QW2V7LM",
        "title": "Contoso Pods Mini True Wireless Earbuds with Charging Case",
        "price": 4.35,
        "rating": 4.3,
        "ratings_count": 5120,
    },
    {
        "asin": "B08ZJ1TQ3R",
        "title": "Fabrikam Kids Headphones, Volume Limited 85dB, Blue",
        "price": 0,  # the parser could not read the price
        "rating": 4.7,
        "ratings_count": 0,
    },
    {
        "asin": "B0BT7N8S9D",
        "title": "Tailspin Sport Bone Conduction Headphones",
        "price": 1299.0,
        "rating": 4.1,
        "ratings_count": 902,
    },
]


def bestsellers_content(category_id: str) -> dict[str, Any]:
    return {
        "url": target_url("amazon_bestsellers", category_id),
        "page": 1,
        "pages": 2,
        "query": category_id,
        "results": [
            {
                "pos": pos,
                "url": f"/dp/{item['asin']}/ref=zg_bs_{category_id}_{pos}?psc=1",
                "asin": item["asin"],
                "price": item["price"],
                "title": item["title"],
                "rating": item["rating"],
                "currency": "USD",
                "is_prime": pos % 2 == 1,
                "price_str": "",
                "price_upper": item["price"],
                "ratings_count": item["ratings_count"],
            }
            for pos, item in enumerate(BESTSELLERS, start=1)
        ],
        "parse_status_code": 12000,
    }


# amazon_product, parse=true (Product page, "Structured data"; a field set trimmed to the common ones).
def product_content(
    asin: str,
    title: str,
    price: float,
    *,
    brand: str | None,
    manufacturer: str = "",
    price_buybox: float = -1,
    warnings: list[str] | None = None,
) -> dict[str, Any]:
    content: dict[str, Any] = {
        "url": f"https://www.amazon.com/dp/{asin}",
        "page": 1,
        "page_type": "Product",
        "asin": asin,
        "asin_in_url": asin,
        "title": title,
        "manufacturer": manufacturer,
        "product_name": title,
        "description": "",
        "bullet_points": "Comfortable fit\nLong battery life",
        "category": [{"ladder": [{"name": "Electronics", "url": "/electronics/b?ie=UTF8&node=172282"}]}],
        "rating": 4.5,
        "price": price,
        "price_upper": price,
        "price_sns": 0,
        "price_initial": 0,
        "price_shipping": 0,
        "price_buybox": price_buybox,
        "deal_type": "",
        "coupon": "",
        "is_prime_eligible": True,
        "currency": "USD",
        "stock": "In Stock",
        "reviews_count": 1864,
        "pricing_count": 1,
        "images": [f"https://m.media-amazon.com/images/I/{asin}._AC_SL1500_.jpg"],
        "parse_status_code": 12005 if warnings else 12000,
    }
    if brand is not None:
        content["brand"] = brand
    if warnings:
        content["_warnings"] = warnings
    return content


PRODUCTS: dict[str, dict[str, Any]] = {
    "B0C1HX4P2K": product_content(
        "B0C1HX4P2K",
        "Northwind Studio Over-Ear Wireless Headphones, 40h Battery, Black",
        129.99,
        brand="Northwind",
        manufacturer="Northwind Audio Ltd",
        price_buybox=129.99,
    ),
    "B09QW2V7LM": product_content(
        "B09QW2V7LM", "Contoso Pods Mini True Wireless Earbuds", 4.35, brand="Contoso", price_buybox=4.35
    ),
    # As in the docs' example of a page whose price could not be read: price 0, price_buybox -1, a warning,
    # parse_status_code 12005; and no brand, only a manufacturer.
    "B08ZJ1TQ3R": product_content(
        "B08ZJ1TQ3R",
        "Fabrikam Kids Headphones, Volume Limited 85dB, Blue",
        0,
        brand=None,
        manufacturer="Fabrikam",
        warnings=["Could not parse price.", "Could not parse description."],
    ),
    "B0BT7N8S9D": product_content(
        "B0BT7N8S9D",
        "Tailspin Sport Bone Conduction Headphones",
        1299.0,
        brand="Tailspin",
        price_buybox=1299.0,
    ),
}


# ebay_search: HTML. Three sellers in each page; the same listings in both layouts.
EBAY_QUERY_S_ITEM = "Northwind Studio Over-Ear Wireless Headphones"
EBAY_QUERY_S_CARD = "Contoso Pods Mini True Wireless Earbuds"
EBAY_QUERY_NO_RESULTS = "Fabrikam Kids Headphones Volume Limited"

# (title, price text, seller, feedback count, positive %) in page order.
EBAY_LISTINGS = [
    ("Northwind Studio Wireless Headphones Black NEW", "$118.00", "audio_outlet_usa", "12,408", "99.7"),
    ("Northwind Studio Over-Ear Headphones - Sealed", "$124.95", "gadget.depot-22", "3,115", "98.9"),
    ("Northwind Studio Headphones Black Open Box", "$96.50", "audio_outlet_usa", "12,408", "99.7"),
    (
        "NEW Northwind Studio Wireless Over-Ear (Black)",
        "$99.99 to $109.99",
        "audio_outlet_usa",
        "12,408",
        "99.7",
    ),
    ("Northwind Studio Headphones Refurbished", "$1,089.00", "kw_electronics", "87", "100"),
    ("Northwind Studio Headphones w/ Case", "$131.20", "gadget.depot-22", "3,115", "98.9"),
]
# What parsing EBAY_LISTINGS must give: seller -> (listings, lowest price in cents).
EBAY_SELLERS = {
    "audio_outlet_usa": (3, 9650),
    "gadget.depot-22": (2, 12495),
    "kw_electronics": (1, 108900),
}
# Listed after eBay's "Results matching fewer words" marker: not the product searched for.
EBAY_FEWER_WORDS_LISTING = ("Northwind Ear Pads Replacement", "$9.99", "pads_and_parts", "412", "97.0")


def _s_item(title: str, price: str, seller: str | None, feedback: str = "", percent: str = "") -> str:
    seller_info = (
        '<div class="s-item__detail s-item__detail--secondary"><span class="s-item__seller-info">'
        f'<span class="s-item__seller-info-text">{seller} ({feedback}) {percent}%</span></span></div>'
        if seller
        else ""
    )
    return (
        '<li class="s-item s-item__pl-on-bottom" data-view="mi:1686|iid:1">'
        '<div class="s-item__wrapper clearfix">'
        '<div class="s-item__image-section"><div class="s-item__image"><img alt="" src="https://i.ebayimg.com/'
        'images/g/x/s-l140.webp"></div></div><div class="s-item__info clearfix">'
        '<a class="s-item__link" href="https://www.ebay.com/itm/256012345678">'
        f'<div class="s-item__title"><span role="heading" aria-level="3">{title}</span></div></a>'
        '<div class="s-item__subtitle"><span class="SECONDARY_INFO">Brand New</span></div>'
        '<div class="s-item__details clearfix"><div class="s-item__detail s-item__detail--primary">'
        f'<span class="s-item__price">{price}</span></div>'
        '<div class="s-item__detail s-item__detail--primary">'
        '<span class="s-item__shipping s-item__logisticsCost">Free shipping</span></div>'
        f"{seller_info}</div></div></div></li>"
    )


def _s_card(title: str, price: str, seller: str, feedback: str, percent: str, was_price: str | None) -> str:
    strikethrough = (
        '<div class="s-card__attribute-row"><span class="su-styled-text strikethrough secondary large '
        f's-card__price">{was_price}</span></div>'
        if was_price
        else ""
    )
    return (
        '<li class="s-card s-card--horizontal" data-listingid="256012345678">'
        '<div class="su-card-container su-card-container--horizontal"><div class="su-card-container__media">'
        '<img class="s-card__image" src="https://i.ebayimg.com/images/g/x/s-l500.webp" alt=""></div>'
        '<div class="su-card-container__content"><div class="su-card-container__header">'
        '<a class="su-link" href="https://www.ebay.com/itm/256012345678"><div role="heading" aria-level="3" '
        f'class="s-card__title"><span class="su-styled-text primary default">{title}</span></div></a>'
        '<div class="s-card__subtitle-row"><div class="s-card__subtitle">'
        '<span class="su-styled-text secondary default">Brand New</span></div></div></div>'
        '<div class="su-card-container__attributes">'
        f'<div class="su-card-container__attributes__primary">{strikethrough}'
        '<div class="s-card__attribute-row"><span class="su-styled-text primary bold large-1 s-card__price">'
        f"{price}</span></div>"
        '<div class="s-card__attribute-row"><span class="su-styled-text secondary large">Free delivery</span>'
        '</div></div><div class="su-card-container__attributes__secondary">'
        '<div class="s-card__attribute-row">'
        f'<span class="su-styled-text primary large">{seller}</span> '
        f'<span class="su-styled-text primary large">{percent}% positive ({feedback})</span>'
        "</div></div></div></div></div></li>"
    )


def _search_page(query: str, items: str, notice: str = "") -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{query} | eBay</title></head><body>"
        '<div id="srp-river-main" class="srp-main srp-main--isLarge">'
        f'{notice}<div id="srp-river-results" class="srp-river-results clearfix">'
        f'<ul class="srp-results srp-list clearfix">{items}</ul></div></div></body></html>'
    )


def _fewer_words_marker() -> str:
    return (
        '<li class="srp-river-answer srp-river-answer--REWRITE_START"><div class="srp-river-answer__heading">'
        '<h3 class="section-notice__title">Results matching fewer words</h3></div></li>'
    )


def _thousands(feedback: str) -> str:
    count = int(feedback.replace(",", ""))
    return f"{count / 1000:.1f}K" if count >= 1000 else str(count)


EBAY_PAGE_S_ITEM = _search_page(
    EBAY_QUERY_S_ITEM,
    # eBay's hidden template item comes first in this layout.
    _s_item("Shop on eBay", "$20.00", None)
    + "".join(_s_item(*listing) for listing in EBAY_LISTINGS)
    + _fewer_words_marker()
    + _s_item(*EBAY_FEWER_WORDS_LISTING),
)
EBAY_PAGE_S_CARD = _search_page(
    EBAY_QUERY_S_CARD,
    "".join(
        # A was-price shown before the price: taken as the price, it would change that seller's lowest.
        _s_card(title, price, seller, _thousands(feedback), percent, "$149.99" if n == 1 else None)
        for n, (title, price, seller, feedback, percent) in enumerate(EBAY_LISTINGS)
    )
    + _fewer_words_marker()
    + _s_card(*EBAY_FEWER_WORDS_LISTING, None),
)
EBAY_PAGE_NO_RESULTS = _search_page(
    EBAY_QUERY_NO_RESULTS,
    _s_item("Shop on eBay", "$20.00", None),  # the template item is there even when nothing matched
    notice='<div class="srp-save-null-search">'
    '<h3 class="srp-save-null-search__heading">No exact matches found</h3></div>',
)
EBAY_PAGES = {
    EBAY_QUERY_S_ITEM: EBAY_PAGE_S_ITEM,
    EBAY_QUERY_S_CARD: EBAY_PAGE_S_CARD,
    EBAY_QUERY_NO_RESULTS: EBAY_PAGE_NO_RESULTS,
}
