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

For many processes sharing one account (test_fleet.py, benchmarks/bench_fleet.py), the fake can act as
the account does (Usage and billing > Rate limits), all off until configured:

    fake.configure(jobs_per_s=20, rendered_jobs_per_s=5, latency_s=(0.04, 0.08))

- an account-wide limit over any trailing second: a request past `jobs_per_s` jobs accepted in the last
  second (or past `rendered_jobs_per_s` rendered ones, payload `render`) gets HTTP 429 "Too many
  requests" and is no job; every answer then carries `x-ratelimit-total-jobs-limit/-remaining` and
  `x-ratelimit-render-jobs-limit/-remaining` (`rate_limit_headers=False` leaves them out);
- a latency per accepted request, uniform in `latency_s`, so that calls overlap as real ones do;
- a generated catalogue: any category but BESTSELLERS_CATEGORY lists `products_per_category` products
  (ASINs derived from the category id, distinct across categories), with product pages and eBay
  pages for them (`fake.catalogue(category)`);
- `fake.calls`: every request the account saw (arrival time, source, query, accepted or refused),
  and `fake.category_of(call)` to map one back to its category through the generated catalogue.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import random
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
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


ACCEPTED = "accepted"
REFUSED = "refused"  # past the account's rate: HTTP 429, no job

# The names of the account's limits in the x-ratelimit-<name>-limit headers (the app maps a name with
# "render" in it to its rendered limit, any other to the account's).
TOTAL_LIMIT_NAME = "total-jobs"
RENDER_LIMIT_NAME = "render-jobs"


@dataclass(frozen=True)
class Call:
    """One request as the account saw it: when it arrived (`time.monotonic()` of the test's process),
    what it asked for, and whether the account's rate let it through."""

    at: float
    source: str
    query: str
    rendered: bool
    outcome: str  # ACCEPTED or REFUSED

    @property
    def accepted(self) -> bool:
        return self.outcome == ACCEPTED


@dataclass
class AccountLimits:
    """The account's limits and how its requests are served (see `FakeOxylabs.configure`)."""

    jobs_per_s: int | None = None
    rendered_jobs_per_s: int | None = None
    rate_limit_headers: bool = True
    latency_s: tuple[float, float] = (0.0, 0.0)
    products_per_category: int = 30


class _TrailingSecond:
    """The jobs accepted over the last second, to refuse one past the limit as the account does."""

    def __init__(self) -> None:
        self._times: deque[float] = deque()

    def count(self, now: float) -> int:
        while self._times and self._times[0] <= now - 1.0:
            self._times.popleft()
        return len(self._times)

    def add(self, now: float) -> None:
        self._times.append(now)


@dataclass
class FakeOxylabs:
    username: str = USERNAME
    password: str = PASSWORD
    base_url: str = ""
    limits: AccountLimits = field(default_factory=AccountLimits)
    _scripts: defaultdict[str, deque[Answer]] = field(default_factory=lambda: defaultdict(deque))
    _requests: list[ReceivedRequest] = field(default_factory=list)
    _calls: list[Call] = field(default_factory=list)
    _all_jobs: _TrailingSecond = field(default_factory=_TrailingSecond)
    _rendered_jobs: _TrailingSecond = field(default_factory=_TrailingSecond)
    _catalogue: dict[str, list[str]] = field(default_factory=dict)  # category -> its ASINs
    _category_of_asin: dict[str, str] = field(default_factory=dict)
    _rng: random.Random = field(default_factory=lambda: random.Random(20261202))
    # The server runs on its own thread and event loop; tests read and script from theirs.
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def configure(
        self,
        *,
        jobs_per_s: int | None = None,
        rendered_jobs_per_s: int | None = None,
        rate_limit_headers: bool = True,
        latency_s: tuple[float, float] = (0.0, 0.0),
        products_per_category: int = 30,
    ) -> None:
        """The account's limits (None: none), the latency of each accepted request (uniform between
        the two bounds) and the size of the generated catalogue's categories."""
        assert products_per_category >= 1 and 0 <= latency_s[0] <= latency_s[1]
        with self._lock:
            self.limits = AccountLimits(
                jobs_per_s, rendered_jobs_per_s, rate_limit_headers, latency_s, products_per_category
            )
            self._catalogue.clear()
            self._category_of_asin.clear()

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def catalogue(self, category_id: str) -> list[str]:
        """The ASINs a generated best-sellers page lists for `category_id`, always the same."""
        with self._lock:
            return list(self._generated(category_id))

    def category_of(self, call: Call) -> str | None:
        """The category a call was made for (through the generated catalogue; None: not one of it)."""
        if call.source == "amazon_bestsellers":
            return call.query
        # An eBay query is built from the product's title, which ends with its ASIN.
        asin = call.query if call.source == "amazon_product" else call.query.rsplit(" ", 1)[-1]
        with self._lock:
            return self._category_of_asin.get(asin)

    def _generated(self, category_id: str) -> list[str]:
        """(Under the lock.) A category's ASINs, derived from its id; registered so that every ASIN
        belongs to one category only."""
        asins = self._catalogue.get(category_id)
        if asins is None:
            asins = [generated_asin(category_id, i) for i in range(self.limits.products_per_category)]
            clash = [a for a in asins if self._category_of_asin.get(a, category_id) != category_id]
            assert not clash, f"generated ASINs {clash} of {category_id!r} belong to another category"
            self._catalogue[category_id] = asins
            self._category_of_asin.update(dict.fromkeys(asins, category_id))
        return asins

    def _admit(self, source: str, query: str, rendered: bool) -> tuple[bool, dict[str, str]]:
        """Whether the account's rate lets this request through now (counted as a job if so), and the
        x-ratelimit headers of its answer."""
        now = time.monotonic()
        with self._lock:
            limits = self.limits
            total, render = self._all_jobs.count(now), self._rendered_jobs.count(now)
            accepted = (limits.jobs_per_s is None or total < limits.jobs_per_s) and (
                not rendered or limits.rendered_jobs_per_s is None or render < limits.rendered_jobs_per_s
            )
            if accepted:
                self._all_jobs.add(now)
                total += 1
                if rendered:
                    self._rendered_jobs.add(now)
                    render += 1
            self._calls.append(Call(now, source, query, rendered, ACCEPTED if accepted else REFUSED))
        headers: dict[str, str] = {}
        if limits.rate_limit_headers:
            for name, limit, used in (
                (TOTAL_LIMIT_NAME, limits.jobs_per_s, total),
                (RENDER_LIMIT_NAME, limits.rendered_jobs_per_s, render),
            ):
                if limit is not None:
                    headers[f"x-ratelimit-{name}-limit"] = str(limit)
                    headers[f"x-ratelimit-{name}-remaining"] = str(max(0, limit - used))
        return accepted, headers

    def _latency(self) -> float:
        low, high = self.limits.latency_s
        with self._lock:
            return self._rng.uniform(low, high) if high > 0 else 0.0

    def _canned(self, source: str, query: str) -> Any:
        """The content of a successful answer: the generated catalogue's, else the canned pages."""
        if source == "amazon_bestsellers" and query != BESTSELLERS_CATEGORY:
            with self._lock:
                asins = self._generated(query)
            return generated_bestsellers_content(query, asins)
        asin = query if source == "amazon_product" else query.rsplit(" ", 1)[-1]
        with self._lock:
            generated = source != "amazon_bestsellers" and asin in self._category_of_asin
        if not generated:
            return canned_content(source, query)
        return generated_product_content(asin) if source == "amazon_product" else generated_ebay_page(query)

    def script(self, query: str, *answers: Answer) -> None:
        """Queue answers for a query; each request for it takes the next one, then the default `Answer()`."""
        with self._lock:
            self._scripts[query].extend(answers)

    @property
    def requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        """Forget scripts, requests and calls, and serve as an unlimited account with no latency."""
        self.configure()
        with self._lock:
            self._scripts.clear()
            self._requests.clear()
            self._calls.clear()
            self._all_jobs = _TrailingSecond()
            self._rendered_jobs = _TrailingSecond()

    def _record(self, received: ReceivedRequest) -> None:
        with self._lock:
            self._requests.append(received)

    def _next_answer(self, query: str) -> Answer:
        with self._lock:
            queued = self._scripts.get(query)
            return queued.popleft() if queued else Answer()

    def _authorized(self, received: ReceivedRequest) -> bool:
        return received.credentials == (self.username, self.password)


# --- Reading the account's traffic (fake.calls) -------------------------------------------------------------


def busiest_second(calls: Sequence[Call]) -> int:
    """The most requests (accepted or refused) that arrived within any one second."""
    times = sorted(call.at for call in calls)
    most, first = 0, 0
    for last, at in enumerate(times):
        while times[first] <= at - 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def accepted_rate(calls: Sequence[Call], start: float, end: float) -> float:
    """Accepted calls a second between `start` and `end` (arrival times)."""
    if end <= start:
        return 0.0
    return sum(1 for call in calls if call.accepted and start <= call.at < end) / (end - start)


@dataclass(frozen=True)
class Contention:
    """While every group had calls (from the last group's first call to the first group's last call):
    each group's accepted calls."""

    start: float
    end: float
    calls: dict[str, int]

    @property
    def fairness(self) -> float:
        """The least served group's calls over the busiest group's (1: equal; 0: some group's work
        ended before another's began)."""
        if self.end <= self.start:
            return 0.0
        return min(self.calls.values()) / max(max(self.calls.values()), 1)

    def shares(self) -> dict[str, float]:
        total = max(sum(self.calls.values()), 1)
        return {group: count / total for group, count in sorted(self.calls.items())}


def contention(
    calls: Sequence[Call],
    group_of: Callable[[Call], str | None],
    working: Callable[[Call], bool] = lambda call: True,
) -> Contention:
    """Each group's accepted calls while every group had work: a group has work from its first call
    that `working` accepts (e.g. its first item, once a discovery has listed some) to its last call."""
    spans: dict[str, list[float]] = {}
    for call in calls:
        group = group_of(call)
        if group is not None and (group in spans or working(call)):
            spans.setdefault(group, []).append(call.at)
    start = max(min(times) for times in spans.values())
    end = min(max(times) for times in spans.values())
    counts = dict.fromkeys(spans, 0)
    for call in calls:
        group = group_of(call)
        if group is not None and call.accepted and start <= call.at <= end:
            counts[group] += 1
    return Contention(start, end, counts)


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
        accepted, headers = fake._admit(source, query, rendered=bool(payload.get("render")))
        if not accepted:
            return JSONResponse({"message": API_MESSAGES[429]}, status_code=429, headers=headers)
        answer = fake._next_answer(query)
        delay = answer.delay_s + fake._latency()
        if delay:
            await asyncio.sleep(delay)
        if answer.raw_body is not None:
            return Response(
                answer.raw_body,
                status_code=answer.http_status,
                media_type="application/json",
                headers=headers,
            )
        if answer.http_status != 200:
            message = API_MESSAGES.get(answer.http_status, "Error")
            return JSONResponse({"message": message}, status_code=answer.http_status, headers=headers)
        content = answer.content
        if content is CANNED:
            content = fake._canned(source, query) if 200 <= answer.target_status < 300 else ""
        return JSONResponse(envelope(source, query, answer.target_status, content), headers=headers)

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


# --- The generated catalogue (categories other than BESTSELLERS_CATEGORY) ----------------------------------

GENERATED_BRANDS = ("Northwind", "Contoso", "Fabrikam", "Tailspin", "Litware", "Proseware", "Adatum")
GENERATED_KINDS = ("Headphones", "Earbuds", "Speaker", "Soundbar", "Turntable", "Amplifier")
GENERATED_SELLERS = ("audio_outlet_usa", "gadget.depot-22", "kw_electronics", "soundhouse", "hifi_corner")


def _digest(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("|".join(parts).encode(), digest_size=8).digest(), "big")


def generated_asin(category_id: str, index: int) -> str:
    return f"B{_digest('asin', category_id, str(index)) % 16**9:09X}"


def generated_title(asin: str) -> str:
    """A product's title; it ends with the ASIN, so an eBay query built from it names its product."""
    seed = _digest("title", asin)
    brand = GENERATED_BRANDS[seed % len(GENERATED_BRANDS)]
    return f"{brand} {GENERATED_KINDS[seed // 7 % len(GENERATED_KINDS)]} {asin}"


def generated_bestsellers_content(category_id: str, asins: list[str]) -> dict[str, Any]:
    content = bestsellers_content(category_id)
    content["results"] = [
        {
            "pos": pos,
            "url": f"/dp/{asin}/ref=zg_bs_{category_id}_{pos}?psc=1",
            "asin": asin,
            "price": 10 + _digest("price", asin) % 400,
            "title": generated_title(asin),
            "rating": 4.2,
            "currency": "USD",
            "is_prime": pos % 2 == 1,
            "price_str": "",
            "price_upper": 0,
            "ratings_count": _digest("ratings", asin) % 5000,
        }
        for pos, asin in enumerate(asins, start=1)
    ]
    return content


def generated_product_content(asin: str) -> dict[str, Any]:
    price = round(10 + _digest("price", asin) % 40_000 / 100, 2)
    brand = generated_title(asin).split(" ", 1)[0]
    return product_content(asin, generated_title(asin), price, brand=brand, price_buybox=price)


def generated_ebay_page(query: str) -> str:
    seed = _digest("ebay", query)
    listings = [
        (
            f"{query} listing {n + 1}",
            f"${20 + (seed >> (8 * n)) % 300}.{n}9",
            GENERATED_SELLERS[(seed >> (4 * n)) % len(GENERATED_SELLERS)],
            f"{1 + (seed >> n) % 9000:,}",
            "99.1",
        )
        for n in range(1 + seed % 3)
    ]
    return _search_page(query, "".join(_s_item(*listing) for listing in listings))
