"""The migration runner: what it records, that running it again is harmless, and that /readyz knows
when the database is behind the code."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from app.config import REPO_ROOT
from app.embedded import EmbeddedPostgres
from app.migrate import apply_migrations, migrations

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
