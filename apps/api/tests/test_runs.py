"""POST /collection/runs, GET /collection/runs and GET /collection/runs/{id}."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from conftest import Actor, World, create_run

RUN_FIELDS = {
    "id",
    "name",
    "status",
    "estimated_cost_cents",
    "actual_cost_cents",
    "budget_cap_cents",
    "total_items",
    "processed_items",
    "failed_items",
    "category_ids",
    "started_at",
    "completed_at",
    "paused_at",
    "created_by",
    "created_at",
}


def categories(n: int) -> list[str]:
    return [f"cat-{i}" for i in range(n)]


def parse_time(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    assert moment.tzinfo is not None, f"{value!r} has no time zone"
    return moment


async def post_run(client: httpx.AsyncClient, actor: Actor, body: Any) -> httpx.Response:
    return await client.post("/collection/runs", json=body, headers=actor.headers)


async def set_settings(client: httpx.AsyncClient, actor: Actor, **values: int) -> None:
    response = await client.patch("/collection/settings", json=values, headers=actor.headers)
    assert response.status_code == 200, response.text


async def run_count(db: asyncpg.Pool, actor: Actor | None = None) -> int:
    if actor is None:
        count: int = await db.fetchval("select count(*) from collection_runs")
    else:
        count = await db.fetchval("select count(*) from collection_runs where org_id = $1", actor.org_id)
    return count


async def set_status(db: asyncpg.Pool, run_id: str, status: str) -> None:
    """Put a run where the API cannot (completed, failed), as the executor would."""
    await db.execute(
        "update collection_runs set status = $2, paused_at = null, "
        "completed_at = case when $2 in ('completed', 'failed', 'cancelled') then now() end "
        "where id = $1",
        uuid.UUID(run_id),
        status,
    )


class TestCreateRun:
    async def test_created_run_has_every_field(self, client: httpx.AsyncClient, world: World, db) -> None:
        admin = await world.admin()
        before = datetime.now(UTC)

        response = await post_run(client, admin, {"name": "Spring sweep", "category_ids": ["a", "b", "c"]})

        after = datetime.now(UTC)
        assert response.status_code == 201, response.text
        run = response.json()
        assert set(run) >= RUN_FIELDS
        assert uuid.UUID(run["id"]).version == 4
        assert run["name"] == "Spring sweep"
        assert run["status"] == "pending"
        assert run["estimated_cost_cents"] == 1500
        assert run["actual_cost_cents"] == 0
        assert run["budget_cap_cents"] == 2500
        assert run["total_items"] == 150
        assert run["processed_items"] == 0
        assert run["failed_items"] == 0
        assert run["category_ids"] == ["a", "b", "c"]
        assert run["started_at"] is None
        assert run["completed_at"] is None
        assert run["paused_at"] is None
        assert run["created_by"] == str(admin.user_id)
        assert before <= parse_time(run["created_at"]) <= after

        row = await db.fetchrow("select * from collection_runs where id = $1", uuid.UUID(run["id"]))
        assert row is not None
        assert row["org_id"] == admin.org_id
        assert row["name"] == "Spring sweep"
        assert row["status"] == "pending"
        assert row["estimated_cost_cents"] == 1500
        assert row["budget_cap_cents"] == 2500
        assert row["total_items"] == 150
        assert row["category_ids"] == ["a", "b", "c"]
        assert row["created_by"] == admin.user_id
        assert row["created_at"] == parse_time(run["created_at"])

    @pytest.mark.parametrize("n", [1, 4, 5])
    async def test_estimate_and_items_follow_the_categories(
        self, client: httpx.AsyncClient, world: World, db, n: int
    ) -> None:
        admin = await world.admin()

        run = await create_run(client, admin, categories(n))

        assert run["estimated_cost_cents"] == 500 * n
        assert run["total_items"] == 50 * n
        row = await db.fetchrow(
            "select estimated_cost_cents, total_items from collection_runs where id = $1",
            uuid.UUID(run["id"]),
        )
        assert dict(row) == {"estimated_cost_cents": 500 * n, "total_items": 50 * n}

    async def test_estimate_matches_the_estimate_endpoint(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        admin = await world.admin()
        ids = ["electronics", "toys", "garden"]

        estimate = await client.post(
            "/collection/estimate", json={"category_ids": ids}, headers=admin.headers
        )
        run = await create_run(client, admin, ids)

        assert run["estimated_cost_cents"] == estimate.json()["total_cents"]
        assert run["budget_cap_cents"] == estimate.json()["budget_cap_cents"]

    async def test_budget_cap_is_a_snapshot(self, client: httpx.AsyncClient, world: World, db) -> None:
        admin = await world.admin()
        await set_settings(client, admin, budget_cap_cents=10_000)
        run = await create_run(client, admin, ["a"])
        assert run["budget_cap_cents"] == 10_000

        await set_settings(client, admin, budget_cap_cents=700)

        fetched = await client.get(f"/collection/runs/{run['id']}", headers=admin.headers)
        assert fetched.json()["budget_cap_cents"] == 10_000
        stored = await db.fetchval(
            "select budget_cap_cents from collection_runs where id = $1", uuid.UUID(run["id"])
        )
        assert stored == 10_000

    @pytest.mark.parametrize(
        "body",
        [
            pytest.param({}, id="absent"),
            pytest.param({"name": None}, id="null"),
            pytest.param({"name": ""}, id="empty"),
            pytest.param({"name": "   "}, id="spaces"),
            pytest.param({"name": " \t\n "}, id="mixed-whitespace"),
        ],
    )
    async def test_blank_name_becomes_collection_and_utc_minute(
        self, client: httpx.AsyncClient, world: World, db, body: dict[str, Any]
    ) -> None:
        admin = await world.admin()
        before = datetime.now(UTC).replace(second=0, microsecond=0)

        response = await post_run(client, admin, {**body, "category_ids": ["a"]})

        after = datetime.now(UTC)
        assert response.status_code == 201, response.text
        name = response.json()["name"]
        assert name.startswith("Collection ")
        named_minute = datetime.strptime(name, "Collection %Y-%m-%d %H:%M").replace(tzinfo=UTC)
        assert before <= named_minute <= after
        stored = await db.fetchval(
            "select name from collection_runs where id = $1", uuid.UUID(response.json()["id"])
        )
        assert stored == name

    @pytest.mark.parametrize(
        "name",
        [
            "Weekly électronique sweep",
            "家電 🎧 run",
            'It\'s a "quoted" name',
            "'; drop table collection_runs; --",
            "Robert'); DELETE FROM collection_settings;--",
            "100% of $1 and \\back",
            "x" * 200,
            "🎧" * 200,
            "Collection 2020-01-01 00:00",
        ],
    )
    async def test_given_name_is_kept_verbatim(
        self, client: httpx.AsyncClient, world: World, db, name: str
    ) -> None:
        admin = await world.admin()

        response = await post_run(client, admin, {"name": name, "category_ids": ["a"]})

        assert response.status_code == 201, response.text
        assert response.json()["name"] == name
        stored = await db.fetchval(
            "select name from collection_runs where id = $1", uuid.UUID(response.json()["id"])
        )
        assert stored == name
        assert await db.fetchval("select count(*) from collection_settings") == 1

    @pytest.mark.parametrize(
        "category_id",
        ["électronique", "家電", "🎧" * 64, "'; drop table collection_runs; --", 'a"b', " padded "],
    )
    async def test_category_ids_are_stored_verbatim(
        self, client: httpx.AsyncClient, world: World, db, category_id: str
    ) -> None:
        admin = await world.admin()

        run = await create_run(client, admin, [category_id, "plain"])

        assert run["category_ids"] == [category_id, "plain"]
        stored = await db.fetchval(
            "select category_ids from collection_runs where id = $1", uuid.UUID(run["id"])
        )
        assert stored == [category_id, "plain"]

    async def test_created_event_is_recorded(self, client: httpx.AsyncClient, world: World, db) -> None:
        admin = await world.admin()

        run = await create_run(client, admin, ["a"])

        events = await db.fetch(
            "select run_id, org_id, from_status, to_status, actor, reason from collection_run_events "
            "where run_id = $1",
            uuid.UUID(run["id"]),
        )
        assert [dict(e) for e in events] == [
            {
                "run_id": uuid.UUID(run["id"]),
                "org_id": admin.org_id,
                "from_status": None,
                "to_status": "pending",
                "actor": admin.user_id,
                "reason": "created",
            }
        ]

    async def test_one_hundred_categories_fit_a_large_enough_cap(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.admin()
        await set_settings(client, admin, budget_cap_cents=50_000)

        run = await create_run(client, admin, categories(100))

        assert run["estimated_cost_cents"] == 50_000
        assert run["total_items"] == 5000
        assert await run_count(db, admin) == 1


class TestCreateRunBudget:
    async def test_over_budget_is_refused_naming_both_amounts(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.admin()

        response = await post_run(client, admin, {"name": "too big", "category_ids": categories(6)})

        assert response.status_code == 400, response.text
        assert response.json() == {
            "detail": "Estimated cost $30.00 exceeds budget cap $25.00",
            "error": "budget_exceeded",
        }
        assert await run_count(db) == 0
        assert await db.fetchval("select count(*) from collection_run_events") == 0

    async def test_exactly_at_the_cap_is_allowed(self, client: httpx.AsyncClient, world: World, db) -> None:
        admin = await world.admin()

        response = await post_run(client, admin, {"category_ids": categories(5)})

        assert response.status_code == 201, response.text
        assert response.json()["estimated_cost_cents"] == 2500 == response.json()["budget_cap_cents"]
        assert await run_count(db, admin) == 1

    async def test_one_cent_over_the_cap_is_refused(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.admin()
        await set_settings(client, admin, budget_cap_cents=2499)

        response = await post_run(client, admin, {"category_ids": categories(5)})

        assert response.status_code == 400, response.text
        assert response.json()["detail"] == "Estimated cost $25.00 exceeds budget cap $24.99"
        assert await run_count(db) == 0

    async def test_zero_cap_refuses_any_run(self, client: httpx.AsyncClient, world: World, db) -> None:
        admin = await world.admin()
        await set_settings(client, admin, budget_cap_cents=0)

        response = await post_run(client, admin, {"category_ids": ["a"]})

        assert response.status_code == 400, response.text
        assert response.json()["detail"] == "Estimated cost $5.00 exceeds budget cap $0.00"
        assert await run_count(db) == 0

    async def test_raised_cap_lets_the_same_run_through(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.admin()
        refused = await post_run(client, admin, {"category_ids": categories(6)})
        assert refused.status_code == 400

        await set_settings(client, admin, budget_cap_cents=3000)
        accepted = await post_run(client, admin, {"category_ids": categories(6)})

        assert accepted.status_code == 201, accepted.text
        assert accepted.json()["budget_cap_cents"] == 3000
        assert await run_count(db) == 1


class TestCreateRunConcurrencyLimit:
    async def test_limit_of_pending_runs_is_refused_with_429(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.admin()
        for _ in range(3):
            await create_run(client, admin, ["a"])

        response = await post_run(client, admin, {"category_ids": ["a"]})

        assert response.status_code == 429, response.text
        assert response.json()["error"] == "concurrent_run_limit"
        assert await run_count(db) == 3
        assert await db.fetchval("select count(*) from collection_run_events") == 3

    async def test_running_and_paused_runs_count(self, client: httpx.AsyncClient, world: World, db) -> None:
        admin = await world.admin()
        await create_run(client, admin, ["a"])  # stays pending
        running = await create_run(client, admin, ["a"])
        paused = await create_run(client, admin, ["a"])
        for path in (f"{running['id']}/start", f"{paused['id']}/start", f"{paused['id']}/pause"):
            moved = await client.post(f"/collection/runs/{path}", headers=admin.headers)
            assert moved.status_code == 200, moved.text
        statuses = await db.fetch("select status from collection_runs order by status")
        assert [r["status"] for r in statuses] == ["paused", "pending", "running"]

        response = await post_run(client, admin, {"category_ids": ["a"]})

        assert response.status_code == 429, response.text
        assert await run_count(db) == 3

    @pytest.mark.parametrize("finished", ["completed", "failed", "cancelled"])
    async def test_finished_runs_do_not_count(
        self, client: httpx.AsyncClient, world: World, db, finished: str
    ) -> None:
        admin = await world.admin()
        runs = [await create_run(client, admin, ["a"]) for _ in range(3)]
        await set_status(db, runs[0]["id"], finished)

        response = await post_run(client, admin, {"category_ids": ["a"]})

        assert response.status_code == 201, response.text
        assert await run_count(db) == 4
        again = await post_run(client, admin, {"category_ids": ["a"]})
        assert again.status_code == 429, again.text
        assert await run_count(db) == 4

    async def test_cancelling_through_the_api_frees_a_slot(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.admin()
        runs = [await create_run(client, admin, ["a"]) for _ in range(3)]
        cancelled = await client.post(f"/collection/runs/{runs[1]['id']}/cancel", headers=admin.headers)
        assert cancelled.status_code == 200, cancelled.text

        response = await post_run(client, admin, {"category_ids": ["a"]})

        assert response.status_code == 201, response.text
        assert await run_count(db) == 4

    async def test_limit_follows_the_settings(self, client: httpx.AsyncClient, world: World, db) -> None:
        admin = await world.admin()
        await set_settings(client, admin, max_concurrent_runs=1)
        await create_run(client, admin, ["a"])

        response = await post_run(client, admin, {"category_ids": ["a"]})

        assert response.status_code == 429, response.text
        assert await run_count(db) == 1

    async def test_other_orgs_runs_do_not_count(self, client: httpx.AsyncClient, world: World, db) -> None:
        acme = await world.admin("acme")
        globex = await world.admin("globex")
        for _ in range(3):
            await create_run(client, acme, ["a"])

        response = await post_run(client, globex, {"category_ids": ["a"]})

        assert response.status_code == 201, response.text
        assert await run_count(db, globex) == 1
        assert await run_count(db, acme) == 3


class TestCreateRunValidation:
    @pytest.mark.parametrize(
        "body",
        [
            pytest.param({}, id="no-categories"),
            pytest.param({"name": "x"}, id="name-only"),
            pytest.param({"category_ids": []}, id="empty-list"),
            pytest.param({"category_ids": categories(101)}, id="101-ids"),
            pytest.param({"category_ids": [""]}, id="empty-id"),
            pytest.param({"category_ids": ["x" * 65]}, id="65-char-id"),
            pytest.param({"category_ids": ["a", "a"]}, id="duplicate-ids"),
            pytest.param({"category_ids": ["a\nb"]}, id="control-char-id"),
            pytest.param({"category_ids": ["a\x00b"]}, id="nul-id"),
            pytest.param({"category_ids": ["a\x85b"]}, id="c1-control-char-id"),
            pytest.param({"category_ids": "a"}, id="string-not-list"),
            pytest.param({"category_ids": ["a"], "name": 5}, id="numeric-name"),
            pytest.param({"category_ids": ["a"], "name": "x" * 201}, id="name-too-long"),
            pytest.param({"category_ids": ["a"], "name": "bad\x00name"}, id="nul-in-name"),
            pytest.param({"category_ids": ["a"], "status": "running"}, id="unknown-field"),
            pytest.param({"category_ids": ["a"], "budget_cap_cents": 999_999}, id="cap-in-body"),
            pytest.param(None, id="null-body"),
        ],
    )
    async def test_invalid_request_is_422_and_writes_nothing(
        self, client: httpx.AsyncClient, world: World, db, body: Any
    ) -> None:
        admin = await world.admin()

        response = await post_run(client, admin, body)

        assert response.status_code == 422, response.text
        assert response.json()["error"] == "validation_error"
        assert await run_count(db) == 0


class TestListRuns:
    async def test_newest_first_with_total(self, client: httpx.AsyncClient, world: World) -> None:
        admin = await world.admin()
        created = [await create_run(client, admin, ["a"], name=f"run {i}") for i in range(3)]

        response = await client.get("/collection/runs", headers=admin.headers)

        assert response.status_code == 200, response.text
        body = response.json()
        assert body["total"] == 3
        assert [r["id"] for r in body["runs"]] == [r["id"] for r in reversed(created)]

    async def test_listed_runs_equal_the_single_run_view(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        admin = await world.admin()
        created = await create_run(client, admin, ["a", "b"], name="only")
        await client.post(f"/collection/runs/{created['id']}/start", headers=admin.headers)

        listed = await client.get("/collection/runs", headers=admin.headers)
        single = await client.get(f"/collection/runs/{created['id']}", headers=admin.headers)

        assert listed.status_code == single.status_code == 200
        assert listed.json()["runs"] == [single.json()]
        assert single.json()["status"] == "running"

    async def test_empty_org_lists_nothing(self, client: httpx.AsyncClient, world: World) -> None:
        admin = await world.admin()

        response = await client.get("/collection/runs", headers=admin.headers)

        assert response.status_code == 200, response.text
        assert response.json() == {"runs": [], "total": 0, "total_estimated": False, "next_cursor": None}

    async def test_only_the_callers_org(self, client: httpx.AsyncClient, world: World, db) -> None:
        acme = await world.admin("acme")
        globex = await world.admin("globex")
        mine = await create_run(client, acme, ["a"])
        await create_run(client, globex, ["a"])
        await create_run(client, globex, ["b"])
        assert await run_count(db) == 3

        response = await client.get("/collection/runs", headers=acme.headers)

        assert response.status_code == 200, response.text
        assert response.json()["total"] == 1
        assert [r["id"] for r in response.json()["runs"]] == [mine["id"]]

    async def test_limit_and_offset_page_through_every_run(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.admin()
        await set_settings(client, admin, max_concurrent_runs=10)
        created = [await create_run(client, admin, ["a"]) for _ in range(5)]
        newest_first = [r["id"] for r in reversed(created)]

        pages = []
        for offset in (0, 2, 4):
            response = await client.get(
                "/collection/runs", params={"limit": 2, "offset": offset}, headers=admin.headers
            )
            assert response.status_code == 200, response.text
            assert response.json()["total"] == 5
            pages.append([r["id"] for r in response.json()["runs"]])

        assert [len(p) for p in pages] == [2, 2, 1]
        assert [run_id for page in pages for run_id in page] == newest_first
        stored = await db.fetch("select id from collection_runs order by created_at desc, id desc")
        assert [str(r["id"]) for r in stored] == newest_first

    @pytest.mark.parametrize("limit", [1, 100])
    async def test_limit_bounds_are_accepted(
        self, client: httpx.AsyncClient, world: World, limit: int
    ) -> None:
        admin = await world.admin()
        await create_run(client, admin, ["a"])
        await create_run(client, admin, ["b"])

        response = await client.get("/collection/runs", params={"limit": limit}, headers=admin.headers)

        assert response.status_code == 200, response.text
        assert len(response.json()["runs"]) == min(limit, 2)
        assert response.json()["total"] == 2

    @pytest.mark.parametrize(
        "params",
        [
            {"limit": 0},
            {"limit": 101},
            {"limit": -1},
            {"limit": "ten"},
            {"limit": 1.5},
            {"offset": -1},
            {"offset": "x"},
        ],
    )
    async def test_out_of_range_paging_is_422(
        self, client: httpx.AsyncClient, world: World, params: dict[str, Any]
    ) -> None:
        admin = await world.admin()

        response = await client.get("/collection/runs", params=params, headers=admin.headers)

        assert response.status_code == 422, response.text
        assert response.json()["error"] == "validation_error"

    @pytest.mark.parametrize("offset", [2, 3, 1000])
    async def test_offset_beyond_the_end_is_an_empty_page(
        self, client: httpx.AsyncClient, world: World, offset: int
    ) -> None:
        admin = await world.admin()
        await create_run(client, admin, ["a"])
        await create_run(client, admin, ["b"])

        response = await client.get("/collection/runs", params={"offset": offset}, headers=admin.headers)

        assert response.status_code == 200, response.text
        assert response.json() == {"runs": [], "total": 2, "total_estimated": False, "next_cursor": None}


class TestListRunsByStatus:
    async def test_only_runs_in_that_status_newest_first_and_total_counts_them(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.admin()
        await set_settings(client, admin, max_concurrent_runs=100)
        runs = [await create_run(client, admin, ["a"], name=f"run {i}") for i in range(5)]
        for run in (runs[0], runs[2], runs[3]):
            await client.post(f"/collection/runs/{run['id']}/cancel", headers=admin.headers)

        cancelled = await client.get(
            "/collection/runs", params={"status": "cancelled", "limit": 2}, headers=admin.headers
        )
        pending = await client.get("/collection/runs", params={"status": "pending"}, headers=admin.headers)
        everything = await client.get("/collection/runs", headers=admin.headers)

        assert cancelled.status_code == pending.status_code == everything.status_code == 200
        assert [r["id"] for r in cancelled.json()["runs"]] == [runs[3]["id"], runs[2]["id"]]
        assert cancelled.json()["total"] == 3
        assert [r["id"] for r in pending.json()["runs"]] == [runs[4]["id"], runs[1]["id"]]
        assert pending.json()["total"] == 2
        assert everything.json()["total"] == 5

    async def test_a_status_with_no_runs_is_an_empty_page(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        admin = await world.admin()
        await create_run(client, admin, ["a"])

        response = await client.get("/collection/runs", params={"status": "running"}, headers=admin.headers)

        assert response.status_code == 200, response.text
        assert response.json() == {"runs": [], "total": 0, "total_estimated": False, "next_cursor": None}

    async def test_only_the_callers_org(self, client: httpx.AsyncClient, world: World) -> None:
        acme = await world.admin("acme")
        globex = await world.admin("globex")
        await create_run(client, globex, ["a"])
        mine = await create_run(client, acme, ["a"])

        response = await client.get("/collection/runs", params={"status": "pending"}, headers=acme.headers)

        assert [r["id"] for r in response.json()["runs"]] == [mine["id"]]
        assert response.json()["total"] == 1

    @pytest.mark.parametrize("status", ["done", "PENDING", "", "pending' or '1'='1"])
    async def test_an_unknown_status_is_422(
        self, client: httpx.AsyncClient, world: World, status: str
    ) -> None:
        admin = await world.admin()

        response = await client.get("/collection/runs", params={"status": status}, headers=admin.headers)

        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["query", "status"]


class TestGetRun:
    async def test_returns_the_run(self, client: httpx.AsyncClient, world: World, db) -> None:
        admin = await world.admin()
        created = await create_run(client, admin, ["a", "b"], name="fetch me")

        response = await client.get(f"/collection/runs/{created['id']}", headers=admin.headers)

        assert response.status_code == 200, response.text
        assert response.json() == created
        stored = await db.fetchval("select name from collection_runs where id = $1", uuid.UUID(created["id"]))
        assert stored == "fetch me"

    async def test_reflects_the_database(self, client: httpx.AsyncClient, world: World, db) -> None:
        admin = await world.admin()
        created = await create_run(client, admin, ["a"])
        await db.execute(
            "update collection_runs set processed_items = 7, failed_items = 2, actual_cost_cents = 35 "
            "where id = $1",
            uuid.UUID(created["id"]),
        )

        response = await client.get(f"/collection/runs/{created['id']}", headers=admin.headers)

        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["processed_items"], body["failed_items"], body["actual_cost_cents"]) == (7, 2, 35)

    @pytest.mark.parametrize(
        "run_id",
        [
            pytest.param(str(uuid.uuid4()), id="unknown-uuid"),
            pytest.param("not-a-uuid", id="malformed"),
            pytest.param("12345", id="number"),
            pytest.param("00000000-0000-0000-0000-00000000000g", id="bad-hex"),
            pytest.param("'; drop table collection_runs; --", id="sql-looking"),
            pytest.param("a" * 5000, id="very-long"),
            pytest.param(str(uuid.uuid4()) + "0", id="uuid-plus-one-char"),
        ],
    )
    async def test_unknown_or_malformed_id_is_404(
        self, client: httpx.AsyncClient, world: World, db, run_id: str
    ) -> None:
        admin = await world.admin()
        await create_run(client, admin, ["a"])

        response = await client.get(f"/collection/runs/{run_id}", headers=admin.headers)

        assert response.status_code == 404, response.text
        assert response.json()["error"] == "run_not_found"
        assert await run_count(db) == 1

    async def test_other_orgs_run_is_404(self, client: httpx.AsyncClient, world: World) -> None:
        acme = await world.admin("acme")
        globex = await world.admin("globex")
        theirs = await create_run(client, globex, ["a"])

        response = await client.get(f"/collection/runs/{theirs['id']}", headers=acme.headers)

        assert response.status_code == 404, response.text
        assert response.json()["error"] == "run_not_found"

    async def test_created_at_is_iso_8601_utc_aware(self, client: httpx.AsyncClient, world: World) -> None:
        admin = await world.admin()
        before = datetime.now(UTC) - timedelta(seconds=1)
        created = await create_run(client, admin, ["a"])

        response = await client.get(f"/collection/runs/{created['id']}", headers=admin.headers)

        created_at = parse_time(response.json()["created_at"])
        assert before <= created_at <= datetime.now(UTC)
