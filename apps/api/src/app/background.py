"""Work the lifespan starts: start-up recovery, then the collection manager that runs the runs."""

from __future__ import annotations

import logging

import asyncpg

from app.config import Settings
from app.errors import DatabaseUnavailable
from app.executor import CollectionManager
from app.models import IncompleteRuns
from app.observability import Metrics
from app.providers.base import Provider
from app.services.collection import CollectionService

logger = logging.getLogger(__name__)


async def collection_startup_recovery(
    service: CollectionService, log_limit: int = 50, executing: bool = True
) -> IncompleteRuns | None:
    """Find and log the runs a previous process left running or paused.

    Never blocks start-up on the database: if it is down, say so and start anyway; requests get 503
    until it is back.
    """
    try:
        return await service.resume_incomplete_runs(log_limit, executing)
    except DatabaseUnavailable as exc:
        logger.error("start-up recovery skipped: %s", exc.message)
    except asyncpg.PostgresError as exc:
        # e.g. migrations not applied yet: /readyz says so; the process must still come up to say it.
        logger.error("start-up recovery skipped: %s: %s", type(exc).__name__, exc)
    return None


def collection_manager(
    service: CollectionService, provider: Provider, settings: Settings, metrics: Metrics | None = None
) -> CollectionManager:
    """Start claiming and executing running runs in this process; the lifespan stops it."""
    manager = CollectionManager(service, provider, settings, metrics)
    manager.start()
    return manager
