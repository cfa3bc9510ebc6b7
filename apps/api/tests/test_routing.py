"""GuardedRoute: the guard called by the route, and a model result sent as FastAPI would send it."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from fastapi.routing import APIRoute

from app.models import CollectionRunListResponse, CollectionRunResponse, CollectionSettingsResponse
from app.routing import GuardedRoute
from conftest import World, create_run


def route_of(app: FastAPI, path: str, method: str) -> APIRoute:
    return next(
        r for r in app.routes if isinstance(r, APIRoute) and r.path == path and method in (r.methods or ())
    )


class TestModelResponses:
    async def test_guarded_reads_send_the_bytes_fastapi_would(
        self, app: FastAPI, client: httpx.AsyncClient, world: World
    ) -> None:
        admin = await world.admin()
        run = await create_run(client, admin)
        for path, url, model in [
            ("/collection/runs/{run_id}", f"/collection/runs/{run['id']}", CollectionRunResponse),
            ("/collection/runs", "/collection/runs", CollectionRunListResponse),
            ("/collection/settings", "/collection/settings", CollectionSettingsResponse),
        ]:
            route = route_of(app, path, "GET")
            assert isinstance(route, GuardedRoute) and route.guard is not None
            response = await client.get(url, headers=admin.headers)
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "application/json"
            # FastAPI's own serialisation of the same model, through the route's response field.
            assert route.response_field is not None
            expected = route.response_field.serialize_json(
                model.model_validate_json(response.content), by_alias=True
            )
            assert response.content == expected

    async def test_a_create_keeps_its_status_code(self, client: httpx.AsyncClient, world: World) -> None:
        admin = await world.admin()
        created = await client.post("/collection/runs", json={"category_ids": ["a"]}, headers=admin.headers)
        assert created.status_code == 201, created.text
        assert CollectionRunResponse.model_validate_json(created.content).status == "pending"

    async def test_streams_and_unguarded_routes_are_left_to_fastapi(self, app: FastAPI) -> None:
        events = route_of(app, "/collection/runs/{run_id}/events", "GET")
        assert isinstance(events, GuardedRoute) and events.guard is None  # its guard stays a dependency
        assert not isinstance(route_of(app, "/healthz", "GET"), GuardedRoute)
