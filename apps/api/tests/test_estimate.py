"""POST /collection/estimate: 500 cents a category, judged against the org's cap and warning threshold."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest

from conftest import Actor, World

CENTS_PER_CATEGORY = 500  # 50 products x (5 c Amazon fetch + 1 eBay search x 5 c)


def categories(n: int) -> list[str]:
    return [f"cat-{i}" for i in range(n)]


async def estimate(client: httpx.AsyncClient, actor: Actor, body: Any) -> httpx.Response:
    return await client.post("/collection/estimate", json=body, headers=actor.headers)


async def set_settings(client: httpx.AsyncClient, actor: Actor, **values: int) -> None:
    response = await client.patch("/collection/settings", json=values, headers=actor.headers)
    assert response.status_code == 200, response.text


async def run_and_event_counts(db: asyncpg.Pool) -> tuple[int, int]:
    runs = await db.fetchval("select count(*) from collection_runs")
    events = await db.fetchval("select count(*) from collection_run_events")
    return runs, events


class TestEstimateCost:
    @pytest.mark.parametrize("n", [1, 2, 3, 7])
    async def test_each_category_costs_500_cents(
        self, client: httpx.AsyncClient, world: World, n: int
    ) -> None:
        admin = await world.admin()
        ids = categories(n)

        response = await estimate(client, admin, {"category_ids": ids})

        assert response.status_code == 200, response.text
        body = response.json()
        assert body["breakdown"] == {c: CENTS_PER_CATEGORY for c in ids}
        assert body["total_cents"] == n * CENTS_PER_CATEGORY
        assert body["total_cents"] == sum(body["breakdown"].values())

    async def test_response_has_every_field(self, client: httpx.AsyncClient, world: World) -> None:
        admin = await world.admin()

        response = await estimate(client, admin, {"category_ids": ["electronics"]})

        assert response.status_code == 200, response.text
        body = response.json()
        contract = {
            "total_cents": 500,
            "breakdown": {"electronics": 500},
            "within_budget": True,
            "budget_cap_cents": 2500,
            "warning_threshold_cents": 2000,
            "exceeds_warning": False,
        }
        assert {name: body.get(name) for name in contract} == contract

    @pytest.mark.parametrize(
        ("n", "within_budget", "exceeds_warning"),
        [
            pytest.param(3, True, False, id="below-threshold"),
            pytest.param(4, True, False, id="exactly-at-threshold"),
            pytest.param(5, True, True, id="exactly-at-cap"),
            pytest.param(6, False, True, id="over-cap"),
        ],
    )
    async def test_defaults_boundaries(
        self, client: httpx.AsyncClient, world: World, n: int, within_budget: bool, exceeds_warning: bool
    ) -> None:
        admin = await world.admin()

        response = await estimate(client, admin, {"category_ids": categories(n)})

        assert response.status_code == 200, response.text
        body = response.json()
        assert body["total_cents"] == n * 500
        assert body["budget_cap_cents"] == 2500
        assert body["warning_threshold_cents"] == 2000
        assert body["within_budget"] is within_budget
        assert body["exceeds_warning"] is exceeds_warning

    async def test_one_cent_over_the_cap_is_not_within_budget(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        admin = await world.admin()
        await set_settings(client, admin, budget_cap_cents=2499)

        response = await estimate(client, admin, {"category_ids": categories(5)})

        assert response.status_code == 200, response.text
        body = response.json()
        assert body["total_cents"] == 2500
        assert body["budget_cap_cents"] == 2499
        assert body["within_budget"] is False

    async def test_one_cent_over_the_threshold_exceeds_the_warning(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        admin = await world.admin()
        await set_settings(client, admin, budget_cap_cents=2499)  # 2499 * 80 // 100 == 1999

        response = await estimate(client, admin, {"category_ids": categories(4)})

        assert response.status_code == 200, response.text
        body = response.json()
        assert body["total_cents"] == 2000
        assert body["warning_threshold_cents"] == 1999
        assert body["exceeds_warning"] is True
        assert body["within_budget"] is True

    @pytest.mark.parametrize(
        ("cap", "percent"),
        [(2500, 80), (2499, 33), (1001, 50), (0, 80), (10_000, 0), (10_000, 100), (7, 99), (10**12, 100)],
    )
    async def test_warning_threshold_is_cap_times_percent_floored(
        self, client: httpx.AsyncClient, world: World, cap: int, percent: int
    ) -> None:
        admin = await world.admin()
        await set_settings(client, admin, budget_cap_cents=cap, soft_warning_percent=percent)

        response = await estimate(client, admin, {"category_ids": ["a"]})

        assert response.status_code == 200, response.text
        body = response.json()
        assert body["budget_cap_cents"] == cap
        assert body["warning_threshold_cents"] == cap * percent // 100
        assert body["within_budget"] is (500 <= cap)
        assert body["exceeds_warning"] is (500 > cap * percent // 100)

    async def test_changed_settings_change_the_estimate(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        admin = await world.admin()
        ids = categories(6)
        before = await estimate(client, admin, {"category_ids": ids})
        assert before.json()["within_budget"] is False

        await set_settings(client, admin, budget_cap_cents=10_000, soft_warning_percent=25)
        after = await estimate(client, admin, {"category_ids": ids})

        assert after.status_code == 200, after.text
        body = after.json()
        assert body["total_cents"] == 3000
        assert body["budget_cap_cents"] == 10_000
        assert body["warning_threshold_cents"] == 2500
        assert body["within_budget"] is True
        assert body["exceeds_warning"] is True

    async def test_estimate_uses_the_callers_org_settings(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        acme = await world.admin("acme")
        globex = await world.admin("globex")
        await set_settings(client, acme, budget_cap_cents=100)

        response = await estimate(client, globex, {"category_ids": ["a"]})

        assert response.status_code == 200, response.text
        assert response.json()["budget_cap_cents"] == 2500
        assert response.json()["within_budget"] is True

    async def test_one_hundred_ids_are_accepted(self, client: httpx.AsyncClient, world: World) -> None:
        admin = await world.admin()
        ids = categories(100)

        response = await estimate(client, admin, {"category_ids": ids})

        assert response.status_code == 200, response.text
        body = response.json()
        assert body["total_cents"] == 50_000 == sum(body["breakdown"].values())
        assert set(body["breakdown"]) == set(ids)
        assert body["within_budget"] is False

    async def test_64_character_ids_are_accepted(self, client: httpx.AsyncClient, world: World) -> None:
        admin = await world.admin()
        ids = ["x" * 64, "é" * 64, "🎧" * 64]

        response = await estimate(client, admin, {"category_ids": ids})

        assert response.status_code == 200, response.text
        assert response.json()["breakdown"] == {c: 500 for c in ids}

    @pytest.mark.parametrize(
        "category_id",
        [
            "électronique",
            "家電",
            "🎧 headphones",
            "Ελληνικά",
            "'; drop table collection_runs; --",
            "Robert'); DELETE FROM collection_settings;--",
            'a"b',
            "100% _wild_ %",
            "back\\slash",
            " padded ",
            "$1",
        ],
    )
    async def test_unusual_ids_are_echoed_verbatim(
        self, client: httpx.AsyncClient, world: World, db, category_id: str
    ) -> None:
        admin = await world.admin()

        response = await estimate(client, admin, {"category_ids": [category_id, "plain"]})

        assert response.status_code == 200, response.text
        assert response.json()["breakdown"] == {category_id: 500, "plain": 500}
        assert await db.fetchval("select count(*) from collection_settings") == 1

    async def test_estimating_writes_no_run(self, client: httpx.AsyncClient, world: World, db) -> None:
        admin = await world.admin()

        response = await estimate(client, admin, {"category_ids": categories(3)})

        assert response.status_code == 200, response.text
        assert await run_and_event_counts(db) == (0, 0)


class TestEstimateValidation:
    @pytest.mark.parametrize(
        "body",
        [
            pytest.param({"category_ids": []}, id="empty-list"),
            pytest.param({"category_ids": categories(101)}, id="101-ids"),
            pytest.param({"category_ids": [""]}, id="empty-string-id"),
            pytest.param({"category_ids": ["a", ""]}, id="one-empty-string-id"),
            pytest.param({"category_ids": ["x" * 65]}, id="65-char-id"),
            pytest.param({"category_ids": ["é" * 65]}, id="65-char-unicode-id"),
            pytest.param({"category_ids": ["a", "b", "a"]}, id="duplicate-ids"),
            pytest.param({"category_ids": ["a\nb"]}, id="newline"),
            pytest.param({"category_ids": ["a\tb"]}, id="tab"),
            pytest.param({"category_ids": ["a\x00b"]}, id="nul"),
            pytest.param({"category_ids": ["a\x1bb"]}, id="escape"),
            pytest.param({"category_ids": ["a\x7fb"]}, id="delete"),
            pytest.param({"category_ids": ["a\x85b"]}, id="c1-next-line"),
            pytest.param({"category_ids": ["a\x9fb"]}, id="c1-application-command"),
            pytest.param({"category_ids": "electronics"}, id="string-not-list"),
            pytest.param({"category_ids": {"electronics": 1}}, id="object-not-list"),
            pytest.param({"category_ids": None}, id="null-not-list"),
            pytest.param({"category_ids": 5}, id="number-not-list"),
            pytest.param({"category_ids": [5]}, id="number-id"),
            pytest.param({"category_ids": [None]}, id="null-id"),
            pytest.param({"category_ids": [["a"]]}, id="nested-list-id"),
            pytest.param({}, id="missing-field"),
            pytest.param(["electronics"], id="bare-list-body"),
            pytest.param(None, id="null-body"),
            pytest.param({"category_ids": ["a"], "budget_cap_cents": 1}, id="unknown-field"),
        ],
    )
    async def test_invalid_request_is_422(
        self, client: httpx.AsyncClient, world: World, db, body: Any
    ) -> None:
        admin = await world.admin()

        response = await estimate(client, admin, body)

        assert response.status_code == 422, response.text
        assert response.json()["error"] == "validation_error"
        assert await run_and_event_counts(db) == (0, 0)

    async def test_whitespace_only_id_is_refused(self, client: httpx.AsyncClient, world: World) -> None:
        admin = await world.admin()

        response = await estimate(client, admin, {"category_ids": ["   "]})

        assert response.status_code == 422, response.text
