"""GuardedRoute: an endpoint's permission guard called by the route itself, before FastAPI's own work.

Endpoints declare their caller as a dependency, `admin: Admin` with
`Admin = Annotated[AdminCall, Depends(permission_guard(...))]`, and read like any FastAPI endpoint.
Resolving a dependency is FastAPI's dearest per-request step for a read (~15 µs of a ~300 µs
`GET /runs/{id}`, more than our own token and permission checks: benchmarks/README.md), so a router
built with `route_class=GuardedRoute` takes such a parameter out of the signature FastAPI sees and
calls the guard itself, first: before the body is read and before any parameter is validated, so an
unauthenticated caller learns nothing about the endpoint beyond a 401. The guard, its errors and the
OpenAPI schema (`document_guarded_operations`) are the same either way; a parameter FastAPI resolves
in another dependency (as `existing_run_id` does) stays a dependency, and so do streaming endpoints.
A guarded endpoint's result that is exactly its `response_model` is serialised by the model itself
(`_model_response`): the bytes FastAPI would send, without its second validation of our own model.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, get_args, get_origin

from fastapi import Request, Response
from fastapi.datastructures import Default, DefaultPlaceholder
from fastapi.params import Depends
from fastapi.routing import APIRoute
from fastapi.utils import is_body_allowed_for_status_code
from pydantic import BaseModel

from app.auth import GUARDS

GUARDED_CALLER = "app.guarded_caller"  # the scope key the guard's result travels under


class GuardedRoute(APIRoute):
    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        self.guard: Callable[[Request], Coroutine[Any, Any, Any]] | None = None
        if inspect.iscoroutinefunction(endpoint):
            found = _guard_parameter(endpoint)
            if found is not None:
                name, self.guard = found
                endpoint = _taking_guarded_caller(endpoint, name, _model_response(kwargs))
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        guard = self.guard
        if guard is None:
            return handler

        async def guarded(request: Request) -> Response:
            request.scope[GUARDED_CALLER] = await guard(request)
            return await handler(request)

        return guarded


def _guard_parameter(endpoint: Callable[..., Any]) -> tuple[str, Any] | None:
    """The endpoint's parameter that is a permission guard's dependency: its name and the guard."""
    for parameter in inspect.signature(endpoint, eval_str=True).parameters.values():
        if get_origin(parameter.annotation) is not Annotated:
            continue
        for marker in get_args(parameter.annotation)[1:]:
            if isinstance(marker, Depends) and marker.dependency in GUARDS:
                return parameter.name, marker.dependency
    return None


def _model_response(route: dict[str, Any]) -> Callable[[Any], Any]:
    """What turns an endpoint's result into the response, given the route's settings.

    An instance of exactly the route's `response_model`, with FastAPI's default response class and
    serialisation options, becomes a JSON response straight from the model's own serializer: what
    FastAPI would send, without validating our own model against itself and building the response
    through its general path (~8 µs of a request, benchmarks/README.md). Anything else goes to FastAPI
    as it was."""
    model = route.get("response_model")
    status_code = route.get("status_code") or 200
    plain = (
        isinstance(model, type)
        and issubclass(model, BaseModel)
        and isinstance(route.get("response_class", Default(None)), DefaultPlaceholder)
        and route.get("response_model_include") is None
        and route.get("response_model_exclude") is None
        and route.get("response_model_by_alias", True) is True
        and not route.get("response_model_exclude_unset", False)
        and not route.get("response_model_exclude_defaults", False)
        and not route.get("response_model_exclude_none", False)
        and is_body_allowed_for_status_code(status_code)
    )
    if not plain:
        return lambda result: result
    serializer = model.__pydantic_serializer__  # type: ignore[union-attr]

    def respond(result: Any) -> Any:
        if type(result) is not model:
            return result
        body = serializer.to_json(result, by_alias=True)
        return Response(body, status_code=status_code, media_type="application/json")

    return respond


def _taking_guarded_caller(
    endpoint: Callable[..., Any], name: str, respond: Callable[[Any], Any]
) -> Callable[..., Any]:
    """The endpoint as FastAPI will call it: without the guarded parameter, which it finds instead
    where the route put it, and with the request (which FastAPI passes for free) to find it in."""
    signature = inspect.signature(endpoint, eval_str=True)
    parameters = [p for p in signature.parameters.values() if p.name != name]
    request_name = next((p.name for p in parameters if p.annotation is Request), None)
    if request_name is None:
        request_name = "_guarded_request"
        parameters.append(inspect.Parameter(request_name, inspect.Parameter.KEYWORD_ONLY, annotation=Request))
    keep_request = request_name in signature.parameters

    @functools.wraps(endpoint)
    async def call(**values: Any) -> Any:
        request: Request = values[request_name] if keep_request else values.pop(request_name)
        values[name] = request.scope[GUARDED_CALLER]
        return respond(await endpoint(**values))

    call.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return call
