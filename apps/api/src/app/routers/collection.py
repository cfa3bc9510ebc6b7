"""The collection-run REST API. Thin: parse, one service call, return a model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Query, Request, status
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app.deps import Admin, Service
from app.models import (
    CollectionRunCreate,
    CollectionRunListResponse,
    CollectionRunResponse,
    CollectionRunStatus,
    CollectionSettingsResponse,
    CollectionSettingsUpdate,
    CostEstimate,
    ErrorResponse,
    EstimateRequest,
    ItemStatus,
    RunItemListResponse,
    RunProgress,
    RunTransitionResponse,
    SellerListResponse,
)

AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "Malformed request, or X-Org-Id needed to choose an organisation",
    },
    401: {"model": ErrorResponse, "description": "Missing, invalid or expired bearer token"},
    403: {"model": ErrorResponse, "description": "No `admin.automation` permission in the organisation"},
    503: {"model": ErrorResponse, "description": "Database unavailable; retry after `Retry-After`"},
}
ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorResponse"}
RUN_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "No such run in the caller's organisation"}
}
TRANSITION_RESPONSES: dict[int | str, dict[str, Any]] = {
    **RUN_NOT_FOUND,
    400: {"model": ErrorResponse, "description": "Transition not allowed from the run's status"},
}

# Routes are matched in the order they are declared (FastAPI tries each in turn), so the ones the
# console and integrations call most come first.
router = APIRouter(prefix="/collection", tags=["collection"], responses=AUTH_RESPONSES)


@router.get("/runs/{run_id}", response_model=CollectionRunResponse, responses=RUN_NOT_FOUND)
async def get_run(run_id: str, admin: Admin, service: Service) -> CollectionRunResponse:
    """One run of the organisation."""
    return await service.get_run(admin.org_id, run_id)


@router.get(
    "/runs",
    response_model=CollectionRunListResponse,
    responses={400: {"model": ErrorResponse, "description": "A `cursor` this API did not return"}},
)
async def list_runs(
    admin: Admin,
    service: Service,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    status: CollectionRunStatus | None = None,
    cursor: Annotated[
        str | None,
        Query(max_length=200, description="`next_cursor` of the previous page; `offset` is ignored then"),
    ] = None,
) -> CollectionRunListResponse:
    """The organisation's runs, newest first, optionally only those in one status."""
    return await service.list_runs(admin.org_id, limit, offset, status, cursor)


@router.post("/estimate", response_model=CostEstimate)
async def estimate(request: EstimateRequest, admin: Admin, service: Service) -> CostEstimate:
    """What a run over these categories would cost, against the organisation's budget."""
    return await service.estimate_cost(admin.org_id, request.category_ids)


@router.post(
    "/runs",
    status_code=status.HTTP_201_CREATED,
    response_model=CollectionRunResponse,
    responses={
        400: {"model": ErrorResponse, "description": "Estimated cost exceeds the budget cap"},
        429: {"model": ErrorResponse, "description": "Concurrent run limit reached"},
    },
)
async def create_run(request: CollectionRunCreate, admin: Admin, service: Service) -> CollectionRunResponse:
    """Create a pending run, refused if its estimate exceeds the budget cap or the org is at its limit."""
    return await service.create_run(admin.org_id, admin.user_id, request)


@router.get("/runs/{run_id}/items", response_model=RunItemListResponse, responses=RUN_NOT_FOUND)
async def list_run_items(
    run_id: str,
    admin: Admin,
    service: Service,
    status: ItemStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> RunItemListResponse:
    """The run's products in order (category, then best-seller rank), optionally by status."""
    return await service.list_items(admin.org_id, run_id, status, limit, offset)


@router.get("/sellers", response_model=SellerListResponse)
async def list_sellers(
    admin: Admin,
    service: Service,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> SellerListResponse:
    """eBay sellers found by the organisation's runs, most listings first."""
    return await service.list_sellers(admin.org_id, limit, offset)


@router.get("/settings", response_model=CollectionSettingsResponse)
async def get_settings(admin: Admin, service: Service) -> CollectionSettingsResponse:
    """The organisation's collection settings (created with defaults on first read)."""
    return await service.get_settings(admin.org_id)


async def existing_run_id(run_id: str, admin: Admin, service: Service) -> UUID:
    # Resolved before the stream opens, so an unknown run is a plain 404, not an empty stream.
    return (await service.get_run(admin.org_id, run_id)).id


@router.get(
    "/runs/{run_id}/events",
    response_class=EventSourceResponse,
    responses={
        # Errors come before the stream opens, as JSON like every other endpoint's.
        **{
            code: {
                "description": spec["description"],
                "content": {"application/json": {"schema": ERROR_SCHEMA}},
            }
            for code, spec in {**AUTH_RESPONSES, **RUN_NOT_FOUND}.items()
        },
        200: {"description": "`progress` and `transition` events until the run ends"},
    },
)
async def run_events(
    run_id: Annotated[UUID, Depends(existing_run_id)],
    admin: Admin,
    service: Service,
    request: Request,
    last_event_id: Annotated[
        int | None,
        Header(
            alias="Last-Event-ID",
            ge=0,
            le=2**63 - 1,  # an event id is a bigint
            description="The `id` of the last event received: the stream resumes after it (EventSource "
            "sends it when it reconnects)",
        ),
    ] = None,
) -> AsyncIterator[ServerSentEvent]:
    """Live progress of a run (Server-Sent Events): snapshots and every transition, until it ends.

    Every event's `id` is the id of the last transition sent so far, so a client that reconnects with
    `Last-Event-ID` gets the current progress and only the transitions after that one."""
    async for update, position in service.watch_run(
        admin.org_id, run_id, after_event_id=last_event_id or 0, stop=request.app.state.stopping
    ):
        kind = "progress" if isinstance(update, RunProgress) else "transition"
        yield ServerSentEvent(event=kind, data=update, id=str(position))


@router.post("/runs/{run_id}/start", response_model=RunTransitionResponse, responses=TRANSITION_RESPONSES)
async def start_run(run_id: str, admin: Admin, service: Service) -> RunTransitionResponse:
    """pending → running."""
    run = await service.start_run(admin.org_id, run_id, admin.user_id)
    return RunTransitionResponse(status=run.status)


@router.post("/runs/{run_id}/pause", response_model=RunTransitionResponse, responses=TRANSITION_RESPONSES)
async def pause_run(run_id: str, admin: Admin, service: Service) -> RunTransitionResponse:
    """running → paused."""
    run = await service.pause_run(admin.org_id, run_id, admin.user_id)
    return RunTransitionResponse(status=run.status)


@router.post("/runs/{run_id}/resume", response_model=RunTransitionResponse, responses=TRANSITION_RESPONSES)
async def resume_run(run_id: str, admin: Admin, service: Service) -> RunTransitionResponse:
    """paused → running."""
    run = await service.resume_run(admin.org_id, run_id, admin.user_id)
    return RunTransitionResponse(status=run.status)


@router.post("/runs/{run_id}/cancel", response_model=RunTransitionResponse, responses=TRANSITION_RESPONSES)
async def cancel_run(run_id: str, admin: Admin, service: Service) -> RunTransitionResponse:
    """pending, running or paused → cancelled."""
    run = await service.cancel_run(admin.org_id, run_id, admin.user_id)
    return RunTransitionResponse(status=run.status)


@router.patch("/settings", response_model=CollectionSettingsResponse)
async def update_settings(
    update: CollectionSettingsUpdate, admin: Admin, service: Service
) -> CollectionSettingsResponse:
    """Change some of the organisation's settings; fields left out stay as they are."""
    return await service.update_settings(admin.org_id, update)
