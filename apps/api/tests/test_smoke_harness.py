"""The harness itself: a created run is visible through the API and in the database."""

from conftest import World, create_run


async def test_created_run_is_in_database(client, world: World, db) -> None:
    admin = await world.admin()
    run = await create_run(client, admin, ["a", "b"])
    row = await db.fetchrow(
        "select status, estimated_cost_cents from collection_runs where id = $1", run["id"]
    )
    assert row["status"] == "pending"
    assert row["estimated_cost_cents"] == 1000
