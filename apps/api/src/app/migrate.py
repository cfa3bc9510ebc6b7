"""Apply supabase/migrations by the Supabase CLI's rules, recording them where `supabase db push` does,
so that this runner and the CLI agree both ways (`supabase migration list` shows what this applied, and
`supabase db push` finds nothing left to do; what the CLI pushed, this finds applied).

The CLI's rules (pkg/migration in supabase/cli), followed here with its own messages:
- a migration is a file `<digits>_<name>.sql` in `migrations/`; any other file is skipped, with a warning;
- files are applied in file-name order, each in one transaction with its record in
  `supabase_migrations.schema_migrations (version, statements, name)`;
- a file whose version sorts before the newest one applied is refused (unless `include_all`), and so
  is a database that has applied a version no file has;
- the seed (local mode only) is applied once, recorded in `supabase_migrations.seed_files (path, hash)`
  by its path and the SHA-256 of its bytes; a seed that changed later only has its hash updated.

Local mode also applies supabase/local/bootstrap.sql first (what a hosted project already has).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

logger = logging.getLogger(__name__)

MIGRATION_LOCK_KEY = 6_020_001  # pg_advisory_lock key: one migrator at a time per database
MIGRATION_FILE = re.compile(r"^([0-9]+)_(.*)\.sql$")  # the CLI's pattern (pkg/migration/file.go)
# Paths as the CLI prints and records them: relative to the project folder (the one holding supabase/).
MIGRATIONS_PATH = "supabase/migrations"
SEED_PATH = "supabase/seed.sql"

HISTORY_TABLE = """
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (version text not null primary key);
alter table supabase_migrations.schema_migrations add column if not exists statements text[];
alter table supabase_migrations.schema_migrations add column if not exists name text;
"""
SEED_TABLE = """
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.seed_files (
  path text not null primary key, hash text not null
);
"""


class MigrationRefused(RuntimeError):
    """The migrations cannot be applied as they are; the message says why and what to do."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def file_name(self) -> str:
        return self.path.name

    @property
    def project_path(self) -> str:
        return f"{MIGRATIONS_PATH}/{self.file_name}"


def migrations(supabase_dir: Path) -> list[Migration]:
    """The migration files, in the order they apply; a file the CLI would skip is skipped, with the
    CLI's warning."""
    folder = supabase_dir / "migrations"
    entries = sorted(folder.iterdir(), key=lambda p: p.name) if folder.is_dir() else []
    found = []
    for path in entries:
        if path.is_dir():
            continue
        match = MIGRATION_FILE.match(path.name)
        if match is None:
            logger.warning(
                'Skipping migration %s... (file name must match pattern "<timestamp>_name.sql")', path.name
            )
            continue
        found.append(Migration(match.group(1), match.group(2), path))
    versions = [m.version for m in found]
    duplicates = sorted({v for v in versions if versions.count(v) > 1})
    if duplicates:
        # The CLI would apply the first and fail on the second's record; refused here before either.
        raise MigrationRefused(f"two migration files share the version {', '.join(duplicates)}")
    return found


def pending(files: list[Migration], applied: set[str], include_all: bool = False) -> list[Migration]:
    """What `supabase db push` would apply now, or MigrationRefused with the CLI's own message.

    The CLI's walk (FindPendingMigrations): local files and applied versions side by side, both in
    order, versions compared as text."""
    remote = sorted(applied)
    older: list[Migration] = []
    unknown: list[str] = []
    i = j = 0
    while i < len(remote) and j < len(files):
        if remote[i] == files[j].version:
            i, j = i + 1, j + 1
        elif remote[i] < files[j].version:
            unknown.append(remote[i])
            i += 1
        else:
            older.append(files[j])
            j += 1
    if j == len(files):
        unknown.extend(remote[i:])
    if unknown:
        raise MigrationRefused(
            "Remote migration versions not found in local migrations directory.\n\n"
            "Make sure your local git repo is up-to-date. If the error persists, try repairing the "
            "migration history table:\n"
            f"supabase migration repair --status reverted {' '.join(unknown)}\n\n"
            "And update local migrations to match remote database:\n"
            "supabase db pull"
        )
    if older:
        if include_all:
            return older + files[len(remote) + len(older) :]
        raise MigrationRefused(
            "Found local migration files to be inserted before the last migration on remote database.\n\n"
            "Rerun the command with --include-all flag to apply these migrations:\n"
            + "\n".join(m.project_path for m in older)
        )
    return files[len(remote) :]


async def apply_migrations(
    conn: asyncpg.Connection,
    supabase_dir: Path,
    *,
    local_bootstrap: bool = False,
    seed: bool = False,
    include_all: bool = False,
) -> list[str]:
    """Apply what is not applied yet; return the versions applied now. A migration that fails is
    rolled back whole and raised as MigrationRefused naming its file and the database's error, on
    one line; so is any other failure of the database on the way."""
    files = migrations(supabase_dir)
    if not files:
        raise MigrationRefused(f"no migrations in {supabase_dir / 'migrations'}")
    try:
        await conn.execute("select pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            return await _apply_locked(conn, supabase_dir, files, local_bootstrap, seed, include_all)
        finally:
            if not conn.is_closed():
                await conn.execute("select pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise MigrationRefused(f"migrating failed: {_one_line(exc)}") from exc


async def _apply_locked(
    conn: asyncpg.Connection,
    supabase_dir: Path,
    files: list[Migration],
    local_bootstrap: bool,
    seed: bool,
    include_all: bool,
) -> list[str]:
    if local_bootstrap:
        bootstrap = supabase_dir / "local" / "bootstrap.sql"
        try:
            await conn.execute(bootstrap.read_text())
        except asyncpg.PostgresError as exc:
            raise MigrationRefused(f"{bootstrap} failed: {_one_line(exc)}") from exc
    try:
        rows = await conn.fetch("select version from supabase_migrations.schema_migrations")
    except asyncpg.UndefinedTableError:
        rows = []  # as the CLI reads it: no history table, nothing applied yet
    todo = pending(files, {r["version"] for r in rows}, include_all)
    if todo:
        await conn.execute(HISTORY_TABLE)
    for migration in todo:
        logger.info("Applying migration %s...", migration.file_name)
        sql = migration.path.read_text()
        # As the CLI does: no setting a previous migration left on the session reaches the next one.
        await conn.execute("reset all")
        try:
            async with conn.transaction():
                await conn.execute(sql)
                # The CLI stores the file split by its own SQL parser; here the file is one element.
                # `db push` and `migration list` read only the version.
                await conn.execute(
                    "insert into supabase_migrations.schema_migrations (version, name, statements) "
                    "values ($1, $2, array[$3])",
                    migration.version,
                    migration.name,
                    sql,
                )
        except asyncpg.PostgresError as exc:
            raise MigrationRefused(
                f"migration {migration.project_path} failed{_at_line(sql, exc)}: {_one_line(exc)}; "
                "rolled back, nothing of it applied"
            ) from exc
    if seed:
        await apply_seed(conn, supabase_dir / "seed.sql")
    return [m.version for m in todo]


async def apply_seed(conn: asyncpg.Connection, path: Path) -> None:
    """The seed once, as `supabase db push --include-seed` does it (and records it); a seed whose
    hash changed since is not run again, only its new hash recorded."""
    if not path.is_file():
        return
    content = path.read_bytes()
    digest = hashlib.sha256(content).hexdigest()  # of the bytes, as the CLI hashes it
    try:
        recorded = await conn.fetchval(
            "select hash from supabase_migrations.seed_files where path = $1", SEED_PATH
        )
    except asyncpg.UndefinedTableError:
        recorded = None
    if recorded == digest:
        logger.info("Seed files are up to date.")
        return
    await conn.execute(SEED_TABLE)
    async with conn.transaction():
        if recorded is None:
            logger.info("Seeding data from %s...", SEED_PATH)
            sql = content.decode()
            try:
                await conn.execute(sql)
            except asyncpg.PostgresError as exc:
                raise MigrationRefused(
                    f"seed {SEED_PATH} failed{_at_line(sql, exc)}: {_one_line(exc)}"
                ) from exc
        else:
            logger.info("Updating seed hash to %s...", SEED_PATH)
        await conn.execute(
            "insert into supabase_migrations.seed_files (path, hash) values ($1, $2) "
            "on conflict (path) do update set hash = excluded.hash",
            SEED_PATH,
            digest,
        )


def _at_line(sql: str, exc: asyncpg.PostgresError) -> str:
    """' at line N' of the file the error points into (Postgres gives a character position)."""
    position = getattr(exc, "position", None)
    if not position or not str(position).isdigit():
        return ""
    line = sql[: int(position) - 1].count("\n") + 1
    return f" at line {line}"


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.PostgresError):
        text = exc.message
        if exc.detail:
            text += f" ({exc.detail})"
        text += f" (SQLSTATE {exc.sqlstate})"
    else:
        text = str(exc) or type(exc).__name__
    return re.sub(r"\s*\n\s*", " ", text).strip()
