"""Resuming a run's event stream (GET /collection/runs/{id}/events): every event carries an SSE `id`, the
id of the last run event read so far, and a client that reconnects with `Last-Event-ID` gets the current
progress and only the transitions after that id, so a reconnect neither repeats nor loses a status change.

The run changes state (start, pause, resume, cancel through the API) while the stream is being read: the
stream ends when the run is cancelled.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from conftest import Actor, World, create_run

EVENT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Event:
    kind: str
    id: int | None  # None: the event had no `id:` line
    data: dict[str, Any]


class EventStream:
    """A run's event stream read event by event as the app sends it.

    httpx's ASGITransport hands a response over only once the app has sent all of it (for this stream:
    once the run has ended), so this calls the app itself, as a server would, and parses each chunk as it
    comes. Use as `async with EventStream(...) as stream`; leaving the block disconnects."""

    def __init__(self, app: FastAPI, run_id: str, headers: dict[str, str]) -> None:
        self.app = app
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": f"/collection/runs/{run_id}/events",
            "raw_path": f"/collection/runs/{run_id}/events".encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            "server": ("test", 80),
            "client": ("127.0.0.1", 50000),
        }
        self.requested = False
        self.disconnected = asyncio.Event()
        self.started: asyncio.Future[MutableMapping[str, Any]] = asyncio.get_running_loop().create_future()
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: the app ended the response
        self.buffer = ""
        self.ended = False
        self.status = 0
        self.content_type = ""
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventStream:
        self.task = asyncio.create_task(self.app(self.scope, self.receive, self.send))
        start = await asyncio.wait_for(asyncio.shield(self.started), EVENT_TIMEOUT_S)
        self.status = start["status"]
        self.content_type = dict(start.get("headers", [])).get(b"content-type", b"").decode()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.disconnected.set()
        assert self.task is not None
        try:
            await asyncio.wait_for(self.task, EVENT_TIMEOUT_S)
        finally:
            self.task.cancel()

    async def receive(self) -> dict[str, Any]:
        if not self.requested:
            self.requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.started.set_result(message)
        elif message["type"] == "http.response.body":
            await self.chunks.put(message.get("body", b""))
            if not message.get("more_body", False):
                await self.chunks.put(None)

    async def next_event(self) -> Event | None:
        """The next event, or None once the stream has ended."""
        while "\n\n" not in self.buffer:
            if self.ended:
                return None
            chunk = await asyncio.wait_for(self.chunks.get(), EVENT_TIMEOUT_S)
            if chunk is None:
                self.ended = True
            else:
                self.buffer += chunk.decode().replace("\r\n", "\n")
        block, self.buffer = self.buffer.split("\n\n", 1)
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue  # a keep-alive comment
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        if "data" not in fields:
            return await self.next_event()
        event_id = int(fields["id"]) if "id" in fields else None
        return Event(fields.get("event", "message"), event_id, json.loads(fields["data"]))

    async def next_transition(self) -> tuple[Event, list[Event]]:
        """Read on to the next transition: it, and every event read on the way (it included)."""
        read: list[Event] = []
        while (event := await self.next_event()) is not None:
            read.append(event)
            if event.kind == "transition":
                return event, read
        raise AssertionError(f"the stream ended without another transition: {read}")

    async def next_progress(self) -> tuple[Event, list[Event]]:
        read: list[Event] = []
        while (event := await self.next_event()) is not None:
            read.append(event)
            if event.kind == "progress":
                return event, read
        raise AssertionError(f"the stream ended without another progress event: {read}")

    async def rest(self) -> list[Event]:
        """Every event until the stream ends."""
        read: list[Event] = []
        while (event := await self.next_event()) is not None:
            read.append(event)
        return read


async def transition(client: httpx.AsyncClient, actor: Actor, run_id: str, action: str) -> None:
    response = await client.post(f"/collection/runs/{run_id}/{action}", headers=actor.headers)
    assert response.status_code == 200, response.text


async def run_events(db: asyncpg.Pool, run_id: str) -> list[tuple[int, str | None, str]]:
    rows = await db.fetch(
        "select id, from_status, to_status from public.collection_run_events where run_id = $1 order by id",
        run_id,
    )
    return [(r["id"], r["from_status"], r["to_status"]) for r in rows]


def steps(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.data["from_status"], e.data["to_status"]) for e in events if e.kind == "transition"]


class TestEventIds:
    async def test_every_event_has_the_id_of_the_last_run_event_read_so_far(
        self, app: FastAPI, client: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin()
        run = await create_run(client, admin)
        (created, _, _), *_ = await run_events(db, run["id"])

        async with EventStream(app, run["id"], admin.headers) as stream:
            assert stream.status == 200 and stream.content_type.startswith("text/event-stream")
            first, read = await stream.next_progress()
            # The creation event is no transition, but it was read: the first snapshot carries its id.
            assert (first.data["status"], first.id, read) == ("pending", created, [first])
            for action in ("start", "pause", "resume"):
                await transition(client, admin, run["id"], action)
                _, more = await stream.next_transition()
                read += more
            await transition(client, admin, run["id"], "cancel")
            read += await stream.rest()

        history = await run_events(db, run["id"])
        changes = history[1:]  # after the creation event
        assert [(f, t) for _, f, t in changes] == [
            ("pending", "running"),
            ("running", "paused"),
            ("paused", "running"),
            ("running", "cancelled"),
        ]
        assert steps(read) == [(f, t) for _, f, t in changes]
        assert [e.data["id"] for e in read if e.kind == "transition"] == [i for i, _, _ in changes]
        # A transition's id is its own; a snapshot's is that of the last event before it.
        last_seen = created
        for event in read:
            expected = event.data["id"] if event.kind == "transition" else last_seen
            assert event.id == expected, read
            last_seen = expected
        ids = [e.id for e in read if e.id is not None]
        assert len(ids) == len(read) and ids == sorted(ids), read
        assert (read[-1].kind, read[-1].data["status"]) == ("progress", "cancelled")


class TestLastEventId:
    async def test_a_reconnect_gets_only_the_transitions_after_the_id_it_names(
        self, app: FastAPI, client: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin()
        run = await create_run(client, admin)
        async with EventStream(app, run["id"], admin.headers) as stream:
            await stream.next_progress()
            await transition(client, admin, run["id"], "start")
            started, _ = await stream.next_transition()
        assert started.id is not None and steps([started]) == [("pending", "running")]
        # While nobody listens: changes the reconnect must bring.
        await transition(client, admin, run["id"], "pause")
        await transition(client, admin, run["id"], "resume")

        resumed_headers = {**admin.headers, "Last-Event-ID": str(started.id)}
        async with EventStream(app, run["id"], resumed_headers) as stream:
            assert stream.status == 200
            current, read = await stream.next_progress()
            assert current.data["status"] == "running"
            await transition(client, admin, run["id"], "cancel")
            read += await stream.rest()

        assert steps(read) == [("running", "paused"), ("paused", "running"), ("running", "cancelled")]
        assert all(e.id is not None and e.id > started.id for e in read), read
        history = await run_events(db, run["id"])
        assert [e.id for e in read if e.kind == "transition"] == [i for i, _, _ in history[2:]]
        ids = [e.id for e in read if e.id is not None]
        assert len(ids) == len(read) and ids == sorted(ids), read

    async def test_an_id_past_the_last_event_gets_progress_and_no_old_transition(
        self, app: FastAPI, client: httpx.AsyncClient, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin()
        run = await create_run(client, admin)
        await transition(client, admin, run["id"], "start")
        await transition(client, admin, run["id"], "pause")
        old = [i for i, _, _ in await run_events(db, run["id"])]
        beyond = max(old) + 1000

        async with EventStream(app, run["id"], {**admin.headers, "Last-Event-ID": str(beyond)}) as stream:
            assert stream.status == 200
            # Transitions come before the snapshot of the same read: none came first.
            first = await stream.next_event()
            assert first is not None
            assert (first.kind, first.data["status"], first.id) == ("progress", "paused", beyond)
            await transition(client, admin, run["id"], "cancel")
            read = [first, *await stream.rest()]

        assert not {e.data["id"] for e in read if e.kind == "transition"} & set(old), read
        assert (read[-1].kind, read[-1].data["status"]) == ("progress", "cancelled")

    @pytest.mark.parametrize("value", ["abc", "-1"])
    async def test_a_malformed_id_is_a_422_before_any_stream(
        self, app: FastAPI, client: httpx.AsyncClient, world: World, value: str
    ) -> None:
        admin = await world.admin()
        run = await create_run(client, admin)  # pending: a stream opened on it would not end
        async with EventStream(app, run["id"], {**admin.headers, "Last-Event-ID": value}) as stream:
            assert stream.status == 422
            assert stream.content_type.startswith("application/json")
            chunks = []
            while (chunk := await asyncio.wait_for(stream.chunks.get(), EVENT_TIMEOUT_S)) is not None:
                chunks.append(chunk)
        body = json.loads(b"".join(chunks))
        assert body["error"] == "validation_error"
        assert [e["loc"] for e in body["detail"]] == [["header", "Last-Event-ID"]]

    async def test_another_organisations_run_is_still_404(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        acme = await world.admin("acme")
        globex = await world.admin("globex")
        run = await create_run(client, acme)
        await transition(client, acme, run["id"], "start")

        response = await asyncio.wait_for(
            client.get(
                f"/collection/runs/{run['id']}/events", headers={**globex.headers, "Last-Event-ID": "0"}
            ),
            EVENT_TIMEOUT_S,
        )
        assert response.status_code == 404, response.text
        assert response.json()["error"] == "run_not_found"
