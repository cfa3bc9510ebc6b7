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

A guarded read with nothing but path and query parameters (no body, no other dependency, a plain
model response) goes further: the route validates those parameters with FastAPI's own
`request_params_to_args` (same rules, same 422 errors) and calls the endpoint itself, without
FastAPI's general request handler (dependency solving, a Response for dependencies to set headers on,
its body, header and cookie parsing for parameters the endpoint does not have: ~25 µs a request,
benchmarks/README.md). tests/test_routing.py holds it to FastAPI's answers, byte for byte. FastAPI's
handler still answers such a read when FastAPI's own OpenTelemetry is tracing the request (it records
the handler's steps) and when the route's router is mounted with `include_router` (an inclusion may
add dependencies only FastAPI's handler knows of). Tools that hook FastAPI's internals rather than
OpenTelemetry (Sentry's and Logfire's FastAPI integrations patch its handler) do not see direct reads.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, NamedTuple, get_args, get_origin

from fastapi import Request, Response
from fastapi import routing as fastapi_routing
from fastapi._compat import ModelField
from fastapi.datastructures import Default, DefaultPlaceholder
from fastapi.dependencies.utils import request_params_to_args
from fastapi.exceptions import EndpointContext, RequestValidationError, ResponseValidationError
from fastapi.params import Depends
from fastapi.routing import APIRoute
from fastapi.telemetry import get_telemetry_data
from fastapi.utils import is_body_allowed_for_status_code
from pydantic import BaseModel

from app.auth import GUARDS

GUARDED_CALLER = "app.guarded_caller"  # the scope key the guard's result travels under

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class ModelResponse(NamedTuple):
    """A route whose response is its model's JSON, with FastAPI's default class and options."""

    model: type[BaseModel]
    status_code: int

    def send(self, instance: BaseModel) -> Response:
        """An instance of exactly the model as FastAPI sends it: by alias, from its own serializer."""
        body = self.model.__pydantic_serializer__.to_json(instance, by_alias=True)
        return Response(body, status_code=self.status_code, media_type="application/json")


class GuardedEndpoint(NamedTuple):
    call: Callable[..., Coroutine[Any, Any, Any]]  # the endpoint as written
    guarded: str  # its parameter that receives the guard's result
    request: str | None  # its parameter that receives the request, if it has one


class GuardedRoute(APIRoute):
    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        self.guard: Callable[[Request], Coroutine[Any, Any, Any]] | None = None
        self._guarded: GuardedEndpoint | None = None
        self._model = _model_response(kwargs)
        if inspect.iscoroutinefunction(endpoint):
            found = _guard_parameter(endpoint)
            if found is not None:
                name, self.guard = found
                self._guarded = GuardedEndpoint(endpoint, name, _request_parameter(endpoint))
                endpoint = _taking_guarded_caller(self._guarded, _lenient(self._model))
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        guard = self.guard
        if guard is None:
            return handler

        async def guarded(request: Request) -> Response:
            request.scope[GUARDED_CALLER] = await guard(request)
            return await handler(request)

        direct = None if _for_an_inclusion(self) else self._direct_handler(guard)
        if direct is None:
            return guarded

        async def read(request: Request) -> Response:
            if get_telemetry_data() is None:
                return await direct(request)
            return await guarded(request)  # FastAPI's telemetry traces the steps of its own handler

        return read

    def _direct_handler(self, guard: Callable[[Request], Coroutine[Any, Any, Any]]) -> Handler | None:
        """The guarded read without FastAPI's request handler; None for a route that needs it."""
        dependant, endpoint, model = self.dependant, self._guarded, self._model
        if (
            endpoint is None
            or model is None
            or dependant.dependencies
            or dependant.header_params
            or dependant.cookie_params
            or dependant.body_params
            or self.body_field is not None
            or dependant.background_tasks_param_name
            or dependant.response_param_name
            or dependant.security_scopes_param_name
            or dependant.http_connection_param_name
            or dependant.websocket_param_name
            or self.is_sse_stream
            or self.is_json_stream
        ):
            return None
        call, guarded_name, request_name = endpoint
        path_fields, query_fields = dependant.path_params, dependant.query_params
        assert self.response_field is not None  # there is a response model
        respond = _strict(model, self.response_field, call, self.path)

        async def direct(request: Request) -> Response:
            caller = await guard(request)
            values: dict[str, Any] = {}
            errors: list[Any] = []
            if path_fields:
                found, wrong = request_params_to_args(path_fields, request.path_params)
                values.update(found)
                errors += wrong
            if query_fields:
                found, wrong = request_params_to_args(query_fields, request.query_params)
                values.update(found)
                errors += wrong
            if errors:
                raise RequestValidationError(errors, endpoint_ctx=_endpoint_context(call, request, self.path))
            if request_name is not None:
                values[request_name] = request
            values[guarded_name] = caller
            return respond(await call(**values), request)

        return direct


def _guard_parameter(endpoint: Callable[..., Any]) -> tuple[str, Any] | None:
    """The endpoint's parameter that is a permission guard's dependency: its name and the guard."""
    for parameter in inspect.signature(endpoint, eval_str=True).parameters.values():
        if get_origin(parameter.annotation) is not Annotated:
            continue
        for marker in get_args(parameter.annotation)[1:]:
            if isinstance(marker, Depends) and marker.dependency in GUARDS:
                return parameter.name, marker.dependency
    return None


def _request_parameter(endpoint: Callable[..., Any]) -> str | None:
    parameters = inspect.signature(endpoint, eval_str=True).parameters.values()
    return next((p.name for p in parameters if p.annotation is Request), None)


def _model_response(route: dict[str, Any]) -> ModelResponse | None:
    """The route's model, when its response is exactly that model's JSON: FastAPI's default response
    class and serialisation options, and a status code that has a body."""
    model = route.get("response_model")
    status_code = route.get("status_code") or 200
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    plain = (
        isinstance(route.get("response_class", Default(None)), DefaultPlaceholder)
        and route.get("response_model_include") is None
        and route.get("response_model_exclude") is None
        and route.get("response_model_by_alias", True) is True
        and not route.get("response_model_exclude_unset", False)
        and not route.get("response_model_exclude_defaults", False)
        and not route.get("response_model_exclude_none", False)
        and is_body_allowed_for_status_code(status_code)
    )
    return ModelResponse(model, status_code) if plain else None


def _lenient(model: ModelResponse | None) -> Callable[[Any], Any]:
    """For FastAPI's handler: an instance of exactly the route's model becomes a JSON response straight
    from the model's own serializer (what FastAPI would send, without validating our own model against
    itself and building the response through its general path: ~8 µs of a request,
    benchmarks/README.md). Anything else goes to FastAPI as it was."""
    if model is None:
        return lambda result: result

    def respond(result: Any) -> Any:
        return model.send(result) if type(result) is model.model else result

    return respond


def _strict(
    model: ModelResponse, field: ModelField, call: Callable[..., Any], path: str
) -> Callable[[Any, Request], Response]:
    """For the direct path: any result as FastAPI would send it. A Response as it is; anything else
    validated and serialised through the route's response field, as FastAPI's `serialize_response`
    does (a mismatch is its ResponseValidationError, a 500)."""

    def respond(result: Any, request: Request) -> Response:
        if type(result) is model.model:
            return model.send(result)
        if isinstance(result, Response):
            return result
        value, errors = field.validate(result, {}, loc=("response",))
        if errors:
            context = _endpoint_context(call, request, path)
            raise ResponseValidationError(errors=errors, body=result, endpoint_ctx=context)
        body = field.serialize_json(value, by_alias=True)
        return Response(body, status_code=model.status_code, media_type="application/json")

    return respond


def _endpoint_context(call: Callable[..., Any], request: Request, path: str) -> EndpointContext:
    """Where the endpoint is, for a validation error's message, as FastAPI's handler gives it."""
    context = _source_of(call).copy()
    context["path"] = f"{request.method} {request.scope.get('root_path', '').rstrip('/')}{path}"
    return context


@functools.cache
def _source_of(call: Callable[..., Any]) -> EndpointContext:
    context = EndpointContext(function=call.__name__)
    try:
        context["file"] = inspect.getsourcefile(call) or ""
        context["line"] = inspect.getsourcelines(call)[1]
    except (OSError, TypeError):
        pass
    return context


def _for_an_inclusion(route: APIRoute) -> bool:
    """Whether FastAPI is building this route's handler for an `include_router` of its router. An
    inclusion may add dependencies, a response class or prefix parameters that only FastAPI's handler
    knows of (it passes them through a context of its own), so such a handler is FastAPI's."""
    context = fastapi_routing._effective_route_context_var.get()
    return context is not None and context.original_route is route


def _taking_guarded_caller(guarded: GuardedEndpoint, respond: Callable[[Any], Any]) -> Callable[..., Any]:
    """The endpoint as FastAPI will call it: without the guarded parameter, which it finds instead
    where the route put it, and with the request (which FastAPI passes for free) to find it in."""
    endpoint, name, request_name = guarded
    signature = inspect.signature(endpoint, eval_str=True)
    parameters = [p for p in signature.parameters.values() if p.name != name]
    keep_request = request_name is not None
    if request_name is None:
        request_name = "_guarded_request"
        parameters.append(inspect.Parameter(request_name, inspect.Parameter.KEYWORD_ONLY, annotation=Request))

    @functools.wraps(endpoint)
    async def call(**values: Any) -> Any:
        request: Request = values[request_name] if keep_request else values.pop(request_name)
        values[name] = request.scope[GUARDED_CALLER]
        return respond(await endpoint(**values))

    call.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return call
