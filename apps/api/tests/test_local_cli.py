"""`collection-api token` (behind `make token`): local mode only, on an embedded Postgres of its own data
folder, printing a token signed with that folder's secret as its last stdout line."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import jwt
import pytest

from app.config import Settings
from app.embedded import EmbeddedPostgres
from conftest import JWT_SECRET, REPO_ROOT, free_port

# The autouse truncation in conftest needs the session pool already set up (it cannot set it up from
# inside the running event loop), so every test here asks for it.
pytestmark = pytest.mark.usefixtures("db")

TOKEN_ARGS = ["--email", "x@y.test", "--org", "other", "--role", "member"]


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        lines = self.stdout.strip().splitlines()
        assert lines, f"nothing on stdout; stderr:\n{self.stderr}"
        return lines[-1]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def cli_env(data_dir: Path) -> dict[str, str]:
    # Nothing of ours from the outer environment (a DATABASE_URL there would switch local mode off).
    ours = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in ours}
    env.update(
        DATA_DIR=str(data_dir), EMBEDDED_PG_PORT=str(free_port()), APP_ENV="local", PYTHONUNBUFFERED="1"
    )
    return env


@pytest.fixture
def embedded(data_dir: Path, cli_env: dict[str, str]) -> Iterator[EmbeddedPostgres]:
    """The command's embedded Postgres, for the test to look inside; stopped at the end whatever happens."""
    pg = EmbeddedPostgres(data_dir, int(cli_env["EMBEDDED_PG_PORT"]))
    yield pg
    if pg.initialised() and pg.running():
        pg.stop("immediate")


async def run_cli(env: dict[str, str], *args: str) -> Finished:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app.cli",
        *args,
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Finished(process.returncode, stdout.decode(), stderr.decode())


def verify(token: str, data_dir: Path) -> dict[str, object]:
    secret = (data_dir / "jwt-secret").read_text().strip()
    claims: dict[str, object] = jwt.decode(token, secret, algorithms=["HS256"], audience="authenticated")
    return claims


class TestTokenCommand:
    async def test_prints_a_token_signed_with_the_data_folders_secret(
        self, cli_env: dict[str, str], data_dir: Path, embedded: EmbeddedPostgres
    ) -> None:
        result = await run_cli(cli_env, "token", *TOKEN_ARGS)

        assert result.returncode == 0, result.stderr
        claims = verify(result.last_line, data_dir)
        assert claims["email"] == "x@y.test"
        assert claims["aud"] == "authenticated"
        assert uuid.UUID(str(claims["sub"]))
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(result.last_line, JWT_SECRET, algorithms=["HS256"], audience="authenticated")
        # It started its Postgres for the occasion, so it stopped it again.
        assert embedded.initialised()
        assert not embedded.running()

    async def test_a_second_run_reuses_the_user_org_and_secret(
        self, cli_env: dict[str, str], data_dir: Path, embedded: EmbeddedPostgres
    ) -> None:
        first = await run_cli(cli_env, "token", *TOKEN_ARGS)
        assert first.returncode == 0, first.stderr
        secret = (data_dir / "jwt-secret").read_text()

        second = await run_cli(cli_env, "token", *TOKEN_ARGS)

        assert second.returncode == 0, second.stderr
        assert (data_dir / "jwt-secret").read_text() == secret
        first_claims, second_claims = verify(first.last_line, data_dir), verify(second.last_line, data_dir)
        assert first_claims["sub"] == second_claims["sub"]

        embedded.start()
        conn = await asyncpg.connect(embedded.dsn)
        try:
            users = await conn.fetch("select id from auth.users where email = 'x@y.test'")
            orgs = await conn.fetch("select id from public.organizations where slug = 'other'")
            memberships = await conn.fetch(
                "select m.user_id, m.role from public.memberships m "
                "join public.organizations o on o.id = m.org_id where o.slug = 'other'"
            )
        finally:
            await conn.close()
        assert [str(r["id"]) for r in users] == [first_claims["sub"]]
        assert len(orgs) == 1
        assert [(str(r["user_id"]), r["role"]) for r in memberships] == [(first_claims["sub"], "member")]

    async def test_refuses_when_a_database_url_is_set(
        self, cli_env: dict[str, str], data_dir: Path, migrated_dsn: str
    ) -> None:
        # Otherwise a valid server configuration: the only reason to refuse is that this is not local mode.
        server_env = {**cli_env, "DATABASE_URL": migrated_dsn, "SUPABASE_JWT_SECRET": JWT_SECRET}

        result = await run_cli(server_env, "token", *TOKEN_ARGS)

        assert result.returncode == 2, result.stderr
        assert result.stdout.strip() == ""
        assert "local mode only" in result.stderr, result.stderr
        # Refused before touching anything: no embedded Postgres, no secret.
        assert not (data_dir / "postgres").exists()
        assert not (data_dir / "jwt-secret").exists()
