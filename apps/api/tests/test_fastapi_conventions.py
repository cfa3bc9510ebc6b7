"""The API through FastAPI's own conventions, as its documentation describes them: dependencies
replaced with `app.dependency_overrides`, the collection router mounted again with `include_router`
under a prefix and with a router-level dependency, and the app made by a factory. (OpenAPI's security
from the dependencies: test_auth.)"""

from __future__ import annotations

import importlib
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import Depends, FastAPI, Header, HTTPException

from app.auth import CurrentUser, current_user
from app.config import Pricing, Settings, get_settings
from app.deps import get_service, require_admin
from app.main import create_app
from app.routers import collection
from app.services.collection import CollectionService
from conftest import World, create_run, make_settings

pytestmark = pytest.mark.usefixtures("db")


def user_of(org_id: uuid.UUID, permissions: frozenset[str] = frozenset({"admin.automation"})) -> CurrentUser:
    return CurrentUser(
        user_id=uuid.uuid4(), email=None, org_id=org_id, org_slug="x", role="admin", permissions=permissions
    )


async def client_of(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


class TestDependencyOverrides:
    async def test_the_permission_dependency_can_be_replaced(
        self, app: FastAPI, client: httpx.AsyncClient, world: World
    ) -> None:
        admin = await world.admin("acme")
        run = await create_run(client, admin)
        app.dependency_overrides[require_admin] = lambda: user_of(admin.org_id)
        try:
            # No token at all: the override decides who the caller is, as FastAPI documents.
            response = await client.get(f"/collection/runs/{run['id']}")
            assert response.status_code == 200, response.text
            assert response.json()["id"] == run["id"]
            # A caller in another organisation, by the override's say: the run is not theirs.
            app.dependency_overrides[require_admin] = lambda: user_of(uuid.uuid4())
            assert (await client.get(f"/collection/runs/{run['id']}")).status_code == 404
        finally:
            app.dependency_overrides.clear()
        assert (await client.get(f"/collection/runs/{run['id']}")).status_code == 401

    async def test_current_user_can_be_replaced_and_the_permission_still_applies(
        self, app: FastAPI, client: httpx.AsyncClient, world: World
    ) -> None:
        org = await world.org("acme")
        app.dependency_overrides[current_user] = lambda: user_of(org, permissions=frozenset())
        try:
            refused = await client.get("/collection/settings")
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"] == "permission_denied"
            app.dependency_overrides[current_user] = lambda: user_of(org)
            assert (await client.get("/collection/settings")).status_code == 200
        finally:
            app.dependency_overrides.clear()

    async def test_the_service_can_be_replaced(
        self, app: FastAPI, client: httpx.AsyncClient, world: World
    ) -> None:
        admin = await world.admin()
        body = {"category_ids": ["electronics"]}
        assert (await client.post("/collection/estimate", json=body, headers=admin.headers)).json()[
            "total_cents"
        ] == 500
        real: CollectionService = app.state.service
        cheaper = CollectionService(real.store, Pricing(2, 1, 1, 1), "sandbox")
        app.dependency_overrides[get_service] = lambda: cheaper
        try:
            estimate = await client.post("/collection/estimate", json=body, headers=admin.headers)
        finally:
            app.dependency_overrides.clear()
        assert estimate.status_code == 200, estimate.text
        assert estimate.json()["total_cents"] == 4  # 2 products x (1 + 1 x 1) cents: the override priced it


async def need_a_client_header(x_client: str | None = Header(default=None)) -> None:
    if x_client != "console":
        raise HTTPException(status_code=400, detail="X-Client: console required")


@pytest.fixture
async def prefixed_app(migrated_dsn: str, tmp_path: Path, store_mode: str) -> AsyncIterator[FastAPI]:
    application = create_app(make_settings(migrated_dsn, tmp_path))
    application.include_router(collection.router, prefix="/v2", dependencies=[Depends(need_a_client_header)])
    async with application.router.lifespan_context(application):
        yield application


class TestIncludeRouter:
    async def test_the_router_mounted_under_a_prefix_with_a_dependency_of_its_own(
        self, prefixed_app: FastAPI, world: World
    ) -> None:
        admin = await world.admin()
        async with await client_of(prefixed_app) as client:
            run = await create_run(client, admin)
            refused = await client.get(f"/v2/collection/runs/{run['id']}", headers=admin.headers)
            assert refused.status_code == 400, refused.text
            assert refused.json()["detail"] == "X-Client: console required"
            served = await client.get(
                f"/v2/collection/runs/{run['id']}", headers={**admin.headers, "X-Client": "console"}
            )
            assert served.status_code == 200, served.text
            assert (
                served.json()
                == (await client.get(f"/collection/runs/{run['id']}", headers=admin.headers)).json()
            )
            # The mounted copy keeps the router's own dependencies: no token, no run.
            anonymous = await client.get(f"/v2/collection/runs/{run['id']}", headers={"X-Client": "console"})
            assert anonymous.status_code == 401
            schema = (await client.get("/openapi.json")).json()
        operation = schema["paths"]["/v2/collection/runs/{run_id}"]["get"]
        assert operation["security"] == [{"HTTPBearer": []}]
        assert {p["name"] for p in operation["parameters"]} >= {"run_id", "X-Org-Id", "x-client"}


class TestTheFactory:
    def test_importing_the_app_module_reads_no_settings_and_builds_no_app(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Settings that could not be read: importing app.main must not try.
        monkeypatch.setenv("PORT", "not a port")
        monkeypatch.delitem(sys.modules, "app.main")
        get_settings.cache_clear()
        try:
            module = importlib.import_module("app.main")
            assert not any(isinstance(value, FastAPI) for value in vars(module).values())
            with pytest.raises(ValueError, match="port"):  # read now, by the factory
                module.create_app()
        finally:
            get_settings.cache_clear()

    def test_a_server_that_could_verify_no_token_is_refused_at_start(self, tmp_path: Path) -> None:
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None, database_url="postgresql://u@127.0.0.1:1/db", data_dir=tmp_path
        )
        with pytest.raises(ValueError, match="so tokens can be verified"):
            create_app(settings)
