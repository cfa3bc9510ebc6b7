"""Object-level authorisation: an organisation sees and changes only its own runs and settings, and
every /collection endpoint refuses the unauthenticated (401) and the unpermitted (403).

The endpoints are read from the app's own routes, so an endpoint added later without the permission
dependency fails here without anyone remembering to list it.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from app.main import create_app
from conftest import Actor, World, create_run

# The contract's endpoints: the enumeration below must at least find these.
CONTRACT = {
    ("GET", "/collection/settings"),
    ("PATCH", "/collection/settings"),
    ("POST", "/collection/estimate"),
    ("POST", "/collection/runs"),
    ("GET", "/collection/runs"),
    ("GET", "/collection/runs/{run_id}"),
    ("POST", "/collection/runs/{run_id}/start"),
    ("POST", "/collection/runs/{run_id}/pause"),
    ("POST", "/collection/runs/{run_id}/resume"),
    ("POST", "/collection/runs/{run_id}/cancel"),
}

# A body each known endpoint would accept, so a refusal is about who asks, not what they send.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("PATCH", "/collection/settings"): {"budget_cap_cents": 100_000, "max_concurrent_runs": 50},
    ("POST", "/collection/estimate"): {"category_ids": ["electronics"]},
    ("POST", "/collection/runs"): {"name": "intruder", "category_ids": ["electronics"]},
}


def collection_routes() -> list[tuple[str, str]]:
    """(method, path) of every /collection route the app serves, however its routers are included."""
    app_routes = create_app().routes
    try:
        from fastapi.routing import iter_route_contexts  # FastAPI >= 0.16x includes routers lazily
    except ImportError:
        flat: list[tuple[str | None, set[str] | None]] = [
            (getattr(r, "path", None), getattr(r, "methods", None)) for r in app_routes
        ]
    else:
        flat = [(c.path, c.methods) for c in iter_route_contexts(app_routes)]
    return sorted(
        (method, path)
        for path, methods in flat
        if path is not None and path.startswith("/collection")
        for method in (methods or set()) - {"HEAD", "OPTIONS"}
    )


ROUTES = collection_routes()
RUN_ROUTES = [(method, path) for method, path in ROUTES if "{run_id}" in path]

# The status a run must be in for each action to be allowed: a leak would then really change it.
ACTIONABLE_FROM = {"start": "pending", "pause": "running", "resume": "paused", "cancel": "running"}


def status_for(route: tuple[str, str]) -> str:
    """Reads see a finished run (so a live stream of it ends); actions find the run ready for them."""
    method, path = route
    if method == "GET":
        return "cancelled"
    return ACTIONABLE_FROM.get(path.rsplit("/", 1)[-1], "running")


def route_id(route: tuple[str, str]) -> str:
    return f"{route[0]} {route[1].removeprefix('/collection')}"


async def test_enumeration_finds_every_contract_endpoint() -> None:
    assert CONTRACT <= set(ROUTES), CONTRACT - set(ROUTES)
    assert {r for r in ROUTES if "{run_id}" in r[1]} == set(RUN_ROUTES)
    assert len(RUN_ROUTES) >= 5


async def put_run_in(db: asyncpg.Pool, run_id: str, status: str) -> None:
    """Drive a run to `status` through the same SQL function the service uses."""
    org_id = await db.fetchval("select org_id from collection_runs where id = $1", uuid.UUID(run_id))
    path = {"pending": [], "running": ["start"], "paused": ["start", "pause"], "cancelled": ["cancel"]}
    for action in path[status]:
        await db.execute(
            "select public.collection_transition_run($1, $2, $3)", org_id, uuid.UUID(run_id), action
        )


async def database_state(db: asyncpg.Pool) -> dict[str, list[tuple[Any, ...]]]:
    """Everything an endpoint could change, for before/after comparisons."""
    return {
        "runs": [tuple(r) for r in await db.fetch("select * from collection_runs order by id")],
        "settings": [tuple(r) for r in await db.fetch("select * from collection_settings order by org_id")],
        "events": [tuple(r) for r in await db.fetch("select * from collection_run_events order by id")],
    }


def url_for(path: str, run_id: str) -> str:
    return path.replace("{run_id}", run_id)


async def call(
    client: httpx.AsyncClient, route: tuple[str, str], run_id: str, headers: dict[str, str]
) -> httpx.Response:
    method, path = route
    return await client.request(method, url_for(path, run_id), json=BODIES.get(route), headers=headers)


# --------------------------------------------------------------------------------------------------
# Every endpoint: 401 without a token, 403 without the permission
# --------------------------------------------------------------------------------------------------
class TestEveryEndpointRequiresThePermission:
    @pytest.mark.parametrize("route", ROUTES, ids=route_id)
    async def test_no_token_is_401(
        self, client: httpx.AsyncClient, world: World, db: asyncpg.Pool, route: tuple[str, str]
    ) -> None:
        admin = await world.admin("acme")
        run = await create_run(client, admin)
        await put_run_in(db, run["id"], status_for(route))
        before = await database_state(db)

        response = await call(client, route, run["id"], {"X-Org-Id": str(admin.org_id)})
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"].split()[0] == "Bearer"
        assert response.json()["error"] == "not_authenticated"
        assert await database_state(db) == before

    @pytest.mark.parametrize("route", ROUTES, ids=route_id)
    async def test_member_without_permission_is_403(
        self, client: httpx.AsyncClient, world: World, db: asyncpg.Pool, route: tuple[str, str]
    ) -> None:
        admin = await world.admin("acme")
        member = await world.member_only("acme")
        run = await create_run(client, admin)  # in the member's own org: 404 cannot stand in for 403
        await put_run_in(db, run["id"], status_for(route))
        await client.get("/collection/settings", headers=admin.headers)  # the settings row exists
        before = await database_state(db)

        response = await call(client, route, run["id"], member.headers)
        assert response.status_code == 403, response.text
        assert response.json()["error"] == "permission_denied"
        assert await database_state(db) == before


# --------------------------------------------------------------------------------------------------
# Runs of another organisation
# --------------------------------------------------------------------------------------------------
@pytest.fixture
async def acme(world: World) -> Actor:
    return await world.admin("acme")


@pytest.fixture
async def globex(world: World) -> Actor:
    return await world.admin("globex")


class TestOtherOrganisationsRun:
    @pytest.mark.parametrize("route", RUN_ROUTES, ids=route_id)
    async def test_is_404_and_left_unchanged(
        self,
        client: httpx.AsyncClient,
        db: asyncpg.Pool,
        acme: Actor,
        globex: Actor,
        route: tuple[str, str],
    ) -> None:
        run = await create_run(client, acme)
        await put_run_in(db, run["id"], status_for(route))
        before = await database_state(db)

        response = await call(client, route, run["id"], globex.headers)
        assert response.status_code == 404, response.text
        assert response.json()["error"] == "run_not_found"
        assert await database_state(db) == before

        # Indistinguishable from an id that names no run at all: ids reveal nothing across orgs.
        unknown = await call(client, route, str(uuid.uuid4()), globex.headers)
        assert (unknown.status_code, unknown.json()) == (response.status_code, response.json())

        # The owner can still act on it: the 404 was about who asked.
        own = await call(client, route, run["id"], acme.headers)
        assert own.status_code == 200, own.text

    @pytest.mark.parametrize("route", RUN_ROUTES, ids=route_id)
    async def test_naming_the_other_org_in_x_org_id_is_403(
        self,
        client: httpx.AsyncClient,
        db: asyncpg.Pool,
        acme: Actor,
        globex: Actor,
        route: tuple[str, str],
    ) -> None:
        run = await create_run(client, acme)
        await put_run_in(db, run["id"], status_for(route))
        before = await database_state(db)

        for org in (str(acme.org_id), "acme"):
            response = await call(client, route, run["id"], {**globex.headers, "X-Org-Id": org})
            assert response.status_code == 403, response.text
            assert response.json()["error"] == "permission_denied"
        assert await database_state(db) == before


class TestListRuns:
    async def test_other_orgs_runs_are_never_listed_or_counted(
        self, client: httpx.AsyncClient, db: asyncpg.Pool, acme: Actor, globex: Actor
    ) -> None:
        await client.patch("/collection/settings", json={"max_concurrent_runs": 10}, headers=acme.headers)
        acme_runs = [await create_run(client, acme, [f"c{i}"]) for i in range(4)]
        globex_run = await create_run(client, globex)
        assert await db.fetchval("select count(*) from collection_runs") == 5

        for params in ({}, {"limit": 100}, {"limit": 1, "offset": 0}, {"limit": 2, "offset": 1}):
            listed = await client.get("/collection/runs", params=params, headers=globex.headers)
            assert listed.status_code == 200, listed.text
            assert listed.json()["total"] == 1
            assert {r["id"] for r in listed.json()["runs"]} <= {globex_run["id"]}

        own = await client.get("/collection/runs", params={"limit": 100}, headers=acme.headers)
        assert own.json()["total"] == 4
        assert {r["id"] for r in own.json()["runs"]} == {r["id"] for r in acme_runs}


class TestSettings:
    async def test_patch_in_one_org_leaves_the_other_unchanged(
        self, client: httpx.AsyncClient, db: asyncpg.Pool, acme: Actor, globex: Actor
    ) -> None:
        assert (await client.get("/collection/settings", headers=acme.headers)).status_code == 200
        acme_before = await db.fetchrow("select * from collection_settings where org_id = $1", acme.org_id)

        patched = await client.patch(
            "/collection/settings",
            json={"budget_cap_cents": 1, "soft_warning_percent": 5, "max_concurrent_runs": 7},
            headers=globex.headers,
        )
        assert patched.status_code == 200, patched.text

        assert (
            await db.fetchrow("select * from collection_settings where org_id = $1", acme.org_id)
            == acme_before
        )
        globex_row = await db.fetchrow(
            "select budget_cap_cents, soft_warning_percent, max_concurrent_runs from collection_settings "
            "where org_id = $1",
            globex.org_id,
        )
        assert tuple(globex_row) == (1, 5, 7)
        acme_view = (await client.get("/collection/settings", headers=acme.headers)).json()
        assert (acme_view["budget_cap_cents"], acme_view["max_concurrent_runs"]) == (2500, 3)

    async def test_estimate_uses_the_callers_budget(
        self, client: httpx.AsyncClient, acme: Actor, globex: Actor
    ) -> None:
        await client.patch("/collection/settings", json={"budget_cap_cents": 100}, headers=globex.headers)
        response = await client.post(
            "/collection/estimate", json={"category_ids": ["a"]}, headers=acme.headers
        )
        assert response.status_code == 200, response.text
        assert (response.json()["budget_cap_cents"], response.json()["within_budget"]) == (2500, True)


class TestLimitsAreCountedPerOrganisation:
    async def test_concurrency_limit_ignores_other_orgs_runs(
        self, client: httpx.AsyncClient, db: asyncpg.Pool, acme: Actor, globex: Actor
    ) -> None:
        for i in range(3):  # globex at its limit of 3 active runs
            await create_run(client, globex, [f"g{i}"])
        full = await client.post("/collection/runs", json={"category_ids": ["g"]}, headers=globex.headers)
        assert full.status_code == 429, full.text

        await client.patch("/collection/settings", json={"max_concurrent_runs": 1}, headers=acme.headers)
        await create_run(client, acme)
        refused = await client.post("/collection/runs", json={"category_ids": ["b"]}, headers=acme.headers)
        assert refused.status_code == 429, refused.text

        counts = dict(await db.fetch("select org_id, count(*) from collection_runs group by org_id"))
        assert counts == {acme.org_id: 1, globex.org_id: 3}

    async def test_budget_cap_ignores_other_orgs_runs_and_cap(
        self, client: httpx.AsyncClient, db: asyncpg.Pool, acme: Actor, globex: Actor
    ) -> None:
        await client.patch(
            "/collection/settings",
            json={"budget_cap_cents": 5000, "max_concurrent_runs": 10},
            headers=globex.headers,
        )
        for i in range(3):  # $100 of globex estimates, more than acme's $25 cap
            await create_run(client, globex, [f"g{i}-{j}" for j in range(6)])
        await client.patch("/collection/settings", json={"budget_cap_cents": 0}, headers=globex.headers)

        run = await create_run(client, acme, [f"a{j}" for j in range(5)])  # exactly acme's $25 cap
        row = await db.fetchrow(
            "select org_id, estimated_cost_cents, budget_cap_cents from collection_runs where id = $1",
            uuid.UUID(run["id"]),
        )
        assert tuple(row) == (acme.org_id, 2500, 2500)

        over = await client.post("/collection/runs", json={"category_ids": ["g"]}, headers=globex.headers)
        assert over.status_code == 400, over.text
        assert over.json()["error"] == "budget_exceeded"
