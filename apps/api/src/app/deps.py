"""The typed dependencies endpoints declare: `admin: Admin`, `service: Service`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.auth import CurrentUser, require_permission
from app.services.collection import CollectionService

require_admin = require_permission("admin.automation")


async def get_service(request: Request) -> CollectionService:
    """The service the lifespan built for this app."""
    service: CollectionService = request.app.state.service
    return service


Admin = Annotated[CurrentUser, Depends(require_admin)]
Service = Annotated[CollectionService, Depends(get_service)]
