"""GET /collection/runs with a cursor (keyset pages), and the estimated total of large listings."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from conftest import Actor, World, create_run

RUNS = "/collection/runs"


async def allow_runs(client: httpx.AsyncClient, actor: Actor, runs: int) -> None:
    response = await client.patch(
        "/collection/settings", json={"max_concurrent_runs": runs}, headers=actor.headers
    )
    assert response.status_code == 200, response.text


async def walk(client: httpx.AsyncClient, actor: Actor, **params: str | int) -> list[list[str]]:
    """Every page from the first, following next_cursor until it is null."""
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await client.get(RUNS, params=query, headers=actor.headers)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append([r["id"] for r in body["runs"]])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 50, "the cursor does not advance"


class TestCursorPages:
    async def test_cursor_pages_walk_every_run_once_newest_first(
        self, client: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin()
        await allow_runs(client, admin, 10)
        created = [await create_run(client, admin, ["a"]) for _ in range(5)]

        pages = await walk(client, admin, limit=2)

        assert [len(p) for p in pages] == [2, 2, 1]
        newest_first = [r["id"] for r in reversed(created)]
        assert [run_id for page in pages for run_id in page] == newest_first
        stored = await db.fetch("select id from collection_runs order by created_at desc, id desc")
        assert [str(r["id"]) for r in stored] == newest_first

    async def test_a_full_last_page_is_followed_by_an_empty_one(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        admin = await world.admin()
        await allow_runs(client, admin, 10)
        for _ in range(4):
            await create_run(client, admin, ["a"])

        assert [len(p) for p in await walk(client, admin, limit=2)] == [2, 2, 0]

    async def test_cursor_pages_equal_offset_pages_and_keep_the_status_filter(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        admin = await world.admin()
        await allow_runs(client, admin, 20)
        runs = [await create_run(client, admin, ["a"]) for _ in range(7)]
        for run in runs[::2]:
            await client.post(f"{RUNS}/{run['id']}/cancel", headers=admin.headers)

        by_cursor = await walk(client, admin, limit=3, status="cancelled")
        by_offset = []
        for offset in (0, 3):
            response = await client.get(
                RUNS, params={"limit": 3, "offset": offset, "status": "cancelled"}, headers=admin.headers
            )
            by_offset.append([r["id"] for r in response.json()["runs"]])

        assert by_cursor[:2] == by_offset
        assert [i for page in by_cursor for i in page] == [r["id"] for r in reversed(runs[::2])]

    async def test_another_orgs_cursor_still_lists_only_the_callers_runs(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        acme = await world.admin("acme")
        globex = await world.admin("globex")
        theirs = await create_run(client, globex, ["a"])
        await allow_runs(client, acme, 10)
        for _ in range(3):
            await create_run(client, acme, ["a"])
        first = await client.get(RUNS, params={"limit": 1}, headers=acme.headers)
        acme_cursor = first.json()["next_cursor"]

        response = await client.get(RUNS, params={"cursor": acme_cursor}, headers=globex.headers)

        # A cursor only says where to start; the page is the caller's own runs older than that.
        assert response.status_code == 200, response.text
        assert [r["id"] for r in response.json()["runs"]] == [theirs["id"]]

    @pytest.mark.parametrize("cursor", ["x", "not-base64!", "bm90IGEgY3Vyc29y", "MjAyNi0wMS0wMVQwMDowMHx4"])
    async def test_a_cursor_we_did_not_make_is_400(
        self, client: httpx.AsyncClient, world: World, cursor: str
    ) -> None:
        admin = await world.admin()

        response = await client.get(RUNS, params={"cursor": cursor}, headers=admin.headers)

        assert response.status_code == 400, response.text
        assert response.json()["error"] == "invalid_cursor"


class TestEstimatedTotal:
    async def test_small_totals_are_exact(self, client: httpx.AsyncClient, world: World) -> None:
        admin = await world.admin()
        await create_run(client, admin, ["a"])

        body = (await client.get(RUNS, headers=admin.headers)).json()

        assert (body["total"], body["total_estimated"]) == (1, False)

    async def test_above_ten_thousand_the_total_is_an_estimate(
        self, client: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin()
        await db.execute(
            "insert into collection_runs (org_id, name, status, estimated_cost_cents, budget_cap_cents,"
            " category_ids, created_at) select $1, 'r' || g, 'completed', 0, 0, array['a'],"
            " now() - make_interval(secs => g) from generate_series(1, 12000) g",
            admin.org_id,
        )
        await db.execute("analyze collection_runs")

        body = (await client.get(RUNS, params={"limit": 5}, headers=admin.headers)).json()
        failed = (await client.get(RUNS, params={"status": "failed"}, headers=admin.headers)).json()

        assert body["total_estimated"] is True
        assert 10_000 < body["total"] < 15_000
        assert len(body["runs"]) == 5
        assert (failed["total"], failed["total_estimated"]) == (0, False)
