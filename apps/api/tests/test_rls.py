"""Row level security and grants, as Supabase clients meet them.

PostgREST runs each request in a transaction as role `anon` or `authenticated` with the caller's JWT
claims in `request.jwt.claims`; `connected_as` does the same on a connection of the test pool. Data is
made through the real API (so the rows are exactly what the service writes) and read back as the owner.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import asyncpg
import httpx
import pytest

from conftest import Actor, World, create_run

Role = Literal["anon", "authenticated", "service_role"]

# Tables the plan says members read; each has an org_id except organizations (its id).
MEMBER_READABLE = ["organizations", "collection_runs", "collection_settings", "collection_run_events"]
ORG_COLUMN = {"organizations": "id"}

# Pure helpers that CHECK constraints call: executable by anyone, harmless.
PUBLIC_HELPERS = {"collection_category_ids_valid"}


@asynccontextmanager
async def connected_as(
    db: asyncpg.Pool, role: Role, user_id: uuid.UUID | None = None, *, commit: bool = False
) -> AsyncIterator[asyncpg.Connection]:
    """One transaction as a Supabase client would run it; rolled back unless `commit`."""
    async with db.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute(f"set local role {role}")
            await conn.execute(
                "select set_config('request.jwt.claims', "
                "json_strip_nulls(json_build_object('sub', $1::uuid, 'role', $2::text))::text, true)",
                user_id,
                role,
            )
            yield conn
        except BaseException:
            await transaction.rollback()
            raise
        if commit:
            await transaction.commit()
        else:
            await transaction.rollback()


@dataclass
class Orgs:
    a: uuid.UUID
    b: uuid.UUID
    a_admin: Actor
    a_member: Actor
    b_admin: Actor
    outsider: uuid.UUID
    a_runs: list[str]
    b_runs: list[str]


@pytest.fixture
async def orgs(client: httpx.AsyncClient, world: World, db: asyncpg.Pool) -> Orgs:
    """Two orgs, each with settings, a started run and a pending one (so events too), and a member of
    org A with no API permissions, and a signed-up user in no org."""
    a_admin = await world.admin("acme")
    a_member = await world.member_only("acme")
    b_admin = await world.admin("globex")
    runs: dict[str, list[str]] = {}
    for admin in (a_admin, b_admin):
        assert (await client.get("/collection/settings", headers=admin.headers)).status_code == 200
        started = await create_run(client, admin, name="started")
        assert (
            await client.post(f"/collection/runs/{started['id']}/start", headers=admin.headers)
        ).status_code == 200
        runs[str(admin.org_id)] = [started["id"], (await create_run(client, admin, name="pending"))["id"]]
    assert await db.fetchval("select count(*) from collection_run_events") == 6
    return Orgs(
        a=a_admin.org_id,
        b=b_admin.org_id,
        a_admin=a_admin,
        a_member=a_member,
        b_admin=b_admin,
        outsider=await world.user(),
        a_runs=runs[str(a_admin.org_id)],
        b_runs=runs[str(b_admin.org_id)],
    )


async def org_ids_seen(conn: asyncpg.Connection, table: str) -> list[uuid.UUID]:
    rows = await conn.fetch(f"select {ORG_COLUMN.get(table, 'org_id')} as org from public.{table}")
    return [r["org"] for r in rows]


async def owner_count(db: asyncpg.Pool, table: str, org_id: uuid.UUID) -> int:
    count: int = await db.fetchval(
        f"select count(*) from public.{table} where {ORG_COLUMN.get(table, 'org_id')} = $1", org_id
    )
    return count


async def public_tables(db: asyncpg.Pool) -> list[str]:
    rows = await db.fetch(
        "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace "
        "where n.nspname = 'public' and c.relkind in ('r', 'p') order by 1"
    )
    return [r["relname"] for r in rows]


async def snapshot(db: asyncpg.Pool) -> dict[str, list[tuple[object, ...]]]:
    return {
        table: sorted((tuple(r) for r in await db.fetch(f"select * from public.{table}")), key=repr)
        for table in (
            "organizations",
            "memberships",
            "collection_settings",
            "collection_runs",
            "collection_run_events",
        )
    }


# --------------------------------------------------------------------------------------------------
# Reads
# --------------------------------------------------------------------------------------------------
class TestMembersRead:
    @pytest.mark.parametrize("table", MEMBER_READABLE)
    async def test_member_sees_all_of_their_org_and_none_of_another(
        self, db: asyncpg.Pool, orgs: Orgs, table: str
    ) -> None:
        async with connected_as(db, "authenticated", orgs.a_member.user_id) as conn:
            seen = await org_ids_seen(conn, table)
            assert set(seen) == {orgs.a}
            assert len(seen) == await owner_count(db, table, orgs.a)
            other = await conn.fetchval(
                f"select count(*) from public.{table} where {ORG_COLUMN.get(table, 'org_id')} = $1", orgs.b
            )
            assert other == 0
        assert await owner_count(db, table, orgs.b) > 0  # B's rows exist: hidden, not absent

    @pytest.mark.parametrize("table", MEMBER_READABLE)
    async def test_member_of_both_orgs_sees_both(
        self, db: asyncpg.Pool, world: World, orgs: Orgs, table: str
    ) -> None:
        await world.member(orgs.a_member.user_id, orgs.b, "member")
        async with connected_as(db, "authenticated", orgs.a_member.user_id) as conn:
            seen = await org_ids_seen(conn, table)
        assert set(seen) == {orgs.a, orgs.b}
        assert len(seen) == await owner_count(db, table, orgs.a) + await owner_count(db, table, orgs.b)

    @pytest.mark.parametrize("table", MEMBER_READABLE)
    async def test_user_without_membership_sees_nothing(
        self, db: asyncpg.Pool, orgs: Orgs, table: str
    ) -> None:
        async with connected_as(db, "authenticated", orgs.outsider) as conn:
            assert await org_ids_seen(conn, table) == []

    @pytest.mark.parametrize("table", MEMBER_READABLE)
    async def test_authenticated_without_sub_sees_nothing(
        self, db: asyncpg.Pool, orgs: Orgs, table: str
    ) -> None:
        async with connected_as(db, "authenticated", None) as conn:
            assert await org_ids_seen(conn, table) == []

    async def test_member_sees_only_their_own_memberships(self, db: asyncpg.Pool, orgs: Orgs) -> None:
        async with connected_as(db, "authenticated", orgs.a_member.user_id) as conn:
            rows = await conn.fetch("select user_id, org_id, role from public.memberships")
        assert [tuple(r) for r in rows] == [(orgs.a_member.user_id, orgs.a, "member")]

    async def test_no_org_scoped_table_shows_another_orgs_rows(self, db: asyncpg.Pool, orgs: Orgs) -> None:
        """Every table with an org_id or run_id column, including ones added after this test."""
        columns = await db.fetch(
            "select table_name, column_name from information_schema.columns "
            "where table_schema = 'public' and column_name in ('org_id', 'run_id') order by 1, 2"
        )
        assert {r["table_name"] for r in columns} >= {"collection_runs", "collection_run_events"}
        leaks = {}
        async with connected_as(db, "authenticated", orgs.a_member.user_id) as conn:
            for table, column in ((r["table_name"], r["column_name"]) for r in columns):
                if column == "org_id":
                    sql = f"select count(*) from public.{table} where org_id <> $1"
                    count = await conn.fetchval(sql, orgs.a)
                else:
                    sql = f"select count(*) from public.{table} where run_id = any($1::uuid[])"
                    count = await conn.fetchval(sql, [uuid.UUID(r) for r in orgs.b_runs])
                if count:
                    leaks[f"{table}.{column}"] = count
        assert leaks == {}

    async def test_row_level_security_is_enabled_on_every_public_table(self, db: asyncpg.Pool) -> None:
        rows = await db.fetch(
            "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "where n.nspname = 'public' and c.relkind in ('r', 'p') and not c.relrowsecurity"
        )
        assert [r["relname"] for r in rows] == []
        assert "collection_runs" in await public_tables(db)


class TestAnonymous:
    @pytest.mark.parametrize("table", [*MEMBER_READABLE, "memberships", "roles", "role_permissions"])
    async def test_anon_is_refused_outright(self, db: asyncpg.Pool, orgs: Orgs, table: str) -> None:
        """Not zero rows: anon holds no privilege on the tables at all, so a select is an error."""
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for table"):
            async with connected_as(db, "anon") as conn:
                await conn.fetch(f"select * from public.{table}")

    async def test_anon_has_no_privilege_on_any_public_table(self, db: asyncpg.Pool) -> None:
        rows = await db.fetch(
            "select c.relname, p.privilege from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "cross join unnest(array['SELECT','INSERT','UPDATE','DELETE','TRUNCATE','REFERENCES','TRIGGER']) "
            "  as p(privilege) "
            "where n.nspname = 'public' and c.relkind in ('r', 'p', 'v', 'm') "
            "  and has_table_privilege('anon', c.oid, p.privilege)"
        )
        assert [tuple(r) for r in rows] == []


# --------------------------------------------------------------------------------------------------
# Writes
# --------------------------------------------------------------------------------------------------
class TestClientsCannotWrite:
    @pytest.mark.parametrize(
        "statement",
        [
            "insert into public.collection_runs (org_id, name, category_ids, estimated_cost_cents, "
            "budget_cap_cents) values ($1, 'sneaky', array['a'], 0, 999999)",
            "update public.collection_runs set status = 'completed', budget_cap_cents = 999999 "
            "where org_id = $1",
            "delete from public.collection_runs where org_id = $1",
            "update public.collection_settings set budget_cap_cents = 999999 where org_id = $1",
            "insert into public.collection_run_events (run_id, org_id, to_status) "
            "select id, org_id, 'completed' from public.collection_runs where org_id = $1",
            "update public.memberships set role = 'admin' where org_id = $1",
            "delete from public.memberships where org_id = $1",
            "insert into public.role_permissions (role, permission_key) "
            "values ('member', 'admin.automation') on conflict do nothing returning $1::uuid",
        ],
        ids=[
            "insert-run",
            "update-run",
            "delete-run",
            "update-settings",
            "insert-event",
            "promote-self",
            "delete-membership",
            "grant-permission",
        ],
    )
    async def test_member_write_is_an_error_and_changes_nothing(
        self, db: asyncpg.Pool, orgs: Orgs, statement: str
    ) -> None:
        before = await snapshot(db)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            async with connected_as(db, "authenticated", orgs.a_member.user_id, commit=True) as conn:
                await conn.execute(statement, orgs.a)
        assert await snapshot(db) == before
        assert await db.fetchval("select count(*) from role_permissions where role = 'member'") == 0

    async def test_member_cannot_join_another_org(self, db: asyncpg.Pool, orgs: Orgs) -> None:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with connected_as(db, "authenticated", orgs.a_member.user_id, commit=True) as conn:
                await conn.execute(
                    "insert into public.memberships (user_id, org_id, role) values ($1, $2, 'admin')",
                    orgs.a_member.user_id,
                    orgs.b,
                )
        assert await db.fetchval("select count(*) from memberships where org_id = $1", orgs.b) == 1

    async def test_authenticated_holds_only_select_on_public_tables(self, db: asyncpg.Pool) -> None:
        rows = await db.fetch(
            "select c.relname, p.privilege from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "cross join unnest(array['INSERT','UPDATE','DELETE','TRUNCATE','REFERENCES','TRIGGER']) "
            "  as p(privilege) "
            "where n.nspname = 'public' and c.relkind in ('r', 'p', 'v', 'm') "
            "  and has_table_privilege('authenticated', c.oid, p.privilege)"
        )
        assert [tuple(r) for r in rows] == []


class TestEventLogIsAppendOnly:
    @pytest.mark.parametrize("who", ["owner", "service_role"])
    @pytest.mark.parametrize(
        "statement",
        [
            "update public.collection_run_events set to_status = 'completed' where org_id = $1",
            "delete from public.collection_run_events where org_id = $1",
        ],
        ids=["update", "delete"],
    )
    async def test_update_and_delete_raise_even_for_privileged_roles(
        self, db: asyncpg.Pool, orgs: Orgs, who: str, statement: str
    ) -> None:
        before = await snapshot(db)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            if who == "owner":
                await db.execute(statement, orgs.a)
            else:
                async with connected_as(db, "service_role", commit=True) as conn:
                    await conn.execute(statement, orgs.a)
        assert await snapshot(db) == before

    async def test_member_update_is_refused(self, db: asyncpg.Pool, orgs: Orgs) -> None:
        before = await snapshot(db)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with connected_as(db, "authenticated", orgs.a_member.user_id, commit=True) as conn:
                await conn.execute(
                    "update public.collection_run_events set reason = 'x' where org_id = $1", orgs.a
                )
        assert await snapshot(db) == before

    async def test_transitions_still_append(
        self, client: httpx.AsyncClient, db: asyncpg.Pool, orgs: Orgs
    ) -> None:
        started = orgs.a_runs[0]
        response = await client.post(f"/collection/runs/{started}/pause", headers=orgs.a_admin.headers)
        assert response.status_code == 200, response.text
        rows = await db.fetch(
            "select from_status, to_status, actor from collection_run_events where run_id = $1 order by id",
            uuid.UUID(started),
        )
        assert [tuple(r) for r in rows] == [
            (None, "pending", orgs.a_admin.user_id),
            ("pending", "running", orgs.a_admin.user_id),
            ("running", "paused", orgs.a_admin.user_id),
        ]

    async def test_deleting_an_organisation_cascades_through_its_events(
        self, db: asyncpg.Pool, orgs: Orgs
    ) -> None:
        b_events = await owner_count(db, "collection_run_events", orgs.b)
        assert await db.execute("delete from organizations where id = $1", orgs.a) == "DELETE 1"
        for table in ("collection_runs", "collection_run_events", "collection_settings", "memberships"):
            assert await owner_count(db, table, orgs.a) == 0, table
        assert await owner_count(db, "collection_run_events", orgs.b) == b_events == 3
        assert await owner_count(db, "collection_runs", orgs.b) == 2

    async def test_deleting_a_run_cascades_through_its_events(self, db: asyncpg.Pool, orgs: Orgs) -> None:
        run_id = uuid.UUID(orgs.a_runs[0])
        assert await db.execute("delete from collection_runs where id = $1", run_id) == "DELETE 1"
        assert await db.fetchval("select count(*) from collection_run_events where run_id = $1", run_id) == 0
        assert await owner_count(db, "collection_run_events", orgs.a) == 1  # the other run's creation


# --------------------------------------------------------------------------------------------------
# The SQL functions: the service's write path, closed to Supabase clients
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Function:
    name: str
    signature: str
    call: str  # a call with a typed NULL for every argument


async def public_functions(db: asyncpg.Pool) -> list[Function]:
    rows = await db.fetch(
        "select p.proname, p.oid::regprocedure::text as signature, "
        "       array(select format_type(t, null) from unnest(p.proargtypes) t) as arg_types "
        "from pg_proc p join pg_namespace n on n.oid = p.pronamespace "
        "where n.nspname = 'public' and p.prokind = 'f' and p.prorettype <> 'trigger'::regtype "
        "order by 1, 2"
    )
    return [
        Function(
            r["proname"],
            r["signature"],
            f"select public.{r['proname']}({', '.join(f'null::{t}' for t in r['arg_types'])})",
        )
        for r in rows
    ]


async def privilege_error(db: asyncpg.Pool, role: Role, function: Function) -> str | None:
    """Call `function` as `role` (rolled back); the permission error, if that is what happened."""
    try:
        async with connected_as(db, role) as conn:
            await conn.execute(function.call)
    except asyncpg.InsufficientPrivilegeError as exc:
        return str(exc)
    except asyncpg.PostgresError:
        return None  # got past the privilege check and failed on the NULL arguments: executable
    return None


class TestFunctionPrivileges:
    async def test_the_service_functions_are_found(self, db: asyncpg.Pool) -> None:
        names = {f.name for f in await public_functions(db)}
        assert {
            "collection_create_run",
            "collection_transition_run",
            "collection_get_settings",
            "collection_update_settings",
            "collection_list_runs",
            "collection_get_run",
            "collection_user_access",
        } <= names

    @pytest.mark.parametrize("role", ["anon", "authenticated"])
    async def test_clients_cannot_execute_any_function(
        self, db: asyncpg.Pool, orgs: Orgs, role: Role
    ) -> None:
        before = await snapshot(db)
        executable = []
        for function in await public_functions(db):
            if function.name in PUBLIC_HELPERS:
                continue
            error = await privilege_error(db, role, function)
            if error is None or "permission denied for function" not in error:
                executable.append(function.signature)
        assert executable == []
        assert await snapshot(db) == before

    async def test_service_role_can_execute_every_function(self, db: asyncpg.Pool) -> None:
        refused = {}
        for function in await public_functions(db):
            error = await privilege_error(db, "service_role", function)
            if error is not None:
                refused[function.signature] = error
        assert refused == {}

    async def test_service_role_drives_the_service_functions(self, db: asyncpg.Pool, orgs: Orgs) -> None:
        pending = uuid.UUID(orgs.a_runs[1])
        async with connected_as(db, "service_role", commit=True) as conn:
            settings = await conn.fetchrow(
                "select * from public.collection_update_settings($1, $2, null, null)", orgs.a, 1234
            )
            run = await conn.fetchrow(
                "select * from public.collection_transition_run($1, $2, 'cancel', $3, 'by service_role')",
                orgs.a,
                pending,
                orgs.a_admin.user_id,
            )
            fetched = await conn.fetchrow("select * from public.collection_get_run($1, $2)", orgs.a, pending)
            access = await conn.fetch("select * from public.collection_user_access($1)", orgs.a_admin.user_id)
        assert settings["budget_cap_cents"] == 1234
        assert run["status"] == fetched["status"] == "cancelled"
        assert [(a["org_id"], a["role"], list(a["permissions"])) for a in access] == [
            (orgs.a, "admin", ["admin.automation"])
        ]
        assert (
            await db.fetchval("select budget_cap_cents from collection_settings where org_id = $1", orgs.a)
            == 1234
        )
        event = await db.fetchrow(
            "select from_status, to_status, actor, reason from collection_run_events where run_id = $1 "
            "order by id desc limit 1",
            pending,
        )
        assert tuple(event) == ("pending", "cancelled", orgs.a_admin.user_id, "by service_role")
