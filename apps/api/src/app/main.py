"""The FastAPI application, made by `create_app()`: lifespan (store, service, executor, start-up
recovery), error handlers, middleware and routers.

Importing this module reads no settings and opens nothing: `collection-api serve` calls the factory,
and so can `uvicorn app.main:create_app --factory`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version

import httpx
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.auth import AccessCache, TokenVerifier, current_user, needs_authentication, refused_authentication
from app.background import collection_manager, collection_startup_recovery
from app.config import Settings, StoreMode, get_settings
from app.database import PostgresTransport, create_pool
from app.errors import CollectionError
from app.migrate import migrations
from app.observability import Metrics, RequestContextMiddleware, fastapi_telemetry
from app.providers import make_provider
from app.routers import admin, collection, health
from app.services.collection import CollectionService
from app.store import Store, Transport

logger = logging.getLogger(__name__)

HTTP_ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(exc: CollectionError) -> JSONResponse:
    return JSONResponse(
        {"detail": exc.message, "error": exc.error}, status_code=exc.status_code, headers=exc.headers
    )


async def collection_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CollectionError)
    return error_response(exc)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Unauthenticated callers learn nothing about an operation that needs a token: not even that its
    # body is malformed (FastAPI parses a JSON body, and validates headers, before it calls
    # current_user, which would have answered 401).
    route = request.scope.get("route")
    if (
        isinstance(route, APIRoute)
        and current_user not in request.app.dependency_overrides
        and needs_authentication(route)
    ):
        refused = await refused_authentication(request)
        if refused is not None:
            return error_response(refused)
    return JSONResponse(
        {"detail": jsonable_encoder(exc.errors()), "error": "validation_error"}, status_code=422
    )


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names only the methods of the first route with this path; list them all.
        headers["Allow"] = ", ".join(allowed_methods(request.app, request.url.path))
    return JSONResponse(
        {"detail": exc.detail, "error": HTTP_ERROR_CODES.get(exc.status_code, "http_error")},
        status_code=exc.status_code,
        headers=headers,
    )


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    table: list[tuple[re.Pattern[str], list[str]]] | None = getattr(app.state, "allowed_methods", None)
    if table is None:
        table = [
            (
                re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template)) + "$"),
                sorted(m.upper() for m in ops),
            )
            for template, ops in app.openapi()["paths"].items()
        ]
        app.state.allowed_methods = table
    return next((methods for pattern, methods in table if pattern.match(path)), [])


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "Internal server error", "error": "internal_error"}, status_code=500)


async def open_store(settings: Settings) -> Store:
    """The store for the configured mode: asyncpg with DATABASE_URL, else Supabase's REST API."""
    versions = [m.version for m in migrations(settings.supabase_dir)]
    transport: Transport
    if settings.store_mode is StoreMode.SUPABASE_REST:
        # Imported here: supabase-py takes most of a second to import, which the direct mode never needs.
        from app.store_rest import RestTransport

        logger.info("store: Supabase REST API at %s (supabase-py, service-role key)", settings.supabase_url)
        transport = await RestTransport.connect(settings)
    else:
        logger.info(
            "store: Postgres through asyncpg (%s)",
            "transaction pooler" if settings.uses_transaction_pooler else "direct connection",
        )
        transport = PostgresTransport(await create_pool(settings), settings.db_acquire_timeout_s)
    return Store(transport, versions)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application on `settings` (default: read from the environment now)."""
    settings = settings or get_settings()
    settings.refuse_unverifiable_tokens()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        http_client = httpx.AsyncClient()
        store = await open_store(settings)
        provider = make_provider(settings)
        service = CollectionService(store, settings.pricing, provider.name)
        if provider.name == "sandbox":
            logger.warning(
                "provider: SANDBOX (no OXYLABS_USERNAME/OXYLABS_PASSWORD): runs use a simulated catalogue "
                "and cost nothing real"
            )
        else:
            logger.info("provider: Oxylabs (%s)", settings.oxylabs_base_url)
        app.state.stopping = asyncio.Event()  # set when the server is asked to stop
        app.state.settings = settings
        app.state.store = store
        app.state.service = service
        app.state.token_verifier = TokenVerifier(settings, http_client)
        app.state.access_cache = AccessCache(service.user_access, settings.auth_cache_s)
        await collection_startup_recovery(service, settings.recovery_log_limit, settings.executor_enabled)
        manager = (
            collection_manager(service, provider, settings, metrics) if settings.executor_enabled else None
        )
        app.state.manager = manager
        try:
            yield
        finally:
            app.state.stopping.set()
            if manager is not None:
                await manager.stop()
            await provider.aclose()
            await store.close()
            await http_client.aclose()

    metrics = Metrics()
    app = FastAPI(
        title="Collection API",
        version=version("collection-api"),
        summary="Collection runs for seller research: estimate, budget-check, start and track runs.",
        lifespan=lifespan,
        telemetry=fastapi_telemetry(os.environ),
    )
    app.state.metrics = metrics
    app.add_middleware(RequestContextMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        # Only the configured dashboard origins; the bundled console is same-origin and needs none.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH"],
            allow_headers=["Authorization", "Content-Type", "X-Org-Id", "Last-Event-ID"],
            max_age=600,
        )
    app.add_exception_handler(CollectionError, collection_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    app.include_router(collection.router)
    app.include_router(health.router)
    app.include_router(admin.console_router())
    return app
