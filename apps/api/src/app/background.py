"""Work the lifespan starts: start-up recovery (and, from plan 07 on, the run executor)."""

from __future__ import annotations

import logging

from app.errors import DatabaseUnavailable
from app.models import IncompleteRuns
from app.services.collection import CollectionService

logger = logging.getLogger(__name__)


async def collection_startup_recovery(
    service: CollectionService, log_limit: int = 50
) -> IncompleteRuns | None:
    """Find and log the runs a previous process left running or paused.

    Never blocks start-up on the database: if it is down, say so and start anyway; requests get 503
    until it is back.
    """
    try:
        return await service.resume_incomplete_runs(log_limit)
    except DatabaseUnavailable as exc:
        logger.error("start-up recovery skipped: %s", exc.message)
        return None
