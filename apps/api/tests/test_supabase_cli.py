"""The real Supabase CLI (npm `supabase`, pinned below) and our migrator on the same databases: each
finds what the other applied, and both treat the CLI's rules (file names, order, unknown history) the
same way. Run on the session's server: the wheel's Postgres 18 by `make test`, Debian's 15 by
`make test-pg15` (where `db lint` can run: it needs plpgsql_check, which the wheel lacks).

The CLI is installed once into .tools/supabase-cli/ (git-ignored) with npm; it runs offline (no
telemetry, no update check), writes only into a temporary home, and each test works on a temporary copy
of supabase/ (the CLI may write supabase/.temp/ into its workdir) and on databases of its own.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from app.embedded import EmbeddedPostgres
from app.main import create_app
from app.migrate import SEED_PATH, MigrationRefused, apply_migrations, migrations
from conftest import REPO_ROOT, make_settings
from test_migrations import (
    BADLY_NAMED,
    NEXT_FILE,
    NEXT_SQL,
    OLDER_FILE,
    OLDER_SQL,
    SEEDED_ORG,
    SUPABASE_DIR,
    UNKNOWN_VERSION,
    applied_versions,
    command_env,
    copy_project,
    exists,
    run_collection_api,
    skip_warning,
)

SUPABASE_CLI_VERSION = "2.117.0"
CLI_DIR = REPO_ROOT / ".tools" / "supabase-cli"

if shutil.which("npm") is None:
    pytest.skip(
        f"npm is not on PATH: cannot install the Supabase CLI (npm supabase@{SUPABASE_CLI_VERSION})",
        allow_module_level=True,
    )

# The truncation in conftest needs the session pool (see test_migrations); the first test may also
# install the CLI.
pytestmark = [pytest.mark.usefixtures("db"), pytest.mark.timeout(300)]

FILES = migrations(SUPABASE_DIR)


def install_cli() -> Path:
    """The pinned CLI under .tools/supabase-cli/, installed by npm unless it is there already."""
    binary = CLI_DIR / "node_modules" / ".bin" / "supabase"
    manifest = CLI_DIR / "node_modules" / "supabase" / "package.json"
    CLI_DIR.mkdir(parents=True, exist_ok=True)
    with (CLI_DIR / ".install.lock").open("ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test sessions at once install it once
        if not (binary.exists() and json.loads(manifest.read_text())["version"] == SUPABASE_CLI_VERSION):
            installed = subprocess.run(
                ["npm", "install", "--exact", f"supabase@{SUPABASE_CLI_VERSION}", "--prefix", str(CLI_DIR)]
                + ["--no-audit", "--no-fund", "--loglevel=error"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=280,
                check=False,
            )
            assert installed.returncode == 0, f"npm could not install the Supabase CLI:\n{installed.stderr}"
    return binary


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


@dataclass
class SupabaseCli:
    binary: Path
    home: Path

    async def run(self, project: Path, *args: str) -> Ran:
        """`supabase <args>` on the project folder `project` (the copy holding supabase/)."""
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(self.home),
            "SUPABASE_HOME": str(self.home / ".supabase"),
            "SUPABASE_TELEMETRY_DISABLED": "1",
            "DO_NOT_TRACK": "1",
            "SUPABASE_NO_UPDATE_NOTIFIER": "1",
        }
        process = await asyncio.create_subprocess_exec(
            str(self.binary),
            *args,
            "--workdir",
            str(project),
            cwd=project,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,  # never a prompt
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode is not None
        return Ran(process.returncode, stdout.decode(), stderr.decode())

    async def push(self, project: Path, dsn: str, *flags: str) -> Ran:
        return await self.run(project, "db", "push", "--db-url", cli_url(dsn), "--yes", *flags)


def cli_url(dsn: str) -> str:
    # The servers here speak no TLS; the CLI insists on it unless told.
    return f"{dsn}?sslmode=disable"


@pytest.fixture(scope="session")
def supabase_cli(tmp_path_factory: pytest.TempPathFactory) -> SupabaseCli:
    return SupabaseCli(install_cli(), tmp_path_factory.mktemp("supabase-home"))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder whose supabase/ is a copy of the repository's."""
    return copy_project(tmp_path).parent


NewDatabase = Callable[[], Awaitable[str]]


@pytest.fixture
async def new_database(embedded_pg: EmbeddedPostgres) -> AsyncIterator[NewDatabase]:
    """Databases of this test's own in the session's server, each with what a hosted Supabase project
    has before any migration (supabase/local/bootstrap.sql)."""
    names: list[str] = []
    admin = await asyncpg.connect(embedded_pg.dsn)

    async def create() -> str:
        name = f"supabase_cli_{len(names)}_{os.urandom(6).hex()}"
        await admin.execute(f'create database "{name}"')
        names.append(name)
        dsn = embedded_pg.dsn.rsplit("/", 1)[0] + f"/{name}"
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute((SUPABASE_DIR / "local" / "bootstrap.sql").read_text())
        finally:
            await conn.close()
        return dsn

    try:
        yield create
    finally:
        for name in names:
            await admin.execute(f'drop database if exists "{name}" with (force)')
        await admin.close()


async def migrate(dsn: str, supabase_dir: Path, **options: bool) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return await apply_migrations(conn, supabase_dir, **options)
    finally:
        await conn.close()


async def fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def server_version(dsn: str) -> str:
    rows = await fetch(dsn, "show server_version")
    return str(rows[0][0])


async def seeded_org_exists(dsn: str) -> bool:
    rows = await fetch(dsn, "select 1 from public.organizations where slug = $1", SEEDED_ORG)
    return bool(rows)


async def delete_seeded_org(dsn: str) -> None:
    # What the seed inserted, gone: if either tool ran the seed again, it would be back.
    conn = await asyncpg.connect(dsn)
    try:
        assert (
            await conn.execute("delete from public.organizations where slug = $1", SEEDED_ORG) == "DELETE 1"
        )
    finally:
        await conn.close()


class TestDbPush:
    async def test_applies_every_migration_on_a_fresh_database(
        self, supabase_cli: SupabaseCli, project: Path, new_database: NewDatabase
    ) -> None:
        dsn = await new_database()

        ran = await supabase_cli.push(project, dsn)

        version = await server_version(dsn)
        assert ran.returncode == 0, f"Postgres {version}: {ran}"
        for migration in FILES:
            assert f"Applying migration {migration.file_name}..." in ran.stderr
        rows = await fetch(dsn, "select version, name from supabase_migrations.schema_migrations order by 1")
        assert [(r["version"], r["name"]) for r in rows] == [(m.version, m.name) for m in FILES], version


class TestBothWays:
    async def test_what_our_migrator_applied_the_cli_finds_applied(
        self, supabase_cli: SupabaseCli, project: Path, new_database: NewDatabase
    ) -> None:
        dsn = await new_database()
        await migrate(dsn, project / "supabase", seed=True)
        await delete_seeded_org(dsn)

        listed = await supabase_cli.run(
            project, "migration", "list", "--db-url", cli_url(dsn), "--output-format", "json"
        )
        assert listed.returncode == 0, listed
        rows = json.loads(listed.stdout)["migrations"]
        assert [(r["local"], r["remote"]) for r in rows] == [(m.version, m.version) for m in FILES]

        pushed = await supabase_cli.push(project, dsn, "--include-seed")
        assert pushed.returncode == 0, pushed
        # "Remote", or "Local" should the server's port be config.toml's db.port.
        assert "database is up to date." in pushed.stdout, pushed
        assert not await seeded_org_exists(dsn)

    async def test_what_the_cli_pushed_our_migrator_finds_applied(
        self, supabase_cli: SupabaseCli, project: Path, new_database: NewDatabase, tmp_path: Path
    ) -> None:
        dsn = await new_database()
        pushed = await supabase_cli.push(project, dsn, "--include-seed")
        assert pushed.returncode == 0, pushed
        assert f"Seeding data from {SEED_PATH}..." in pushed.stderr
        seed_hash = hashlib.sha256((project / "supabase" / "seed.sql").read_bytes()).hexdigest()
        seeds = await fetch(dsn, "select path, hash from supabase_migrations.seed_files")
        assert [(r["path"], r["hash"]) for r in seeds] == [(SEED_PATH, seed_hash)]
        await delete_seeded_org(dsn)

        env = command_env(DATABASE_URL=dsn, SUPABASE_DIR=str(project / "supabase"))
        result = await run_collection_api(env, tmp_path, "migrate")
        assert result.returncode == 0, result.stderr
        assert "the database is up to date" in result.stderr
        # The seed too (local mode's migrate): recorded by the CLI, so not run again.
        assert await migrate(dsn, project / "supabase", seed=True) == []
        assert not await seeded_org_exists(dsn)

        application = create_app(make_settings(dsn, tmp_path))
        async with application.router.lifespan_context(application):
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                response = await client.get("/readyz")
        assert response.status_code == 200, response.text
        assert response.json() == {"ready": True}


class TestDbLint:
    async def test_finds_no_error_in_the_schema(
        self, supabase_cli: SupabaseCli, project: Path, new_database: NewDatabase
    ) -> None:
        dsn = await new_database()
        await migrate(dsn, project / "supabase")
        if not await fetch(dsn, "select 1 from pg_available_extensions where name = 'plpgsql_check'"):
            pytest.skip(
                f"Postgres {await server_version(dsn)} has no plpgsql_check, which `supabase db lint` "
                "needs (the wheel's 18 lacks it): `make test-pg15` runs this on Debian's 15"
            )

        ran = await supabase_cli.run(project, "db", "lint", "--db-url", cli_url(dsn), "--fail-on", "error")

        assert ran.returncode == 0, ran
        assert "No schema errors found" in ran.stderr, ran


class TestTheSameRules:
    """Each scenario on two databases, one per tool: the same outcome, and our message is the CLI's."""

    async def test_a_badly_named_file_is_skipped_by_both(
        self,
        supabase_cli: SupabaseCli,
        project: Path,
        new_database: NewDatabase,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        for name, sql in BADLY_NAMED.items():
            (project / "supabase" / "migrations" / name).write_text(sql)
        by_cli, by_us = await new_database(), await new_database()

        ran = await supabase_cli.push(project, by_cli)
        with caplog.at_level(logging.WARNING, logger="app.migrate"):
            await migrate(by_us, project / "supabase")

        assert ran.returncode == 0, ran
        ours = [r.getMessage() for r in caplog.records if r.name == "app.migrate"]
        for name in BADLY_NAMED:
            assert skip_warning(name) in ran.stderr.splitlines(), ran
            assert skip_warning(name) in ours
        baseline = [m.version for m in FILES]
        assert await applied_versions(by_cli) == await applied_versions(by_us) == baseline
        assert not await exists(by_cli, "public.next_one")
        assert not await exists(by_us, "public.next_one")

    async def test_an_out_of_order_file_is_refused_by_both_and_applied_with_include_all(
        self, supabase_cli: SupabaseCli, project: Path, new_database: NewDatabase
    ) -> None:
        by_cli, by_us = await new_database(), await new_database()
        for dsn in (by_cli, by_us):
            await migrate(dsn, project / "supabase")
        (project / "supabase" / "migrations" / OLDER_FILE).write_text(OLDER_SQL)
        (project / "supabase" / "migrations" / NEXT_FILE).write_text(NEXT_SQL)

        ran = await supabase_cli.push(project, by_cli)
        with pytest.raises(MigrationRefused) as refused:
            await migrate(by_us, project / "supabase")

        assert ran.returncode == 1, ran
        assert str(refused.value) in ran.stderr, ran
        baseline = [m.version for m in FILES]
        assert await applied_versions(by_cli) == await applied_versions(by_us) == baseline

        ran = await supabase_cli.push(project, by_cli, "--include-all")
        await migrate(by_us, project / "supabase", include_all=True)

        assert ran.returncode == 0, ran
        assert await applied_versions(by_cli) == await applied_versions(by_us)
        assert len(await applied_versions(by_us)) == len(baseline) + 2
        for dsn in (by_cli, by_us):
            assert await exists(dsn, "public.older_one")
            assert await exists(dsn, "public.next_one")

    async def test_a_version_only_the_database_has_is_refused_by_both(
        self, supabase_cli: SupabaseCli, project: Path, new_database: NewDatabase
    ) -> None:
        dsn = await new_database()
        await migrate(dsn, project / "supabase")
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "insert into supabase_migrations.schema_migrations (version, name) values ($1, 'elsewhere')",
                UNKNOWN_VERSION,
            )
        finally:
            await conn.close()
        # A file waiting too (older than the unknown version): the unknown history is said first.
        (project / "supabase" / "migrations" / NEXT_FILE).write_text(NEXT_SQL)
        before = await applied_versions(dsn)

        ran = await supabase_cli.push(project, dsn)
        with pytest.raises(MigrationRefused) as refused:
            await migrate(dsn, project / "supabase")

        assert ran.returncode == 1, ran
        assert str(refused.value) in ran.stderr, ran
        assert await applied_versions(dsn) == before
        assert not await exists(dsn, "public.next_one")
