"""The FastAPI application: lifespan (pool, services, start-up recovery), error handlers, routers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.auth import AccessCache, TokenVerifier
from app.background import collection_manager, collection_startup_recovery
from app.config import Settings, get_settings
from app.database import create_pool
from app.errors import CollectionError
from app.migrate import migrations
from app.observability import Metrics, RequestContextMiddleware
from app.providers import make_provider
from app.routers import admin as admin_router
from app.routers import collection as collection_router
from app.routers import health as health_router
from app.services.collection import CollectionService
from app.store import PostgresStore

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
    return JSONResponse(
        {"detail": exc.detail, "error": HTTP_ERROR_CODES.get(exc.status_code, "http_error")},
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "Internal server error", "error": "internal_error"}, status_code=500)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        http_client = httpx.AsyncClient()
        pool = await create_pool(settings)
        store = PostgresStore(
            pool, settings.db_acquire_timeout_s, [m.version for m in migrations(settings.supabase_dir)]
        )
        provider = make_provider(settings)
        service = CollectionService(store, settings.pricing, provider.name)
        if provider.name == "sandbox":
            logger.warning(
                "provider: SANDBOX (no OXYLABS_USERNAME/OXYLABS_PASSWORD): runs use a simulated catalogue "
                "and cost nothing real"
            )
        else:
            logger.info("provider: Oxylabs (%s)", settings.oxylabs_base_url)
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
    app.include_router(health_router.router)
    app.include_router(collection_router.router)
    app.include_router(admin_router.router)
    return app


app = create_app()
