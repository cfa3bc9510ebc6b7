"""OxylabsProvider against a local Oxylabs on loopback: what it parses, what it sends, how failures bill."""

from __future__ import annotations

import base64
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from app.providers.base import Product, ProductRef, ProviderFatalError, SellerListing
from app.providers.oxylabs import OxylabsProvider, amount_cents, price_cents
from oxylabs_fake import (
    BESTSELLERS,
    BESTSELLERS_CATEGORY,
    EBAY_FEWER_WORDS_LISTING,
    EBAY_QUERY_NO_RESULTS,
    EBAY_QUERY_S_CARD,
    EBAY_QUERY_S_ITEM,
    EBAY_SELLERS,
    PASSWORD,
    PRODUCTS,
    USERNAME,
    Answer,
    FakeOxylabs,
    serve_fake_oxylabs,
)

AUTHORIZATION = "Basic " + base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
ASIN = "B0C1HX4P2K"


@pytest.fixture(autouse=True)
def clean_tables() -> None:
    """Overrides conftest's truncation: these tests use no database, so none is started for them."""


@pytest.fixture(scope="module")
def oxylabs_server() -> Iterator[FakeOxylabs]:
    with serve_fake_oxylabs() as fake:
        yield fake


@pytest.fixture
def oxylabs(oxylabs_server: FakeOxylabs) -> FakeOxylabs:
    oxylabs_server.reset()
    return oxylabs_server


@pytest.fixture
async def provider(oxylabs: FakeOxylabs) -> AsyncIterator[OxylabsProvider]:
    provider = OxylabsProvider(USERNAME, PASSWORD, base_url=oxylabs.base_url, timeout_s=5.0)
    yield provider
    await provider.aclose()


def expected_sellers() -> list[SellerListing]:
    return [SellerListing(seller, count, cents) for seller, (count, cents) in EBAY_SELLERS.items()]


def only_payload(oxylabs: FakeOxylabs) -> Any:
    assert len(oxylabs.requests) == 1
    return oxylabs.requests[0].payload


class TestBestsellers:
    async def test_lists_the_asins_and_titles_in_rank_order(self, provider: OxylabsProvider) -> None:
        result = await provider.bestsellers(BESTSELLERS_CATEGORY)

        assert result.ok and result.error is None
        assert (result.status_code, result.charged) == (200, True)
        assert result.value == [ProductRef(asin=item["asin"], title=item["title"]) for item in BESTSELLERS]

    async def test_sends_the_documented_payload_with_basic_auth(
        self, provider: OxylabsProvider, oxylabs: FakeOxylabs
    ) -> None:
        await provider.bestsellers(BESTSELLERS_CATEGORY)

        [request] = oxylabs.requests
        assert (request.method, request.path) == ("POST", "/v1/queries")
        assert request.authorization == AUTHORIZATION
        assert request.credentials == (USERNAME, PASSWORD)
        assert request.payload == {
            "source": "amazon_bestsellers",
            "domain": "com",
            "query": BESTSELLERS_CATEGORY,
            "render": "html",
            "parse": True,
        }

    async def test_a_page_listing_no_product_is_a_charged_failure(
        self, provider: OxylabsProvider, oxylabs: FakeOxylabs
    ) -> None:
        oxylabs.script(BESTSELLERS_CATEGORY, Answer(content={"results": [], "parse_status_code": 12002}))

        result = await provider.bestsellers(BESTSELLERS_CATEGORY)

        assert (result.value, result.status_code, result.charged) == (None, 200, True)
        assert result.error is not None and "no product" in result.error and "12002" in result.error

    async def test_content_that_is_not_the_parsed_page_is_a_charged_failure(
        self, provider: OxylabsProvider, oxylabs: FakeOxylabs
    ) -> None:
        oxylabs.script(BESTSELLERS_CATEGORY, Answer(content="<html><body>Best Sellers</body></html>"))

        result = await provider.bestsellers(BESTSELLERS_CATEGORY)

        assert (result.value, result.status_code, result.charged) == (None, 200, True)
        assert result.error is not None and "not a parsed best-sellers page" in result.error


class TestProduct:
    async def test_reads_title_price_in_cents_and_brand(self, provider: OxylabsProvider) -> None:
        result = await provider.product(ASIN)

        assert (result.status_code, result.charged, result.error) == (200, True, None)
        assert result.value == Product(
            asin=ASIN,
            title="Northwind Studio Over-Ear Wireless Headphones, 40h Battery, Black",
            price_cents=12999,
            brand="Northwind",
        )

    @pytest.mark.parametrize(
        ("asin", "cents"),
        [("B0C1HX4P2K", 12999), ("B09QW2V7LM", 435), ("B0BT7N8S9D", 129900)],
        ids=["129.99", "4.35", "1299.0"],
    )
    async def test_prices_are_exact_in_cents(self, provider: OxylabsProvider, asin: str, cents: int) -> None:
        result = await provider.product(asin)

        assert result.value is not None and result.value.price_cents == cents

    async def test_an_unread_price_is_unknown_and_the_manufacturer_stands_for_a_missing_brand(
        self, provider: OxylabsProvider
    ) -> None:
        # Oxylabs' own example of a price it could not read: price 0, price_buybox -1, a warning.
        result = await provider.product("B08ZJ1TQ3R")

        assert result.value == Product(
            asin="B08ZJ1TQ3R",
            title=PRODUCTS["B08ZJ1TQ3R"]["title"],
            price_cents=None,
            brand="Fabrikam",
        )
        assert result.charged

    async def test_sends_the_documented_payload(
        self, provider: OxylabsProvider, oxylabs: FakeOxylabs
    ) -> None:
        await provider.product(ASIN)

        assert oxylabs.requests[0].credentials == (USERNAME, PASSWORD)
        assert only_payload(oxylabs) == {
            "source": "amazon_product",
            "domain": "com",
            "query": ASIN,
            "parse": True,
            "context": [{"key": "autoselect_variant", "value": True}],
        }

    async def test_a_page_without_title_is_a_charged_failure(
        self, provider: OxylabsProvider, oxylabs: FakeOxylabs
    ) -> None:
        oxylabs.script(
            ASIN, Answer(content={"asin": ASIN, "title": " ", "price": 12.5, "parse_status_code": 12002})
        )

        result = await provider.product(ASIN)

        assert (result.value, result.status_code, result.charged) == (None, 200, True)
        assert result.error is not None and "no title" in result.error and "12002" in result.error


class TestEbaySearch:
    @pytest.mark.parametrize("query", [EBAY_QUERY_S_ITEM, EBAY_QUERY_S_CARD], ids=["s-item", "s-card"])
    async def test_groups_listings_by_seller_with_their_lowest_price(
        self, provider: OxylabsProvider, query: str
    ) -> None:
        result = await provider.ebay_search(query)

        assert (result.status_code, result.charged, result.error) == (200, True, None)
        # The hidden "Shop on eBay" item and the listing after "Results matching fewer words" are not counted.
        assert result.value == expected_sellers()
        assert EBAY_FEWER_WORDS_LISTING[2] not in {listing.seller for listing in result.value}

    async def test_a_search_that_found_nothing_has_no_sellers(self, provider: OxylabsProvider) -> None:
        result = await provider.ebay_search(EBAY_QUERY_NO_RESULTS)

        assert (result.value, result.status_code, result.charged) == ([], 200, True)

    async def test_sends_the_title_as_query_and_asks_for_html(
        self, provider: OxylabsProvider, oxylabs: FakeOxylabs
    ) -> None:
        await provider.ebay_search(EBAY_QUERY_S_ITEM)

        assert oxylabs.requests[0].credentials == (USERNAME, PASSWORD)
        # ebay_search has no dedicated parser: no `parse`.
        assert only_payload(oxylabs) == {"source": "ebay_search", "domain": "com", "query": EBAY_QUERY_S_ITEM}

    async def test_a_page_that_is_not_a_search_page_is_a_charged_failure(
        self, provider: OxylabsProvider, oxylabs: FakeOxylabs
    ) -> None:
        oxylabs.script("sofa", Answer(content="<html><body><h1>Checking your browser</h1></body></html>"))

        result = await provider.ebay_search("sofa")

        assert (result.value, result.status_code, result.charged) == (None, 200, True)
        assert result.error is not None and "no eBay search results" in result.error

    async def test_listings_that_show_no_seller_are_a_charged_failure(
        self, provider: OxylabsProvider, oxylabs: FakeOxylabs
    ) -> None:
        page = (
            '<html><body><ul class="srp-results"><li class="s-item"><div class="s-item__title">'
            '<span role="heading">A sofa</span></div><span class="s-item__price">$300.00</span></li></ul>'
            "</body></html>"
        )
        oxylabs.script("sofa", Answer(content=page))

        result = await provider.ebay_search("sofa")

        assert (result.value, result.charged) == (None, True)
        assert result.error is not None and "1 listings, none showing its seller" in result.error


class TestBilling:
    @pytest.mark.parametrize(
        ("target_status", "charged"),
        [(404, True), (612, False), (503, False), (429, False)],
    )
    async def test_a_failed_target_bills_as_oxylabs_does(
        self, provider: OxylabsProvider, oxylabs: FakeOxylabs, target_status: int, charged: bool
    ) -> None:
        oxylabs.script(ASIN, Answer(target_status=target_status))

        result = await provider.product(ASIN)

        assert (result.value, result.status_code, result.charged) == (None, target_status, charged)
        assert result.error == f"the target answered {target_status}"

    @pytest.mark.parametrize("http_status", [429, 500, 524, 400])
    async def test_an_error_of_the_api_itself_is_free(
        self, provider: OxylabsProvider, oxylabs: FakeOxylabs, http_status: int
    ) -> None:
        oxylabs.script(ASIN, Answer(http_status=http_status))

        result = await provider.product(ASIN)

        assert (result.value, result.status_code, result.charged) == (None, http_status, False)
        assert result.error is not None and result.error.startswith(f"Oxylabs answered HTTP {http_status}")

    @pytest.mark.parametrize("http_status", [401, 403])
    async def test_refused_credentials_are_fatal(
        self, provider: OxylabsProvider, oxylabs: FakeOxylabs, http_status: int
    ) -> None:
        oxylabs.script(BESTSELLERS_CATEGORY, Answer(http_status=http_status))

        with pytest.raises(ProviderFatalError) as raised:
            await provider.bestsellers(BESTSELLERS_CATEGORY)

        assert str(raised.value) == f"Oxylabs rejected the credentials (HTTP {http_status})"

    async def test_a_wrong_password_is_fatal_and_never_shown(
        self, oxylabs: FakeOxylabs, caplog: pytest.LogCaptureFixture
    ) -> None:
        wrong = "Wr0ng-pa55word!"
        provider = OxylabsProvider(USERNAME, wrong, base_url=oxylabs.base_url, timeout_s=5.0)
        caplog.set_level(logging.DEBUG)
        try:
            with pytest.raises(ProviderFatalError) as raised:
                await provider.ebay_search(EBAY_QUERY_S_ITEM)
        finally:
            await provider.aclose()

        assert oxylabs.requests[0].credentials == (USERNAME, wrong)  # the server did refuse them
        header = base64.b64encode(f"{USERNAME}:{wrong}".encode()).decode()
        for text in (str(raised.value), repr(raised.value), caplog.text, repr(provider)):
            assert wrong not in text and header not in text
        assert str(raised.value) == "Oxylabs rejected the credentials (HTTP 401)"

    async def test_malformed_json_from_the_api_counts_as_charged(
        self, provider: OxylabsProvider, oxylabs: FakeOxylabs
    ) -> None:
        # HTTP 200 means a job may have run and been billed: better over-count the budget than re-buy blindly.
        oxylabs.script(ASIN, Answer(raw_body='{"results": [{"content": {"asin": "B0C1'))

        result = await provider.product(ASIN)

        assert (result.value, result.status_code, result.charged) == (None, 200, True)
        assert result.error is not None and "not JSON" in result.error

    async def test_json_without_results_counts_as_charged(
        self, provider: OxylabsProvider, oxylabs: FakeOxylabs
    ) -> None:
        oxylabs.script(ASIN, Answer(raw_body='{"job": {"status": "done"}}'))

        result = await provider.product(ASIN)

        assert (result.value, result.status_code, result.charged) == (None, 200, True)
        assert result.error is not None and "results[0]" in result.error

    async def test_no_answer_in_time_is_a_free_failure_with_status_0(self, oxylabs: FakeOxylabs) -> None:
        oxylabs.script(ASIN, Answer(delay_s=1.5))
        provider = OxylabsProvider(USERNAME, PASSWORD, base_url=oxylabs.base_url, timeout_s=0.3)
        started = time.monotonic()
        try:
            result = await provider.product(ASIN)
        finally:
            await provider.aclose()

        assert time.monotonic() - started < 1.2
        assert (result.value, result.status_code, result.charged) == (None, 0, False)
        assert result.error is not None and "within 0.3s" in result.error

    async def test_nothing_listening_is_a_free_failure_with_status_0(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed_port = probe.getsockname()[1]
        provider = OxylabsProvider(
            USERNAME, PASSWORD, base_url=f"http://127.0.0.1:{closed_port}", timeout_s=2
        )
        try:
            result = await provider.bestsellers(BESTSELLERS_CATEGORY)
        finally:
            await provider.aclose()

        assert (result.value, result.status_code, result.charged) == (None, 0, False)
        assert result.error is not None and result.error.startswith("could not reach Oxylabs (ConnectError")

    async def test_a_call_is_one_request_the_caller_retries(
        self, provider: OxylabsProvider, oxylabs: FakeOxylabs
    ) -> None:
        oxylabs.script(ASIN, Answer(target_status=612))

        first = await provider.product(ASIN)
        assert not first.ok and not first.charged
        assert len(oxylabs.requests) == 1

        second = await provider.product(ASIN)
        assert second.ok and second.charged
        assert len(oxylabs.requests) == 2

    async def test_failures_never_log_the_credentials(
        self, provider: OxylabsProvider, oxylabs: FakeOxylabs, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        oxylabs.script(ASIN, Answer(http_status=500), Answer(target_status=404), Answer(raw_body="nope"))

        for _ in range(3):
            assert not (await provider.product(ASIN)).ok

        assert "failed" in caplog.text
        assert PASSWORD not in caplog.text and AUTHORIZATION.split()[1] not in caplog.text


class TestDomain:
    async def test_every_source_uses_the_configured_domain(self, oxylabs: FakeOxylabs) -> None:
        provider = OxylabsProvider(USERNAME, PASSWORD, base_url=oxylabs.base_url, domain="co.uk")
        try:
            await provider.bestsellers(BESTSELLERS_CATEGORY)
            await provider.product(ASIN)
            await provider.ebay_search(EBAY_QUERY_S_ITEM)
        finally:
            await provider.aclose()

        assert [request.payload["domain"] for request in oxylabs.requests] == ["co.uk"] * 3


class TestMoney:
    @pytest.mark.parametrize(
        ("text", "cents"),
        [
            ("$129.99", 12999),
            ("$1,089.00", 108900),
            ("$99.99 to $109.99", 9999),
            ("US $4.35", 435),
            ("EUR 12,99", 1299),
            ("1.234,56 €", 123456),
            ("£7", 700),
            ("$1,299", 129900),
            ("Free shipping", None),
            ("$0.00", None),
        ],
    )
    def test_price_text_to_cents(self, text: str, cents: int | None) -> None:
        assert price_cents(text) == cents

    @pytest.mark.parametrize(
        ("value", "cents"),
        [(19.99, 1999), (4.35, 435), (0.1 + 0.2, 30), (1299, 129900), ("$8.50", 850), (0, None), (-1, None)],
    )
    def test_parsed_prices_to_cents_exactly(self, value: Any, cents: int | None) -> None:
        assert amount_cents(value) == cents

    @pytest.mark.parametrize("value", [None, True, float("nan"), float("inf"), [12.5]])
    def test_what_is_not_a_price_is_none(self, value: Any) -> None:
        assert amount_cents(value) is None
