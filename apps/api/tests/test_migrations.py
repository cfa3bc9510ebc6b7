"""The migration runner: what it records, that running it again is harmless, the Supabase CLI's rules
it follows (file names, order, history, seed), `collection-api migrate` as a command (also from an
installed wheel), and that /readyz knows when the database is behind the code.

tests/test_supabase_cli.py holds the same rules to the real CLI."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.config import Settings
from app.embedded import EmbeddedPostgres
from app.main import create_app
from app.migrate import SEED_PATH, MigrationRefused, apply_migrations, migrations
from conftest import REPO_ROOT, make_settings

# The autouse truncation in conftest needs the session pool already set up (it cannot set it up from
# inside the running event loop), so every test here asks for it.
pytestmark = pytest.mark.usefixtures("db")

SUPABASE_DIR = REPO_ROOT / "supabase"
SCHEMAS = ["public", "auth", "supabase_migrations"]

# Everything a migration (or the local bootstrap and seed) can create or change, with object ids so
# that a drop-and-recreate shows up even when the definition is the same.
FINGERPRINT_QUERIES = {
    "relations": """
        select n.nspname, c.relname, c.relkind, c.oid::int8, c.relacl::text, c.relrowsecurity
          from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = any($1) order by 1, 2""",
    "columns": """
        select table_schema, table_name, column_name, data_type, is_nullable, column_default
          from information_schema.columns where table_schema = any($1) order by 1, 2, ordinal_position""",
    "constraints": """
        select n.nspname, c.conname, c.conrelid::regclass::text, c.oid::int8, pg_get_constraintdef(c.oid)
          from pg_constraint c join pg_namespace n on n.oid = c.connamespace
         where n.nspname = any($1) order by 1, 2, 3""",
    "indexes": """
        select schemaname, indexname, indexdef from pg_indexes where schemaname = any($1) order by 1, 2""",
    "functions": """
        select n.nspname, p.proname, p.oid::int8, pg_get_function_identity_arguments(p.oid),
               pg_get_functiondef(p.oid), p.proacl::text
          from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname = any($1) and p.prokind = 'f' order by 1, 2, 4""",
    "triggers": """
        select t.tgname, t.oid::int8, pg_get_triggerdef(t.oid) from pg_trigger t
          join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = any($1) and not t.tgisinternal order by 1, 3""",
    "policies": """
        select * from pg_policies where schemaname = any($1) order by schemaname, tablename, policyname""",
    "schemas": "select nspname, oid::int8, nspacl::text from pg_namespace where nspname = any($1) order by 1",
}
DATA_QUERIES = {
    "migrations": "select version, name, md5(array_to_string(statements, '')) "
    "from supabase_migrations.schema_migrations order by version",
    "roles": "select * from public.roles order by key",
    "role_permissions": "select * from public.role_permissions order by role, permission_key",
    "transitions": "select * from public.collection_run_transitions order by action, from_status",
    "users": "select * from auth.users order by id",
    "organizations": "select * from public.organizations order by id",
    "memberships": "select * from public.memberships order by user_id, org_id",
    "database_roles": "select rolname, oid::int8, rolcanlogin, rolbypassrls, rolinherit from pg_roles "
    "where rolname in ('anon', 'authenticated', 'service_role') order by 1",
}


async def fingerprint(conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    found = {name: await conn.fetch(sql, SCHEMAS) for name, sql in FINGERPRINT_QUERIES.items()}
    found |= {name: await conn.fetch(sql) for name, sql in DATA_QUERIES.items()}
    return {name: [tuple(row.values()) for row in rows] for name, rows in found.items()}


@pytest.fixture
async def fresh_database(embedded_pg: EmbeddedPostgres) -> AsyncIterator[str]:
    """An empty database of its own in the session's Postgres."""
    name = f"migrations_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(embedded_pg.dsn)
    try:
        await admin.execute(f'create database "{name}"')
        yield embedded_pg.dsn.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f'drop database if exists "{name}" with (force)')
        await admin.close()


def copy_project(tmp_path: Path) -> Path:
    """A copy of the repository's supabase/ folder (`<tmp>/project/supabase`) for a scenario's files."""
    target = tmp_path / "project" / "supabase"
    shutil.copytree(SUPABASE_DIR, target, ignore=shutil.ignore_patterns(".temp", ".branches"))
    return target


async def bootstrap(dsn: str) -> None:
    """What a hosted Supabase project has before any migration (roles, auth.users, auth.uid())."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute((SUPABASE_DIR / "local" / "bootstrap.sql").read_text())
    finally:
        await conn.close()


async def applied_versions(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("select version from supabase_migrations.schema_migrations order by 1")
    finally:
        await conn.close()
    return [r["version"] for r in rows]


async def exists(dsn: str, relation: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval("select to_regclass($1) is not null", relation))
    finally:
        await conn.close()


def command_env(**values: str) -> dict[str, str]:
    """The outer environment without any setting of ours (no JWT secret or issuer, no SUPABASE_DIR),
    plus `values`."""
    ours = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in ours}
    return {**env, "PYTHONUNBUFFERED": "1", **values}


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


async def run_collection_api(env: dict[str, str], cwd: Path, *args: str) -> Finished:
    """`python -m app.cli <args>` (what the `collection-api` script runs) in `cwd`."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app.cli",
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
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
    return Finished(process.returncode, stdout.decode(), stderr.decode())


@pytest.fixture
async def restore_migration_rows(db: asyncpg.Pool) -> AsyncIterator[None]:
    """Put supabase_migrations.schema_migrations back as it was, whatever the test deleted."""
    rows = await db.fetch("select version, name, statements from supabase_migrations.schema_migrations")
    yield
    await db.executemany(
        "insert into supabase_migrations.schema_migrations (version, name, statements) values ($1, $2, $3) "
        "on conflict (version) do nothing",
        [(r["version"], r["name"], r["statements"]) for r in rows],
    )


class TestApplyMigrations:
    async def test_a_second_run_applies_nothing_and_changes_nothing(self, fresh_database: str) -> None:
        conn = await asyncpg.connect(fresh_database)
        try:
            first = await apply_migrations(conn, SUPABASE_DIR, local_bootstrap=True, seed=True)
            assert first == [m.version for m in migrations(SUPABASE_DIR)]
            after_first = await fingerprint(conn)

            # As `make run` does on every start, then as against a hosted project (no bootstrap, no seed).
            assert await apply_migrations(conn, SUPABASE_DIR, local_bootstrap=True, seed=True) == []
            assert await fingerprint(conn) == after_first
            assert await apply_migrations(conn, SUPABASE_DIR) == []
            assert await fingerprint(conn) == after_first
        finally:
            await conn.close()

    async def test_two_migrators_at_once_apply_each_version_once(self, fresh_database: str) -> None:
        conns = await asyncio.gather(*(asyncpg.connect(fresh_database) for _ in range(2)))
        try:
            applied = await asyncio.gather(
                *(apply_migrations(conn, SUPABASE_DIR, local_bootstrap=True) for conn in conns)
            )
            versions = await conns[0].fetch("select version from supabase_migrations.schema_migrations")
        finally:
            await asyncio.gather(*(conn.close() for conn in conns))

        expected = [m.version for m in migrations(SUPABASE_DIR)]
        assert sorted(applied, key=len) == [[], expected]
        assert sorted(r["version"] for r in versions) == expected

    async def test_recorded_versions_match_the_files(self, db: asyncpg.Pool) -> None:
        rows = await db.fetch(
            "select version, name, statements from supabase_migrations.schema_migrations order by version"
        )
        files = migrations(SUPABASE_DIR)
        assert files, "no migration files found"
        assert [(r["version"], r["name"]) for r in rows] == [(m.version, m.name) for m in files]
        for row, migration in zip(rows, files, strict=True):
            assert row["statements"] == [migration.path.read_text()]


class TestReadiness:
    async def test_ready_when_every_migration_is_applied(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/readyz")

        assert response.status_code == 200, response.text
        assert response.json()["ready"] is True

    async def test_not_ready_naming_the_missing_version(
        self, client: httpx.AsyncClient, db: asyncpg.Pool, restore_migration_rows: None
    ) -> None:
        missing = migrations(SUPABASE_DIR)[-1].version
        deleted = await db.execute(
            "delete from supabase_migrations.schema_migrations where version = $1", missing
        )
        assert deleted == "DELETE 1"

        response = await client.get("/readyz")

        assert response.status_code == 503
        body = response.json()
        assert body["ready"] is False
        assert missing in body["detail"]
        for other in migrations(SUPABASE_DIR)[:-1]:
            assert other.version not in body["detail"]

    async def test_not_ready_when_the_package_carries_no_migrations(
        self, migrated_dsn: str, tmp_path: Path
    ) -> None:
        empty = tmp_path / "supabase"
        (empty / "migrations").mkdir(parents=True)
        application = create_app(make_settings(migrated_dsn, tmp_path, supabase_dir=empty))
        async with application.router.lifespan_context(application):
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                response = await client.get("/readyz")

        assert response.status_code == 503
        body = response.json()
        assert body["ready"] is False
        assert "carries no migrations" in body["detail"]

    async def test_ready_again_once_the_version_is_back(
        self, client: httpx.AsyncClient, db: asyncpg.Pool
    ) -> None:
        version = migrations(SUPABASE_DIR)[0]
        row = await db.fetchrow(
            "delete from supabase_migrations.schema_migrations where version = $1 returning *",
            version.version,
        )
        try:
            assert (await client.get("/readyz")).status_code == 503
        finally:
            await db.execute(
                "insert into supabase_migrations.schema_migrations (version, name, statements) "
                "values ($1, $2, $3)",
                row["version"],
                row["name"],
                row["statements"],
            )

        response = await client.get("/readyz")

        assert response.status_code == 200, response.text
        assert response.json()["ready"] is True


# Files a scenario adds to its copy of supabase/: all after the baseline unless said otherwise.
OLDER_FILE = "20260101000000_older.sql"  # before the baseline's version
OLDER_SQL = "create table public.older_one (id int);\n"
NEXT_FILE = "20270101000000_next.sql"
NEXT_SQL = "create table public.next_one (id int);\n"
BADLY_NAMED = {
    "notes.sql": "this is not SQL and must never run\n",
    "20270101000000_next.sql.bak": NEXT_SQL,
    "V2__flyway_style.sql": NEXT_SQL,
}
UNKNOWN_VERSION = "20990101000000"


def skip_warning(name: str) -> str:
    """The Supabase CLI's own words for a file it does not take as a migration."""
    return f'Skipping migration {name}... (file name must match pattern "<timestamp>_name.sql")'


class TestTheCliRules:
    async def test_a_badly_named_file_is_skipped_with_the_clis_warning(
        self, tmp_path: Path, fresh_database: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        project = copy_project(tmp_path)
        for name, sql in BADLY_NAMED.items():
            (project / "migrations" / name).write_text(sql)
        (project / "migrations" / "20270101000001_a_folder.sql").mkdir()

        conn = await asyncpg.connect(fresh_database)
        try:
            with caplog.at_level(logging.WARNING, logger="app.migrate"):
                applied = await apply_migrations(conn, project, local_bootstrap=True)
        finally:
            await conn.close()

        assert applied == [m.version for m in migrations(SUPABASE_DIR)]
        warnings = [r.getMessage() for r in caplog.records if r.name == "app.migrate"]
        assert sorted(warnings) == sorted(skip_warning(name) for name in BADLY_NAMED)
        assert await applied_versions(fresh_database) == applied
        assert not await exists(fresh_database, "public.next_one")

    async def test_an_out_of_order_file_is_refused_and_applied_with_include_all(
        self, tmp_path: Path, fresh_database: str
    ) -> None:
        project = copy_project(tmp_path)
        conn = await asyncpg.connect(fresh_database)
        try:
            baseline = await apply_migrations(conn, project, local_bootstrap=True)
            (project / "migrations" / OLDER_FILE).write_text(OLDER_SQL)
            (project / "migrations" / NEXT_FILE).write_text(NEXT_SQL)

            with pytest.raises(MigrationRefused) as refused:
                await apply_migrations(conn, project)

            assert str(refused.value) == (
                "Found local migration files to be inserted before the last migration on remote database."
                "\n\nRerun the command with --include-all flag to apply these migrations:\n"
                f"supabase/migrations/{OLDER_FILE}"
            )
            assert await applied_versions(fresh_database) == baseline
            assert not await exists(fresh_database, "public.older_one")
            assert not await exists(fresh_database, "public.next_one")

            # As `supabase db push --include-all`: the older file first, then the rest in order.
            applied = await apply_migrations(conn, project, include_all=True)
        finally:
            await conn.close()
        older, newer = OLDER_FILE.split("_")[0], NEXT_FILE.split("_")[0]
        assert applied == [older, newer]
        assert await applied_versions(fresh_database) == sorted([*baseline, older, newer])
        assert await exists(fresh_database, "public.older_one")

    async def test_a_database_with_an_unknown_applied_version_is_refused(
        self, tmp_path: Path, fresh_database: str
    ) -> None:
        project = copy_project(tmp_path)
        conn = await asyncpg.connect(fresh_database)
        try:
            baseline = await apply_migrations(conn, project, local_bootstrap=True)
            await conn.execute(
                "insert into supabase_migrations.schema_migrations (version, name) values ($1, 'elsewhere')",
                UNKNOWN_VERSION,
            )
            (project / "migrations" / NEXT_FILE).write_text(NEXT_SQL)

            # Refused even with include_all, as the CLI does: the history is not this checkout's.
            for include_all in (False, True):
                with pytest.raises(MigrationRefused) as refused:
                    await apply_migrations(conn, project, include_all=include_all)
                assert str(refused.value) == (
                    "Remote migration versions not found in local migrations directory.\n\n"
                    "Make sure your local git repo is up-to-date. If the error persists, try repairing the "
                    "migration history table:\n"
                    f"supabase migration repair --status reverted {UNKNOWN_VERSION}\n\n"
                    "And update local migrations to match remote database:\nsupabase db pull"
                )
        finally:
            await conn.close()
        assert await applied_versions(fresh_database) == sorted([*baseline, UNKNOWN_VERSION])
        assert not await exists(fresh_database, "public.next_one")


SEEDED_ORG = "local"  # the organisation supabase/seed.sql inserts


async def seed_record(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    rows = await conn.fetch("select path, hash from supabase_migrations.seed_files order by path")
    return [(r["path"], r["hash"]) for r in rows]


class TestSeed:
    async def test_the_seed_is_applied_once_and_recorded(self, fresh_database: str) -> None:
        conn = await asyncpg.connect(fresh_database)
        try:
            await apply_migrations(conn, SUPABASE_DIR, local_bootstrap=True, seed=True)

            digest = hashlib.sha256((SUPABASE_DIR / "seed.sql").read_bytes()).hexdigest()
            assert await seed_record(conn) == [(SEED_PATH, digest)]
            assert SEED_PATH == "supabase/seed.sql"
            deleted = await conn.execute("delete from public.organizations where slug = $1", SEEDED_ORG)
            assert deleted == "DELETE 1"

            await apply_migrations(conn, SUPABASE_DIR, local_bootstrap=True, seed=True)

            # Not run again: what the seed inserted and someone deleted stays deleted.
            assert await conn.fetchval("select count(*) from public.organizations") == 0
            assert await seed_record(conn) == [(SEED_PATH, digest)]
        finally:
            await conn.close()

    async def test_a_changed_seed_only_has_its_hash_updated(
        self, tmp_path: Path, fresh_database: str
    ) -> None:
        project = copy_project(tmp_path)
        conn = await asyncpg.connect(fresh_database)
        try:
            await apply_migrations(conn, project, local_bootstrap=True, seed=True)
            seed = project / "seed.sql"
            seed.write_text(
                seed.read_text()
                + "insert into public.organizations (slug, name) values ('added', 'Added');\n"
            )

            await apply_migrations(conn, project, local_bootstrap=True, seed=True)

            slugs = await conn.fetch("select slug from public.organizations order by slug")
            assert [r["slug"] for r in slugs] == [SEEDED_ORG]
            assert await seed_record(conn) == [(SEED_PATH, hashlib.sha256(seed.read_bytes()).hexdigest())]
        finally:
            await conn.close()


BROKEN_FILE = "20270101000000_broken.sql"
HALF_DONE = "create table public.half_done (id int);\ninsert into public.half_done values (1);\n"
BROKEN = {
    # An error Postgres places in the file (a character position, said as its line).
    "missing-table": (
        HALF_DONE + "insert into public.no_such_table values (1);\n",
        'failed at line 3: relation "public.no_such_table" does not exist (SQLSTATE 42P01)',
    ),
    # An error with a detail over several lines, said on the same one line.
    "detail": (
        HALF_DONE + "do $$ begin raise exception 'not today' using detail = E'first\\nsecond'; end $$;\n",
        "failed: not today (first second) (SQLSTATE P0001)",
    ),
}


class TestMigrateCommand:
    @pytest.mark.parametrize("broken", BROKEN.keys())
    async def test_a_failing_migration_is_rolled_back_whole_and_reported_on_one_line(
        self, tmp_path: Path, fresh_database: str, broken: str
    ) -> None:
        sql, error = BROKEN[broken]
        project = copy_project(tmp_path)
        await bootstrap(fresh_database)
        (project / "migrations" / BROKEN_FILE).write_text(sql)

        # DATABASE_URL alone: no JWT secret, issuer or Supabase URL.
        env = command_env(DATABASE_URL=fresh_database, SUPABASE_DIR=str(project))
        result = await run_collection_api(env, tmp_path, "migrate")

        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("collection-api:")]
        assert errors == [
            f"collection-api: migration supabase/migrations/{BROKEN_FILE} {error}; rolled back, nothing of "
            "it applied"
        ], result.stderr
        # The baseline before it is applied; of the broken file, nothing (its table neither).
        assert await applied_versions(fresh_database) == [m.version for m in migrations(SUPABASE_DIR)]
        assert not await exists(fresh_database, "public.half_done")

    async def test_an_installed_package_applies_the_migrations_it_carries(
        self, tmp_path: Path, fresh_database: str
    ) -> None:
        uv = shutil.which("uv") or str(REPO_ROOT / ".tools" / "bin" / "uv")
        if not Path(uv).is_file():
            pytest.skip("no uv to build the wheel with (`make install` bootstraps one into .tools/)")
        built = subprocess.run(
            [uv, "build", "--wheel", "--out-dir", str(tmp_path / "dist"), str(REPO_ROOT)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert built.returncode == 0, built.stderr
        (wheel,) = (tmp_path / "dist").glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            expected = {f"app/supabase/migrations/{m.file_name}" for m in migrations(SUPABASE_DIR)}
            assert expected <= names, sorted(n for n in names if n.startswith("app/supabase/"))
            assert {"app/supabase/local/bootstrap.sql", "app/supabase/seed.sql"} <= names
            archive.extractall(tmp_path / "site")

        # The unpacked wheel first on the path, run from a folder outside the checkout.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        env = command_env(DATABASE_URL=fresh_database, PYTHONPATH=str(tmp_path / "site"))
        found = subprocess.run(
            [sys.executable, "-c", "import app.config; print(app.config.packaged('supabase'))"],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert Path(found.stdout.strip()) == tmp_path / "site" / "app" / "supabase"
        await bootstrap(fresh_database)

        result = await run_collection_api(env, elsewhere, "migrate")

        assert result.returncode == 0, result.stderr
        assert await applied_versions(fresh_database) == [m.version for m in migrations(SUPABASE_DIR)]
