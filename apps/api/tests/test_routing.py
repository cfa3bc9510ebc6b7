"""GuardedRoute: the guard called by the route, a model result sent as FastAPI would send it, and guarded
reads answered without FastAPI's request handler exactly as FastAPI would answer them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi import routing as fastapi_routing
from fastapi.exceptions import RequestValidationError, ResponseValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel

from app.auth import GUARDS
from app.errors import CollectionError, NotAuthenticated
from app.main import collection_error_handler, create_app, validation_error_handler
from app.models import CollectionRunListResponse, CollectionRunResponse, CollectionSettingsResponse
from app.routing import GuardedRoute
from conftest import Actor, World, create_run


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


# ---------------------------------------------------------------------------------------------------
# The direct path for guarded reads, against FastAPI's own handling of the same endpoints
# ---------------------------------------------------------------------------------------------------
async def fake_guard(request: Request) -> str:
    if request.headers.get("authorization") != "Bearer ok":
        raise NotAuthenticated("Missing bearer token")
    return "caller"


GUARDS.add(fake_guard)
Caller = Annotated[str, Depends(fake_guard)]


class Thing(BaseModel):
    id: int
    name: str
    kind: str
    at: datetime


WHEN = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC)


def things_router(route_class: type[APIRoute]) -> APIRouter:
    """The same endpoints as GuardedRoute routes or as plain FastAPI routes (the reference)."""
    router = APIRouter(route_class=route_class)

    @router.get("/things/{thing_id}", response_model=Thing)
    async def get_thing(
        thing_id: int,
        caller: Caller,
        kind: Literal["a", "b"] = "a",
        limit: Annotated[int, Query(ge=1, le=10)] = 5,
        tags: Annotated[list[str] | None, Query(max_length=3)] = None,
    ) -> Any:
        assert caller == "caller"
        name = f"{limit}:{','.join(tags or [])}"
        if thing_id == 2:
            return {"id": 2, "name": name, "kind": kind, "at": WHEN.isoformat()}  # a dict: validated
        if thing_id == 3:
            return {"id": "not a number", "name": name}  # breaks the response model: FastAPI's 500
        if thing_id == 4:
            return Response(b"as it is", media_type="text/plain", status_code=202)
        return Thing(id=thing_id, name=name, kind=kind, at=WHEN)

    @router.post("/things/{thing_id}/poke", response_model=Thing)
    async def poke(thing_id: uuid.UUID, request: Request, caller: Caller) -> Thing:
        return Thing(id=len(str(thing_id)), name=request.method, kind=caller, at=WHEN)

    return router


def bare_things_app() -> FastAPI:
    app = FastAPI()
    app.add_exception_handler(CollectionError, collection_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    return app


def things_app(route_class: type[APIRoute]) -> FastAPI:
    app = bare_things_app()
    app.router.routes.extend(things_router(route_class).routes)
    return app


THING_REQUESTS: list[tuple[str, str, dict[str, str]]] = [
    ("GET", "/things/1", {}),
    ("GET", "/things/1?kind=b&limit=10&tags=x&tags=y", {}),
    ("GET", "/things/2?kind=b", {}),
    ("GET", "/things/3", {}),
    ("GET", "/things/4", {}),
    ("GET", "/things/nope", {}),
    ("GET", "/things/1?kind=c&limit=0", {}),
    ("GET", "/things/1?limit=x", {}),
    ("GET", "/things/1?tags=a&tags=b&tags=c&tags=d", {}),
    ("GET", "/things/nope?limit=0", {"authorization": "Bearer bad"}),
    ("GET", "/things/1", {"authorization": ""}),
    ("HEAD", "/things/1", {}),
    ("POST", f"/things/{uuid.UUID(int=7)}/poke", {}),
    ("POST", f"/things/{str(uuid.UUID(int=7)).upper()}/poke", {}),
    ("POST", "/things/7/poke", {}),
    ("POST", f"/things/{uuid.UUID(int=7)}/poke", {"content-type": "application/json"}),
]


def kept(exc: Exception, into: list[Any]) -> Response:
    into.append(exc)
    return Response(status_code=422)


def comparable(response: httpx.Response) -> tuple[int, bytes, list[tuple[str, str]]]:
    return response.status_code, response.content, sorted(response.headers.multi_items())


@pytest.fixture
def solved(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the requests FastAPI's own handler solved the dependencies of, from now on."""
    paths: list[str] = []
    solve = fastapi_routing.solve_dependencies

    async def counted(**kwargs: Any) -> Any:
        paths.append(kwargs["request"].url.path)
        return await solve(**kwargs)

    monkeypatch.setattr(fastapi_routing, "solve_dependencies", counted)
    return paths


class TestDirectReads:
    async def test_answers_every_request_as_fastapi_would_without_its_request_handler(
        self, solved: list[str]
    ) -> None:
        answers: dict[str, list[tuple[int, bytes, list[tuple[str, str]]]]] = {}
        for name, route_class in (("guarded", GuardedRoute), ("fastapi", APIRoute)):
            transport = httpx.ASGITransport(app=things_app(route_class), raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                answers[name] = []
                for method, url, headers in THING_REQUESTS:
                    response = await client.request(
                        method, url, headers={"authorization": "Bearer ok", **headers}, content=b"{"
                    )
                    answers[name].append(comparable(response))
            if name == "guarded":
                assert solved == []  # FastAPI's handler never ran
        assert (
            len(solved) == len(THING_REQUESTS) - 1
        )  # the reference: all but HEAD (405, no GET route takes it)
        for request, guarded, fastapi in zip(
            THING_REQUESTS, answers["guarded"], answers["fastapi"], strict=True
        ):
            assert guarded == fastapi, request
        statuses = [status for status, _, _ in answers["guarded"]]
        assert statuses == [200, 200, 200, 500, 202, 422, 422, 422, 422, 401, 401, 405, 200, 200, 422, 200]

    async def test_a_result_that_breaks_the_model_is_reported_as_fastapi_reports_it(self) -> None:
        raised: list[ResponseValidationError | RequestValidationError] = []
        for route_class in (GuardedRoute, APIRoute):
            app = things_app(route_class)
            app.add_exception_handler(RequestValidationError, lambda _, exc: kept(exc, raised))
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://t"
            ) as client:
                with pytest.raises(ResponseValidationError) as broken:
                    await client.get("/things/3", headers={"authorization": "Bearer ok"})
                raised.append(broken.value)
                await client.get("/things/1?limit=0", headers={"authorization": "Bearer ok"})
        guarded_response, guarded_request, fastapi_response, fastapi_request = raised
        for ours, theirs in ((guarded_response, fastapi_response), (guarded_request, fastapi_request)):
            assert ours.errors() == theirs.errors()
            assert str(ours) == str(theirs)  # what the log says: errors, endpoint and its place
        assert "GET /things/{thing_id}" in str(guarded_response) and "('response'," in str(guarded_response)

    async def test_an_included_router_keeps_what_its_inclusion_adds(self) -> None:
        async def closed_for_maintenance() -> None:
            raise NotAuthenticated("Closed by the inclusion")

        app = bare_things_app()
        app.include_router(
            things_router(GuardedRoute), prefix="/v1", dependencies=[Depends(closed_for_maintenance)]
        )
        app.router.routes.extend(things_router(GuardedRoute).routes)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            included = await client.get("/v1/things/1", headers={"authorization": "Bearer ok"})
            assert included.status_code == 401 and included.json()["detail"] == "Closed by the inclusion"
            added = await client.get("/things/1", headers={"authorization": "Bearer ok"})
            assert added.status_code == 200 and added.json()["id"] == 1


def as_fastapi_routes(app: FastAPI) -> None:
    """The app's guarded endpoints as FastAPI itself would route them: the guard a plain dependency."""
    routes: list[Any] = []
    for route in app.router.routes:
        guarded = getattr(route, "_guarded", None)
        if isinstance(route, GuardedRoute) and guarded is not None:
            route = APIRoute(
                route.path,
                guarded.call,
                methods=route.methods,
                response_model=route.response_model,
                status_code=route.status_code,
            )
        routes.append(route)
    app.router.routes = routes


@pytest.fixture
async def reference_app(settings: Any) -> AsyncIterator[FastAPI]:
    reference = create_app(settings)
    as_fastapi_routes(reference)
    async with reference.router.lifespan_context(reference):
        yield reference


class TestDirectReadsOfTheApi:
    async def test_every_guarded_read_answers_as_fastapi_routing_the_same_endpoint(
        self, app: FastAPI, reference_app: FastAPI, world: World, solved: list[str]
    ) -> None:
        admin = await world.admin()
        other = await world.admin("globex")
        ours = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        theirs = httpx.AsyncClient(transport=httpx.ASGITransport(app=reference_app), base_url="http://t")
        async with ours, theirs:
            run = await create_run(ours, admin)
            mine, elsewhere = run["id"], (await create_run(ours, other))["id"]
            requests: list[tuple[str, str, Actor | None]] = [
                ("GET", f"/collection/runs/{mine}", admin),
                ("GET", f"/collection/runs/{mine.upper()}", admin),
                ("GET", f"/collection/runs/{elsewhere}", admin),
                ("GET", "/collection/runs/not-a-uuid", admin),
                ("GET", f"/collection/runs/{mine}", None),
                ("GET", "/collection/runs?limit=0", None),
                ("GET", "/collection/runs", admin),
                ("GET", "/collection/runs?limit=1&offset=0&status=pending", admin),
                ("GET", "/collection/runs?limit=0", admin),
                ("GET", "/collection/runs?limit=1000&offset=-1&status=sleeping", admin),
                ("GET", "/collection/runs?limit=x", admin),
                ("GET", "/collection/runs?cursor=garbage", admin),
                ("GET", "/collection/runs?cursor=" + "x" * 201, admin),
                ("GET", f"/collection/runs/{mine}/items", admin),
                ("GET", f"/collection/runs/{mine}/items?limit=0&status=nope", admin),
                ("GET", f"/collection/runs/{elsewhere}/items", admin),
                ("GET", "/collection/settings", admin),
                ("GET", "/collection/sellers", admin),
                ("GET", "/collection/sellers?limit=-1&offset=x", admin),
                ("POST", f"/collection/runs/{elsewhere}/cancel", admin),
                ("POST", f"/collection/runs/{mine}/pause", admin),  # pending: not allowed, nothing changes
                ("POST", "/collection/runs/nope/resume", admin),
            ]
            for method, url, actor in requests:
                headers = actor.headers if actor else {}
                before = len(solved)
                a = await ours.request(method, url, headers=headers)
                assert len(solved) == before, url  # answered by the route, not FastAPI's handler
                b = await theirs.request(method, url, headers=headers)
                assert len(solved) == before + 1, url  # the reference's was
                assert (a.status_code, a.json()) == (b.status_code, b.json()), (method, url)
            # A transition that happens, once through each: the same answer for the same change.
            started = [
                await client.post(
                    f"/collection/runs/{(await create_run(ours, admin))['id']}/cancel", headers=admin.headers
                )
                for client in (ours, theirs)
            ]
            assert [r.status_code for r in started] == [200, 200]
            assert {tuple(sorted(r.json())) for r in started} == {tuple(sorted(started[0].json()))}
            assert (await ours.get(f"/collection/runs/{mine}", headers=admin.headers)).json()[
                "status"
            ] == "pending"

    def test_reads_without_a_body_take_the_direct_path_and_the_rest_fastapis(self, app: FastAPI) -> None:
        direct = sorted(
            (sorted(route.methods or ())[0], route.path)
            for route in app.routes
            if isinstance(route, GuardedRoute) and route.guard and route._direct_handler(route.guard)
        )
        assert ("GET", "/collection/runs/{run_id}") in direct and ("GET", "/collection/runs") in direct
        assert ("POST", "/collection/runs") not in direct  # a body: FastAPI reads and validates it
        assert ("PATCH", "/collection/settings") not in direct
        assert ("POST", "/collection/estimate") not in direct
