"""The FastAPI application: lifespan (pool, services, start-up recovery), error handlers, routers."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.auth import AccessCache, TokenVerifier, document_guarded_operations
from app.background import collection_manager, collection_startup_recovery
from app.config import Settings, StoreMode, get_settings
from app.database import create_pool
from app.errors import CollectionError
from app.migrate import migrations
from app.observability import Metrics, RequestContextMiddleware, fastapi_telemetry
from app.providers import make_provider
from app.routers import admin as admin_router
from app.routers import collection as collection_router
from app.routers import health as health_router
from app.services.collection import CollectionService
from app.store import PostgresStore, Store

logger = logging.getLogger(__name__)

HTTP_ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


async def collection_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CollectionError)
    return JSONResponse(
        {"detail": exc.message, "error": exc.error}, status_code=exc.status_code, headers=exc.headers
    )


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
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
    if settings.store_mode is StoreMode.SUPABASE_REST:
        # Imported here: supabase-py takes most of a second to import, which the direct mode never needs.
        from app.store_rest import SupabaseRestStore

        logger.info("store: Supabase REST API at %s (supabase-py, service-role key)", settings.supabase_url)
        return await SupabaseRestStore.connect(settings, versions)
    logger.info(
        "store: Postgres through asyncpg (%s)",
        "transaction pooler" if settings.uses_transaction_pooler else "direct connection",
    )
    return PostgresStore(await create_pool(settings), settings.db_acquire_timeout_s, versions)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

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
        app.state.access_cache = AccessCache(store, settings.auth_cache_s)
        await collection_startup_recovery(service, settings.recovery_log_limit, settings.executor_enabled)
        manager = (
            collection_manager(store, provider, settings, metrics) if settings.executor_enabled else None
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
        version="0.6.2",
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
            allow_headers=["Authorization", "Content-Type", "X-Org-Id"],
            max_age=600,
        )
    app.add_exception_handler(CollectionError, collection_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    # The collection routes first: routes are matched in order, and they carry the traffic.
    for router in (collection_router.router, health_router.router, admin_router.router):
        add_routes(app, router)
    build_openapi = app.openapi
    app.openapi = lambda: document_guarded_operations(app.routes, build_openapi())  # type: ignore[method-assign]
    return app


def add_routes(app: FastAPI, router: APIRouter) -> None:
    """The router's routes, on the app's own router.

    `include_router` (in the FastAPI we pin) keeps each router as one nested route that works out its
    routes' effective settings while matching every request: ~30 µs of a `GET /runs/{id}`'s CPU
    (benchmarks/README.md). Our routers are complete as declared (their prefix, tags and responses are
    already in each route; no dependencies to merge), so their routes are added as they are. They are
    built once, without the app as their dependency-overrides provider: `app.dependency_overrides`
    does not reach them (nothing here uses overrides; tests run the real dependencies)."""
    app.router.routes.extend(router.routes)


app = create_app()
