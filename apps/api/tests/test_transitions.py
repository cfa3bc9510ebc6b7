"""POST /collection/runs/{id}/start, /pause, /resume, /cancel: allowed and refused transitions."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest

from conftest import Actor, World, create_run

ACTIONS = ("start", "pause", "resume", "cancel")
STATUSES = ("pending", "running", "paused", "completed", "failed", "cancelled")
ALLOWED = {
    ("start", "pending"): "running",
    ("pause", "running"): "paused",
    ("resume", "paused"): "running",
    ("cancel", "pending"): "cancelled",
    ("cancel", "running"): "cancelled",
    ("cancel", "paused"): "cancelled",
}
REFUSED = [pair for pair in itertools.product(ACTIONS, STATUSES) if pair not in ALLOWED]


async def act(client: httpx.AsyncClient, actor: Actor, run_id: str, action: str) -> httpx.Response:
    return await client.post(f"/collection/runs/{run_id}/{action}", headers=actor.headers)


async def run_row(db: asyncpg.Pool, run_id: str) -> dict[str, Any]:
    row = await db.fetchrow("select * from collection_runs where id = $1", uuid.UUID(run_id))
    assert row is not None
    return dict(row)


async def events(db: asyncpg.Pool, run_id: str) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "select id, from_status, to_status, actor, reason, created_at from collection_run_events "
        "where run_id = $1 order by id",
        uuid.UUID(run_id),
    )
    return [dict(r) for r in rows]


async def run_in(client: httpx.AsyncClient, actor: Actor, db: asyncpg.Pool, status: str) -> str:
    """A run of `actor`'s org in `status`: by the API where it can, by SQL where only the executor can."""
    run_id: str = (await create_run(client, actor, ["a"]))["id"]
    path = {
        "pending": [],
        "running": ["start"],
        "paused": ["start", "pause"],
        "cancelled": ["cancel"],
        "completed": ["start"],
        "failed": ["start"],
    }[status]
    for action in path:
        response = await act(client, actor, run_id, action)
        assert response.status_code == 200, response.text
    if status in ("completed", "failed"):
        await db.execute(
            "update collection_runs set status = $2, completed_at = now() where id = $1",
            uuid.UUID(run_id),
            status,
        )
    assert (await run_row(db, run_id))["status"] == status
    return run_id


class TestAllowedTransitions:
    @pytest.mark.parametrize(("action", "from_status"), list(ALLOWED))
    async def test_allowed_transition_answers_ok_and_appends_one_event(
        self, client: httpx.AsyncClient, world: World, db, action: str, from_status: str
    ) -> None:
        admin = await world.admin()
        run_id = await run_in(client, admin, db, from_status)
        before = await events(db, run_id)

        response = await act(client, admin, run_id, action)

        to_status = ALLOWED[(action, from_status)]
        assert response.status_code == 200, response.text
        assert response.json() == {"ok": True, "status": to_status}
        assert (await run_row(db, run_id))["status"] == to_status
        after = await events(db, run_id)
        assert after[: len(before)] == before
        assert len(after) == len(before) + 1
        new = after[-1]
        assert (new["from_status"], new["to_status"], new["actor"]) == (from_status, to_status, admin.user_id)

    async def test_start_sets_started_at(self, client: httpx.AsyncClient, world: World, db) -> None:
        admin = await world.admin()
        run_id = await run_in(client, admin, db, "pending")
        assert (await run_row(db, run_id))["started_at"] is None
        before = datetime.now(UTC)

        response = await act(client, admin, run_id, "start")

        assert response.status_code == 200, response.text
        row = await run_row(db, run_id)
        assert row["status"] == "running"
        assert before <= row["started_at"] <= datetime.now(UTC)
        assert row["paused_at"] is None
        assert row["completed_at"] is None

    async def test_pause_sets_paused_at(self, client: httpx.AsyncClient, world: World, db) -> None:
        admin = await world.admin()
        run_id = await run_in(client, admin, db, "running")
        started_at = (await run_row(db, run_id))["started_at"]
        before = datetime.now(UTC)

        response = await act(client, admin, run_id, "pause")

        assert response.status_code == 200, response.text
        row = await run_row(db, run_id)
        assert row["status"] == "paused"
        assert before <= row["paused_at"] <= datetime.now(UTC)
        assert row["started_at"] == started_at
        assert row["completed_at"] is None

    async def test_resume_clears_paused_at_and_keeps_started_at(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.admin()
        run_id = await run_in(client, admin, db, "paused")
        paused = await run_row(db, run_id)
        assert paused["paused_at"] is not None

        response = await act(client, admin, run_id, "resume")

        assert response.status_code == 200, response.text
        row = await run_row(db, run_id)
        assert row["status"] == "running"
        assert row["paused_at"] is None
        assert row["started_at"] == paused["started_at"]
        assert row["completed_at"] is None

    @pytest.mark.parametrize("from_status", ["pending", "running", "paused"])
    async def test_cancel_sets_completed_at(
        self, client: httpx.AsyncClient, world: World, db, from_status: str
    ) -> None:
        admin = await world.admin()
        run_id = await run_in(client, admin, db, from_status)
        started_at = (await run_row(db, run_id))["started_at"]
        before = datetime.now(UTC)

        response = await act(client, admin, run_id, "cancel")

        assert response.status_code == 200, response.text
        row = await run_row(db, run_id)
        assert row["status"] == "cancelled"
        assert row["completed_at"] is not None
        assert before <= row["completed_at"] <= datetime.now(UTC)
        assert row["started_at"] == started_at

    async def test_full_lifecycle_is_logged_in_order(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.admin()
        run_id = (await create_run(client, admin, ["a"]))["id"]

        statuses = []
        for action in ("start", "pause", "resume", "pause", "resume", "cancel"):
            response = await act(client, admin, run_id, action)
            assert response.status_code == 200, response.text
            statuses.append(response.json()["status"])

        assert statuses == ["running", "paused", "running", "paused", "running", "cancelled"]
        logged = [(e["from_status"], e["to_status"], e["actor"]) for e in await events(db, run_id)]
        assert logged == [
            (None, "pending", admin.user_id),
            ("pending", "running", admin.user_id),
            ("running", "paused", admin.user_id),
            ("paused", "running", admin.user_id),
            ("running", "paused", admin.user_id),
            ("paused", "running", admin.user_id),
            ("running", "cancelled", admin.user_id),
        ]
        created_ats = [e["created_at"] for e in await events(db, run_id)]
        assert created_ats == sorted(created_ats)

    async def test_event_actor_is_the_caller_not_the_creator(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        creator = await world.admin("acme")
        colleague = await world.admin("acme")
        run_id = (await create_run(client, creator, ["a"]))["id"]

        response = await act(client, colleague, run_id, "start")

        assert response.status_code == 200, response.text
        last = (await events(db, run_id))[-1]
        assert (last["to_status"], last["actor"]) == ("running", colleague.user_id)
        assert (await run_row(db, run_id))["created_by"] == creator.user_id

    async def test_transition_leaves_other_runs_alone(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.admin()
        target = (await create_run(client, admin, ["a"]))["id"]
        bystander = (await create_run(client, admin, ["b"]))["id"]
        bystander_before = await run_row(db, bystander)

        response = await act(client, admin, target, "start")

        assert response.status_code == 200, response.text
        assert await run_row(db, bystander) == bystander_before
        assert len(await events(db, bystander)) == 1


class TestRefusedTransitions:
    @pytest.mark.parametrize(("action", "status"), REFUSED)
    async def test_refused_transition_is_400_and_changes_nothing(
        self, client: httpx.AsyncClient, world: World, db, action: str, status: str
    ) -> None:
        admin = await world.admin()
        run_id = await run_in(client, admin, db, status)
        row_before = await run_row(db, run_id)
        events_before = await db.fetch("select * from collection_run_events order by id")

        response = await act(client, admin, run_id, action)

        assert response.status_code == 400, response.text
        assert response.json() == {
            "detail": f"Cannot {action} a run that is {status}",
            "error": "invalid_transition",
        }
        assert await run_row(db, run_id) == row_before
        assert await db.fetch("select * from collection_run_events order by id") == events_before


class TestTransitionNotFound:
    @pytest.mark.parametrize("action", ACTIONS)
    @pytest.mark.parametrize(
        "run_id",
        [
            pytest.param(str(uuid.uuid4()), id="unknown-uuid"),
            pytest.param("not-a-uuid", id="malformed"),
            pytest.param("'; update collection_runs set status = 'running'; --", id="sql-looking"),
            pytest.param("a" * 5000, id="very-long"),
        ],
    )
    async def test_unknown_or_malformed_id_is_404(
        self, client: httpx.AsyncClient, world: World, db, action: str, run_id: str
    ) -> None:
        admin = await world.admin()
        existing = await run_in(client, admin, db, "running" if action in ("pause", "cancel") else "paused")
        row_before = await run_row(db, existing)
        events_before = await db.fetchval("select count(*) from collection_run_events")

        response = await act(client, admin, run_id, action)

        assert response.status_code == 404, response.text
        assert response.json()["error"] == "run_not_found"
        assert await run_row(db, existing) == row_before
        assert await db.fetchval("select count(*) from collection_run_events") == events_before

    @pytest.mark.parametrize("action", ACTIONS)
    async def test_other_orgs_run_is_404_and_untouched(
        self, client: httpx.AsyncClient, world: World, db, action: str
    ) -> None:
        acme = await world.admin("acme")
        globex = await world.admin("globex")
        from_status = {"start": "pending", "pause": "running", "resume": "paused", "cancel": "pending"}[
            action
        ]
        theirs = await run_in(client, globex, db, from_status)
        row_before = await run_row(db, theirs)
        events_before = await events(db, theirs)

        response = await act(client, acme, theirs, action)

        assert response.status_code == 404, response.text
        assert response.json()["error"] == "run_not_found"
        assert await run_row(db, theirs) == row_before
        assert await events(db, theirs) == events_before
