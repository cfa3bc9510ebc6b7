"""Start-up recovery and database outages, through a real server process (`python -m app.cli serve`).

The runs a previous process left running or paused are logged at start-up (count, then each run's id,
name, status and whether it has a checkpoint). A server whose database is down still starts, answers
503 with a reason, and recovers by itself once the database is back, without a restart.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.embedded import EmbeddedPostgres
from app.migrate import apply_migrations
from app.models import CollectionRunCreate, CollectionSettingsUpdate
from app.services.collection import CollectionService
from conftest import JWT_ISSUER, JWT_SECRET, REPO_ROOT, World, free_port, sign_token

# The autouse truncation in conftest needs the session pool already set up (it cannot set it up from
# inside the running event loop), so every test here asks for it.
pytestmark = pytest.mark.usefixtures("db")

START_TIMEOUT_S = 30.0
RECOVER_TIMEOUT_S = 20.0


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = RECOVER_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


class Server:
    """`python -m app.cli serve` on a free port, its output in files (a full pipe cannot stall it)."""

    def __init__(self, database_url: str, log_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stdout_path = log_dir / f"server-{self.port}.out"
        self.stderr_path = log_dir / f"server-{self.port}.err"
        # Nothing of ours from the outer environment: only what this test sets.
        ours = {name.upper() for name in Settings.model_fields}
        self.env = {k: v for k, v in os.environ.items() if k.upper() not in ours}
        self.env.update(
            DATABASE_URL=database_url,
            SUPABASE_JWT_SECRET=JWT_SECRET,
            SUPABASE_JWT_ISSUER=JWT_ISSUER,
            PORT=str(self.port),
            HOST="127.0.0.1",
            LOG_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
            DB_CONNECT_TIMEOUT_S="2",
            DB_ACQUIRE_TIMEOUT_S="2",
            # Recovery is what is under test; the executor would go on to run the runs it finds.
            EXECUTOR_ENABLED="false",
        )
        self.env.update(env)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve"],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=out,
                stderr=err,
            )

    @property
    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    async def wait_until_healthy(self, http: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log}")
            try:
                if (await http.get(f"{self.url}/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not healthy after {START_TIMEOUT_S}s:\n{self.log}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        deadline = time.monotonic() + 10
        while self.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0) as client:
        yield client


@pytest.fixture
async def serve(tmp_path: Path, http: httpx.AsyncClient) -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    """Start a server and wait for /healthz; every server started is stopped at the end."""
    servers: list[Server] = []

    async def start(database_url: str, **env: str) -> Server:
        server = Server(database_url, tmp_path, **env)
        servers.append(server)
        server.start()
        await server.wait_until_healthy(http)
        return server

    try:
        yield start
    finally:
        await asyncio.gather(*(server.stop() for server in servers))


@pytest.fixture
def service(app: FastAPI) -> CollectionService:
    svc: CollectionService = app.state.service
    return svc


API_ACTIONS = ("start", "pause", "resume", "cancel")
PATH_TO = {
    "pending": [],
    "running": ["start"],
    "paused": ["start", "pause"],
    "cancelled": ["cancel"],
    "completed": ["start", "complete"],
}


async def leave_run(
    service: CollectionService, db: asyncpg.Pool, org_id: uuid.UUID, name: str, status: str, checkpoint: bool
) -> uuid.UUID:
    """A run as a previous process would have left it."""
    run = await service.create_run(org_id, None, CollectionRunCreate(name=name, category_ids=["electronics"]))
    for action in PATH_TO[status]:
        if action in API_ACTIONS:
            await getattr(service, f"{action}_run")(org_id, run.id, None)
        else:
            await db.execute("select public.collection_transition_run($1, $2, $3)", org_id, run.id, action)
    if checkpoint:
        # Where its executor had got to (collection_record_item writes it with each item).
        await db.execute(
            "update public.collection_runs set checkpoint = $2::jsonb where id = $1",
            run.id,
            '{"category_id": "electronics", "phase": "items", "last_asin": "B000000001"}',
        )
    return run.id


def line_about(log: str, run_id: uuid.UUID) -> str:
    lines = [line for line in log.splitlines() if str(run_id) in line]
    assert len(lines) == 1, f"expected one line about {run_id}, got {lines}\n{log}"
    return lines[0]


class TestStartupRecovery:
    async def test_interrupted_runs_are_logged_with_their_details(
        self,
        serve: Callable[..., Awaitable[Server]],
        service: CollectionService,
        db: asyncpg.Pool,
        world: World,
        migrated_dsn: str,
    ) -> None:
        acme, beta = await world.org("acme"), await world.org("beta")
        for org in (acme, beta):
            await service.update_settings(org, CollectionSettingsUpdate(max_concurrent_runs=100))
        interrupted = {
            await leave_run(service, db, acme, "Nightly electronics", "running", checkpoint=True): (
                "Nightly electronics",
                "running",
                "yes",
            ),
            await leave_run(service, db, acme, "Toys sweep", "running", checkpoint=False): (
                "Toys sweep",
                "running",
                "no",
            ),
            await leave_run(service, db, beta, "Garden on hold", "paused", checkpoint=True): (
                "Garden on hold",
                "paused",
                "yes",
            ),
            await leave_run(service, db, beta, "Books on hold", "paused", checkpoint=False): (
                "Books on hold",
                "paused",
                "no",
            ),
        }
        finished = [
            await leave_run(service, db, acme, "Queued", "pending", checkpoint=False),
            await leave_run(service, db, acme, "Done", "completed", checkpoint=True),
            await leave_run(service, db, beta, "Dropped", "cancelled", checkpoint=False),
        ]

        server = await serve(migrated_dsn)

        log = server.log
        assert re.search(r"\b4 interrupted run", log), log
        for run_id, (name, status, has_checkpoint) in interrupted.items():
            line = line_about(log, run_id)
            assert name in line
            assert re.search(rf"\bstatus\W+{status}\b", line), line
            assert re.search(rf"\bcheckpoint\W+{has_checkpoint}\b", line), line
        for run_id in finished:
            assert str(run_id) not in log
        assert not re.search(r"and \d+ more", log)

    async def test_beyond_the_log_limit_only_the_count_of_the_rest_is_logged(
        self,
        serve: Callable[..., Awaitable[Server]],
        service: CollectionService,
        db: asyncpg.Pool,
        world: World,
        migrated_dsn: str,
    ) -> None:
        org = await world.org("acme")
        await service.update_settings(org, CollectionSettingsUpdate(max_concurrent_runs=100))
        runs = [await leave_run(service, db, org, f"Run {i}", "running", checkpoint=False) for i in range(5)]

        server = await serve(migrated_dsn, RECOVERY_LOG_LIMIT="3")

        log = server.log
        assert re.search(r"\b5 interrupted run", log), log
        assert sum(str(run_id) in log for run_id in runs) == 3
        assert re.search(r"\band 2 more\b", log), log


@dataclass
class OwnDatabase:
    pg: EmbeddedPostgres
    admin_token: str
    org_id: uuid.UUID

    @property
    def dsn(self) -> str:
        return self.pg.dsn

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}


@asynccontextmanager
async def own_postgres(directory: Path) -> AsyncIterator[OwnDatabase]:
    """A second embedded Postgres, ours to stop and start, migrated, with one admin."""
    pg = EmbeddedPostgres(directory, free_port())
    pg.start()
    try:
        conn = await asyncpg.connect(pg.dsn)
        try:
            await apply_migrations(conn, REPO_ROOT / "supabase", local_bootstrap=True)
            user_id = uuid.uuid4()
            await conn.execute("insert into auth.users (id, email) values ($1, 'admin@own.test')", user_id)
            org_id = await conn.fetchval(
                "insert into public.organizations (slug, name) values ('own', 'own') returning id"
            )
            await conn.execute(
                "insert into public.memberships (user_id, org_id, role) values ($1, $2, 'admin')",
                user_id,
                org_id,
            )
        finally:
            await conn.close()
        yield OwnDatabase(pg, sign_token(user_id), org_id)
    finally:
        pg.stop("immediate")


@pytest.fixture(scope="module")
async def own_database(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[OwnDatabase]:
    async with own_postgres(tmp_path_factory.mktemp("own-postgres")) as own:
        yield own


@pytest.fixture
def own_db(own_database: OwnDatabase) -> Iterator[OwnDatabase]:
    """The module's own database, up at the start of each test and again after it."""
    if not own_database.pg.running():
        own_database.pg.start()
    yield own_database
    if not own_database.pg.running():
        own_database.pg.start()


async def assert_unavailable(http: httpx.AsyncClient, server: Server, own: OwnDatabase) -> None:
    ready = await http.get(f"{server.url}/readyz")
    assert ready.status_code == 503, ready.text
    assert ready.json()["ready"] is False
    assert isinstance(ready.json()["detail"], str) and ready.json()["detail"]

    api = await http.get(f"{server.url}/collection/settings", headers=own.headers)
    assert api.status_code == 503, api.text
    assert api.json()["error"] == "database_unavailable"
    assert api.json()["detail"]
    assert int(api.headers["Retry-After"]) > 0


async def assert_recovers(http: httpx.AsyncClient, server: Server, own: OwnDatabase) -> None:
    async def ready() -> bool:
        return (await http.get(f"{server.url}/readyz")).status_code == 200

    await eventually(ready, "/readyz to turn 200 once the database is back")
    settings = await http.get(f"{server.url}/collection/settings", headers=own.headers)
    assert settings.status_code == 200, settings.text
    created = await http.post(
        f"{server.url}/collection/runs", json={"category_ids": ["electronics"]}, headers=own.headers
    )
    assert created.status_code == 201, created.text
    conn = await asyncpg.connect(own.dsn)
    try:
        org_id = await conn.fetchval(
            "select org_id from public.collection_runs where id = $1", uuid.UUID(created.json()["id"])
        )
    finally:
        await conn.close()
    assert org_id == own.org_id
    assert server.process is not None and server.process.poll() is None, "the server must not have restarted"


class TestDatabaseOutage:
    async def test_starts_while_the_database_is_down_and_recovers_without_a_restart(
        self, serve: Callable[..., Awaitable[Server]], http: httpx.AsyncClient, own_db: OwnDatabase
    ) -> None:
        own_db.pg.stop("fast")

        server = await serve(own_db.dsn)

        assert (await http.get(f"{server.url}/healthz")).status_code == 200
        recovery_errors = [
            line for line in server.log.splitlines() if "recovery" in line.lower() and "ERROR" in line
        ]
        assert recovery_errors, server.log
        await assert_unavailable(http, server, own_db)

        own_db.pg.start()

        await assert_recovers(http, server, own_db)

    async def test_the_database_going_down_while_serving_gives_503_then_recovers(
        self, serve: Callable[..., Awaitable[Server]], http: httpx.AsyncClient, own_db: OwnDatabase
    ) -> None:
        server = await serve(own_db.dsn)
        assert (await http.get(f"{server.url}/readyz")).status_code == 200
        warm = await http.get(f"{server.url}/collection/settings", headers=own_db.headers)
        assert warm.status_code == 200, warm.text

        own_db.pg.stop("fast")

        await assert_unavailable(http, server, own_db)
        assert (await http.get(f"{server.url}/healthz")).status_code == 200

        own_db.pg.start()

        await assert_recovers(http, server, own_db)
