"""`collection-api serve | migrate | token`: the command line behind `make run` and `make token`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import jwt
from pydantic import SecretStr, ValidationError

from app.config import Settings, StoreMode
from app.embedded import EmbeddedPostgres
from app.migrate import MigrationRefused, apply_migrations
from app.observability import configure_logging

logger = logging.getLogger("app.cli")

LOCAL_ISSUER = "collection-api-local"


def _embedded(settings: Settings) -> EmbeddedPostgres:
    return EmbeddedPostgres(settings.data_dir, settings.embedded_pg_port)


async def _migrate(dsn: str, settings: Settings, *, local: bool, include_all: bool = False) -> list[str]:
    try:
        conn = await asyncpg.connect(dsn, timeout=settings.db_connect_timeout_s)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise MigrationRefused(f"cannot reach the database: {exc}") from exc
    try:
        return await apply_migrations(
            conn, settings.supabase_dir, local_bootstrap=local, seed=local, include_all=include_all
        )
    finally:
        await conn.close()


def prepare_local(settings: Settings) -> tuple[Settings, EmbeddedPostgres]:
    """Start (or reuse) the embedded Postgres, bring its schema up to date, and return settings
    that point at it and sign local tokens with this data folder's secret."""
    pg = _embedded(settings)
    started = time.perf_counter()
    dsn = pg.start()
    try:
        applied = asyncio.run(_migrate(dsn, settings, local=True))
    except BaseException:
        pg.release()
        raise
    logger.info(
        "embedded Postgres ready in %.2fs (%d migration(s) applied now)",
        time.perf_counter() - started,
        len(applied),
    )
    local = settings.model_copy(
        update={
            "database_url": SecretStr(dsn),
            "supabase_jwt_secret": SecretStr(pg.local_jwt_secret()),
            "supabase_jwt_issuer": LOCAL_ISSUER,
        }
    )
    return local, pg


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app

    pg: EmbeddedPostgres | None = None
    if settings.store_mode is StoreMode.EMBEDDED:
        settings, pg = prepare_local(settings)
        logger.info("local mode: embedded Postgres at 127.0.0.1:%d, local HS256 tokens", pg.port)
    # The lifespan logs the store it opens: DATABASE_URL (direct or pooler) or the Supabase REST API.
    try:
        app = create_app(settings)

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                # Before uvicorn waits for open connections: end the event streams, which would
                # otherwise keep it (and the executor, stopped only by the lifespan) going.
                stopping: asyncio.Event | None = getattr(app.state, "stopping", None)
                if stopping is not None:
                    stopping.set()
                super().handle_exit(sig, frame)

        Server(
            uvicorn.Config(
                app,
                host=settings.host,
                port=settings.port,
                log_level=settings.log_level.lower(),
                log_config=None,  # keep our handlers: one format, request ids, no tokens
                access_log=False,  # our middleware writes structured access lines instead
                proxy_headers=True,
                timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
            )
        ).run()
    finally:
        if pg is not None:
            pg.release()
    return 0


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    """Needs nothing but DATABASE_URL (or, in local mode, nothing at all): no token is verified here."""
    if settings.store_mode is StoreMode.SUPABASE_REST:
        print(
            "collection-api migrate needs DATABASE_URL; with only SUPABASE_URL and a key, apply "
            "supabase/migrations with `supabase link` and `supabase db push`",
            file=sys.stderr,
        )
        return 2
    if settings.database_url is None:
        # Local mode: the embedded Postgres, with the bootstrap and the seed.
        pg = _embedded(settings)
        dsn = pg.start()
        try:
            applied = asyncio.run(_migrate(dsn, settings, local=True, include_all=args.include_all))
        finally:
            pg.release()
    else:
        dsn = settings.database_url.get_secret_value()
        applied = asyncio.run(_migrate(dsn, settings, local=False, include_all=args.include_all))
    if applied:
        logger.info("%d migration(s) applied: %s", len(applied), ", ".join(applied))
    else:
        logger.info("the database is up to date")
    return 0


async def _ensure_local_identity(
    dsn: str, email: str, org_slug: str, role: str
) -> tuple[uuid.UUID, uuid.UUID, str]:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            user_id = await conn.fetchval(
                "insert into auth.users (id, email) values (gen_random_uuid(), $1) "
                "on conflict (email) do update set email = excluded.email returning id",
                email,
            )
            org_id = await conn.fetchval(
                "insert into public.organizations (slug, name) values ($1, $1) "
                "on conflict (slug) do update set slug = excluded.slug returning id",
                org_slug,
            )
            # An existing membership keeps its role: a token request never demotes or promotes.
            role = await conn.fetchval(
                "with added as (insert into public.memberships (user_id, org_id, role) values ($1, $2, $3) "
                "on conflict (user_id, org_id) do nothing returning role) "
                "select role from added union all "
                "select role from public.memberships where user_id = $1 and org_id = $2 limit 1",
                user_id,
                org_id,
                role,
            )
        return user_id, org_id, role
    finally:
        await conn.close()


def sign_local_token(secret: str, user_id: uuid.UUID, email: str, ttl_s: int) -> str:
    now = int(time.time())
    claims = {
        "sub": str(user_id),
        "email": email,
        "aud": "authenticated",
        "role": "authenticated",
        "iss": LOCAL_ISSUER,
        "iat": now,
        "exp": now + ttl_s,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    if settings.store_mode is not StoreMode.EMBEDDED or not settings.is_local:
        print(
            "collection-api token is for local mode only (no DATABASE_URL or SUPABASE_URL, APP_ENV=local)",
            file=sys.stderr,
        )
        return 2
    local, pg = prepare_local(settings)
    try:
        assert local.database_url is not None and local.supabase_jwt_secret is not None
        user_id, org_id, role = asyncio.run(
            _ensure_local_identity(local.database_url.get_secret_value(), args.email, args.org, args.role)
        )
    finally:
        pg.release()
    token = sign_local_token(local.supabase_jwt_secret.get_secret_value(), user_id, args.email, args.ttl)
    print(
        f"# {args.email} ({args.role} of org '{args.org}', id {org_id}); valid {args.ttl // 3600} h",
        file=sys.stderr,
    )
    print(token)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="collection-api", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve the API (local mode: on the embedded Postgres)")
    migrate = commands.add_parser(
        "migrate", help="apply supabase/migrations (local mode: with bootstrap and seed)"
    )
    migrate.add_argument(
        "--include-all",
        action="store_true",
        help="also apply files older than the newest migration applied (as `supabase db push --include-all`)",
    )
    token = commands.add_parser("token", help="print a bearer token for a local user (last line)")
    token.add_argument("--email", default="admin@local.test")
    token.add_argument("--org", default="local", help="organisation slug, created if missing")
    token.add_argument("--role", default="admin", choices=["admin", "member"])
    token.add_argument("--ttl", type=int, default=12 * 3600, help="seconds the token is valid")
    args = parser.parse_args(argv)

    try:
        settings = Settings()
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        print(f"collection-api: configuration refused: {reasons}", file=sys.stderr)
        return 2
    if args.command == "serve":
        try:
            settings.refuse_unverifiable_tokens()
        except ValueError as exc:
            print(f"collection-api: configuration refused: {exc}", file=sys.stderr)
            return 2
    configure_logging(settings.log_level, settings.log_format)
    handlers = {"serve": cmd_serve, "migrate": cmd_migrate, "token": cmd_token}
    try:
        return handlers[args.command](settings, args)
    except MigrationRefused as exc:
        print(f"collection-api: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
