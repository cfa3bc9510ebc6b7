"""Postgres stopped (immediate shutdown, like a crash) while requests are flowing: requests get 503
with a JSON reason and Retry-After, the process stays up, /readyz turns false, and when Postgres is
back the service recovers by itself. Nothing that was acknowledged (201/200) is lost, and a run the
executor was working on goes on to complete."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from app.embedded import EmbeddedPostgres
from test_startup import Server, own_postgres


@pytest.fixture
async def own_pg(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedPostgres, str]]:
    async with own_postgres(tmp_path / "pg") as own:
        conn = await asyncpg.connect(own.dsn)
        try:
            await conn.execute(
                "insert into collection_settings (org_id, budget_cap_cents, max_concurrent_runs) "
                "values ($1, 1000000, 1000)",
                own.org_id,
            )
        finally:
            await conn.close()
        yield own.pg, own.admin_token


class TestOutageUnderLoad:
    async def test_acknowledged_writes_survive_and_the_service_recovers_by_itself(
        self, own_pg: tuple[EmbeddedPostgres, str], tmp_path: Path
    ) -> None:
        pg, token = own_pg
        headers = {"Authorization": f"Bearer {token}"}
        server = Server(
            pg.dsn,
            tmp_path,
            EXECUTOR_ENABLED="true",
            SANDBOX_LATENCY_MS="20",
            EXECUTOR_TICK_S="0.1",
            LEASE_TTL_S="5",
            DB_CONNECT_TIMEOUT_S="1",
            DB_ACQUIRE_TIMEOUT_S="1",
        )
        server.start()
        acknowledged: list[str] = []
        outcomes: Counter[int] = Counter()
        stop_writing = asyncio.Event()
        try:
            async with httpx.AsyncClient(timeout=10.0) as http:
                await server.wait_until_healthy(http)
                long_run = (
                    await http.post(
                        f"{server.url}/collection/runs", json={"category_ids": ["garden"]}, headers=headers
                    )
                ).json()
                assert (
                    await http.post(f"{server.url}/collection/runs/{long_run['id']}/start", headers=headers)
                ).status_code == 200

                async def writer(n: int) -> None:
                    i = 0
                    while not stop_writing.is_set():
                        i += 1
                        response = await http.post(
                            f"{server.url}/collection/runs",
                            json={"name": f"w{n}-{i}", "category_ids": ["toys"]},
                            headers=headers,
                        )
                        outcomes[response.status_code] += 1
                        if response.status_code == 201:
                            acknowledged.append(response.json()["id"])
                        else:
                            assert response.status_code == 503, response.text
                            assert response.json()["error"] == "database_unavailable"
                            assert int(response.headers["Retry-After"]) > 0
                        await asyncio.sleep(0.01)

                writers = [asyncio.create_task(writer(n)) for n in range(4)]
                await asyncio.sleep(1.0)
                pg.stop("immediate")  # a crash, not a polite shutdown
                down_at = time.monotonic()
                await asyncio.sleep(1.5)
                ready = await http.get(f"{server.url}/readyz")
                assert ready.status_code == 503 and ready.json()["ready"] is False
                assert (await http.get(f"{server.url}/healthz")).status_code == 200
                pg.start()
                while (await http.get(f"{server.url}/readyz")).status_code != 200:
                    assert time.monotonic() - down_at < 30, "did not recover"
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)
                stop_writing.set()
                await asyncio.gather(*writers)

                # The executor picks its run up again and finishes it, without a restart.
                deadline = time.monotonic() + 60
                while True:
                    run = (
                        await http.get(f"{server.url}/collection/runs/{long_run['id']}", headers=headers)
                    ).json()
                    if run["status"] == "completed":
                        break
                    assert time.monotonic() < deadline, run
                    await asyncio.sleep(0.2)
            assert server.process is not None and server.process.poll() is None, "the server must stay up"
        finally:
            await server.stop()

        assert outcomes[201] > 0 and outcomes[503] > 0, outcomes
        conn = await asyncpg.connect(pg.dsn)
        try:
            stored = {str(r["id"]) for r in await conn.fetch("select id from collection_runs")}
        finally:
            await conn.close()
        missing = [run_id for run_id in acknowledged if run_id not in stored]
        assert not missing, f"{len(missing)} acknowledged runs lost"
        assert run["processed_items"] == run["total_items"] and run["reserved_cents"] == 0
