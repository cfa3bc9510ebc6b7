"""GET and PATCH /collection/settings: defaults on first read, partial updates, validation, per org."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest

from conftest import Actor, World

DEFAULTS = {"budget_cap_cents": 2500, "soft_warning_percent": 80, "max_concurrent_runs": 3}
FIELDS = tuple(DEFAULTS)


async def settings_row(db: asyncpg.Pool, actor: Actor) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await db.fetchrow(
        "select * from collection_settings where org_id = $1", actor.org_id
    )
    return row


def values_of(body: dict[str, Any] | asyncpg.Record) -> dict[str, Any]:
    return {name: body[name] for name in FIELDS}


class TestGetSettings:
    async def test_first_read_creates_the_defaults(self, client: httpx.AsyncClient, world: World, db) -> None:
        admin = await world.admin()
        assert await settings_row(db, admin) is None

        response = await client.get("/collection/settings", headers=admin.headers)

        assert response.status_code == 200, response.text
        assert values_of(response.json()) == DEFAULTS
        row = await settings_row(db, admin)
        assert row is not None
        assert values_of(row) == DEFAULTS

    async def test_second_read_returns_the_same_row(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.admin()
        first = await client.get("/collection/settings", headers=admin.headers)
        second = await client.get("/collection/settings", headers=admin.headers)

        assert first.status_code == second.status_code == 200
        assert values_of(second.json()) == values_of(first.json()) == DEFAULTS
        assert (
            await db.fetchval("select count(*) from collection_settings where org_id = $1", admin.org_id) == 1
        )

    async def test_read_returns_stored_values(self, client: httpx.AsyncClient, world: World, db) -> None:
        admin = await world.admin()
        await db.execute(
            "insert into collection_settings (org_id, budget_cap_cents, soft_warning_percent, "
            "max_concurrent_runs) values ($1, 12345, 55, 7)",
            admin.org_id,
        )

        response = await client.get("/collection/settings", headers=admin.headers)

        assert response.status_code == 200, response.text
        assert values_of(response.json()) == {
            "budget_cap_cents": 12345,
            "soft_warning_percent": 55,
            "max_concurrent_runs": 7,
        }


class TestUpdateSettings:
    @pytest.mark.parametrize(
        ("change", "expected"),
        [
            ({"budget_cap_cents": 10_000}, {**DEFAULTS, "budget_cap_cents": 10_000}),
            ({"soft_warning_percent": 50}, {**DEFAULTS, "soft_warning_percent": 50}),
            ({"max_concurrent_runs": 7}, {**DEFAULTS, "max_concurrent_runs": 7}),
            (
                {"budget_cap_cents": 1, "soft_warning_percent": 2, "max_concurrent_runs": 3},
                {"budget_cap_cents": 1, "soft_warning_percent": 2, "max_concurrent_runs": 3},
            ),
        ],
    )
    async def test_partial_update_keeps_other_fields(
        self, client: httpx.AsyncClient, world: World, db, change: dict[str, int], expected: dict[str, int]
    ) -> None:
        admin = await world.admin()

        response = await client.patch("/collection/settings", json=change, headers=admin.headers)

        assert response.status_code == 200, response.text
        assert values_of(response.json()) == expected
        row = await settings_row(db, admin)
        assert row is not None
        assert values_of(row) == expected

    async def test_successive_updates_accumulate(self, client: httpx.AsyncClient, world: World, db) -> None:
        admin = await world.admin()
        first = await client.patch(
            "/collection/settings", json={"budget_cap_cents": 9000}, headers=admin.headers
        )
        second = await client.patch(
            "/collection/settings", json={"soft_warning_percent": 60}, headers=admin.headers
        )

        assert first.status_code == second.status_code == 200
        expected = {"budget_cap_cents": 9000, "soft_warning_percent": 60, "max_concurrent_runs": 3}
        assert values_of(second.json()) == expected
        assert values_of(await settings_row(db, admin)) == expected
        read = await client.get("/collection/settings", headers=admin.headers)
        assert values_of(read.json()) == expected

    @pytest.mark.parametrize(
        "change",
        [
            {"budget_cap_cents": 0},
            {"soft_warning_percent": 0},
            {"soft_warning_percent": 100},
            {"max_concurrent_runs": 1},
        ],
    )
    async def test_boundary_values_are_accepted(
        self, client: httpx.AsyncClient, world: World, db, change: dict[str, int]
    ) -> None:
        admin = await world.admin()

        response = await client.patch("/collection/settings", json=change, headers=admin.headers)

        assert response.status_code == 200, response.text
        assert values_of(response.json()) == {**DEFAULTS, **change}
        assert values_of(await settings_row(db, admin)) == {**DEFAULTS, **change}

    @pytest.mark.parametrize(
        "body",
        [
            pytest.param({"budget_cap_cents": -1}, id="budget-negative"),
            pytest.param({"soft_warning_percent": -1}, id="percent-negative"),
            pytest.param({"soft_warning_percent": 101}, id="percent-over-100"),
            pytest.param({"max_concurrent_runs": 0}, id="max-runs-zero"),
            pytest.param({"max_concurrent_runs": -1}, id="max-runs-negative"),
            pytest.param({"budget_cap_cents": "5"}, id="budget-string"),
            pytest.param({"soft_warning_percent": "50"}, id="percent-string"),
            pytest.param({"max_concurrent_runs": "5"}, id="max-runs-string"),
            pytest.param({"budget_cap_cents": 1.5}, id="budget-float"),
            pytest.param({"soft_warning_percent": 1.5}, id="percent-float"),
            pytest.param({"max_concurrent_runs": 1.5}, id="max-runs-float"),
            pytest.param({"budget_cap_cents": True}, id="budget-bool"),
            pytest.param({"soft_warning_percent": False}, id="percent-bool"),
            pytest.param({"max_concurrent_runs": True}, id="max-runs-bool"),
            pytest.param({"budget_cap_cents": None}, id="budget-null"),
            pytest.param({"soft_warning_percent": None}, id="percent-null"),
            pytest.param({"max_concurrent_runs": None}, id="max-runs-null"),
            pytest.param({"budget_cap_cents": {}}, id="budget-object"),
            pytest.param({"max_concurrent_runs": [3]}, id="max-runs-list"),
            pytest.param(None, id="body-null"),
            pytest.param([], id="body-list"),
            pytest.param("budget", id="body-string"),
            pytest.param({"budget_cap": 100}, id="unknown-field"),
            pytest.param({"budget_cap_cents": 100, "org_id": "x"}, id="known-and-unknown-field"),
            pytest.param({"budget_cap_cents": 2**63}, id="budget-over-bigint"),
            pytest.param({"budget_cap_cents": 10**30}, id="budget-huge"),
            pytest.param({"budget_cap_cents": -(2**63) - 1}, id="budget-huge-negative"),
            pytest.param({"soft_warning_percent": 2**31}, id="percent-over-int"),
            pytest.param({"max_concurrent_runs": 2**31}, id="max-runs-over-int"),
            pytest.param({"max_concurrent_runs": 10**30}, id="max-runs-huge"),
            pytest.param({"budget_cap_cents": 100, "soft_warning_percent": 101}, id="valid-with-invalid"),
        ],
    )
    async def test_invalid_update_is_refused_and_changes_nothing(
        self, client: httpx.AsyncClient, world: World, db, body: Any
    ) -> None:
        admin = await world.admin()
        known = {"budget_cap_cents": 4321, "soft_warning_percent": 42, "max_concurrent_runs": 5}
        setup = await client.patch("/collection/settings", json=known, headers=admin.headers)
        assert setup.status_code == 200, setup.text
        before = await settings_row(db, admin)

        response = await client.patch("/collection/settings", json=body, headers=admin.headers)

        assert response.status_code == 422, response.text
        assert response.json()["error"] == "validation_error"
        after = await settings_row(db, admin)
        assert after is not None
        assert dict(after) == dict(before)  # updated_at included: nothing was written
        assert values_of(after) == known

    async def test_invalid_update_creates_no_row(self, client: httpx.AsyncClient, world: World, db) -> None:
        admin = await world.admin()

        response = await client.patch(
            "/collection/settings", json={"budget_cap_cents": -5}, headers=admin.headers
        )

        assert response.status_code == 422, response.text
        assert await settings_row(db, admin) is None


class TestSettingsArePerOrg:
    async def test_update_in_one_org_leaves_another_at_defaults(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        acme = await world.admin("acme")
        globex = await world.admin("globex")

        response = await client.patch(
            "/collection/settings", json={"budget_cap_cents": 99_999}, headers=acme.headers
        )
        assert response.status_code == 200, response.text

        other = await client.get("/collection/settings", headers=globex.headers)
        assert other.status_code == 200, other.text
        assert values_of(other.json()) == DEFAULTS
        assert values_of(await settings_row(db, globex)) == DEFAULTS
        assert (await settings_row(db, acme))["budget_cap_cents"] == 99_999

    async def test_two_admins_of_one_org_share_settings(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        first = await world.admin("acme")
        second = await world.admin("acme")

        await client.patch("/collection/settings", json={"max_concurrent_runs": 9}, headers=first.headers)
        response = await client.get("/collection/settings", headers=second.headers)

        assert response.status_code == 200, response.text
        assert response.json()["max_concurrent_runs"] == 9

    async def test_user_in_two_orgs_updates_the_org_named_by_header(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.actor("acme", "globex")

        response = await client.patch(
            "/collection/settings", json={"soft_warning_percent": 10}, headers=admin.headers_for("globex")
        )
        assert response.status_code == 200, response.text

        acme = await client.get("/collection/settings", headers=admin.headers_for("acme"))
        globex = await client.get("/collection/settings", headers=admin.headers_for("globex"))
        assert acme.json()["soft_warning_percent"] == 80
        assert globex.json()["soft_warning_percent"] == 10
        stored = await db.fetchval(
            "select soft_warning_percent from collection_settings where org_id = $1", admin.org_ids["globex"]
        )
        assert stored == 10
