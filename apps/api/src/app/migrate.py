"""Apply supabase/migrations in order, recording them where the Supabase CLI does
(`supabase_migrations.schema_migrations`), so this runner and `supabase db push` agree.

Local mode also applies supabase/local/bootstrap.sql first (what a hosted project already has) and
supabase/seed.sql last (local data only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import asyncpg

logger = logging.getLogger(__name__)

MIGRATION_LOCK_KEY = 6_020_001  # pg_advisory_lock key: one migrator at a time per database


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path


def migrations(supabase_dir: Path) -> list[Migration]:
    found = []
    for path in sorted((supabase_dir / "migrations").glob("*.sql")):
        version, _, name = path.stem.partition("_")
        found.append(Migration(version, name, path))
    versions = [m.version for m in found]
    duplicates = sorted({v for v in versions if versions.count(v) > 1})
    if duplicates:
        # The Supabase CLI keys migrations by this prefix: two files with one version would clash.
        raise RuntimeError(f"two migration files share the version {', '.join(duplicates)}")
    return found


async def apply_migrations(
    conn: asyncpg.Connection, supabase_dir: Path, *, local_bootstrap: bool = False, seed: bool = False
) -> list[str]:
    """Apply what is not applied yet; return the versions applied now."""
    applied_now = []
    await conn.execute("select pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        if local_bootstrap:
            await conn.execute((supabase_dir / "local" / "bootstrap.sql").read_text())
        await conn.execute(
            """
            create schema if not exists supabase_migrations;
            create table if not exists supabase_migrations.schema_migrations (
              version text primary key, statements text[], name text
            );
            """
        )
        rows = await conn.fetch("select version from supabase_migrations.schema_migrations")
        done = {r["version"] for r in rows}
        for migration in migrations(supabase_dir):
            if migration.version in done:
                continue
            sql = migration.path.read_text()
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "insert into supabase_migrations.schema_migrations (version, name, statements) "
                    "values ($1, $2, array[$3])",
                    migration.version,
                    migration.name,
                    sql,
                )
            logger.info("applied migration %s_%s", migration.version, migration.name)
            applied_now.append(migration.version)
        if seed:
            await conn.execute((supabase_dir / "seed.sql").read_text())
    finally:
        await conn.execute("select pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied_now
