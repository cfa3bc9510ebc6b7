"""The Supabase REST mode: configuration, what it sends, how PostgREST's errors map, its readiness.

The API contract itself runs in both modes (conftest's `store_mode`); this module covers what only the
REST mode has. Stores talk to the session's database, the REST one through tests/postgrest_bridge.py.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from fastapi import FastAPI
from pydantic import SecretStr, ValidationError

from app import operations as ops
from app.cli import main as cli_main
from app.config import Settings, StoreMode
from app.database import PostgresTransport, create_pool
from app.errors import (
    BudgetExceeded,
    CollectionError,
    ConcurrentRunLimit,
    ConstraintViolation,
    InvalidTransition,
    LeaseLost,
    RunNotFound,
)
from app.main import create_app
from app.migrate import migrations
from app.models import CollectionRunCreate, CollectionRunResponse, CollectionSettingsUpdate
from app.store import Store
from app.store_rest import RestStoreError, RestTransport
from conftest import JWT_SECRET, SERVICE_ROLE_KEY, World, create_run, free_port, make_settings
from postgrest_bridge import Answer, PostgrestBridge, error_body, http_status

# The autouse truncation needs the session pool set up before the test's loop runs.
pytestmark = pytest.mark.usefixtures("db")

URL = "https://abcdefghijklmnop.supabase.co"
ANON_KEY = jwt.encode({"role": "anon", "iss": "supabase"}, JWT_SECRET, algorithm="HS256")


@pytest.fixture
def bridge(postgrest_bridge: PostgrestBridge) -> Iterator[PostgrestBridge]:
    postgrest_bridge.reset()
    yield postgrest_bridge
    postgrest_bridge.reset()


def rest_settings(migrated_dsn: str, tmp_path: Path, url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": None,
        "supabase_url": url,
        "supabase_service_role_key": SecretStr(SERVICE_ROLE_KEY),
        **overrides,
    }
    return make_settings(migrated_dsn, tmp_path, **values)


@pytest.fixture
def open_app(migrated_dsn: str, tmp_path: Path) -> Callable[..., Any]:
    """An app in the REST mode on `url` (the bridge's unless said otherwise), lifespan run."""

    def opened(url: str, **overrides: Any) -> Any:
        app = create_app(rest_settings(migrated_dsn, tmp_path, url, **overrides))
        return app.router.lifespan_context(app), app

    return opened


@pytest.fixture
async def rest_app(bridge: PostgrestBridge, open_app: Callable[..., Any]) -> AsyncIterator[FastAPI]:
    context, app = open_app(bridge.url)
    async with context:
        yield app


async def client_for(app: FastAPI) -> httpx.AsyncClient:
    # As a server would: an unhandled error is the 500 the app sends, not an exception in the test.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


@pytest.fixture
async def rest_client(rest_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with await client_for(rest_app) as c:
        yield c


@pytest.fixture
async def pg_store(migrated_dsn: str, tmp_path: Path) -> AsyncIterator[Store]:
    settings = make_settings(migrated_dsn, tmp_path)
    transport = PostgresTransport(await create_pool(settings), 2.0)
    store = Store(transport, [m.version for m in migrations(settings.supabase_dir)])
    yield store
    await store.close()


@pytest.fixture
async def rest_store(bridge: PostgrestBridge, migrated_dsn: str, tmp_path: Path) -> AsyncIterator[Store]:
    settings = rest_settings(migrated_dsn, tmp_path, bridge.url)
    transport = await RestTransport.connect(settings)
    store = Store(transport, [m.version for m in migrations(settings.supabase_dir)])
    yield store
    await store.close()


async def new_run(
    store: Store,
    org_id: uuid.UUID,
    name: str = "r",
    categories: list[str] | None = None,
    cost: int = 500,
    items: int = 50,
    created_by: uuid.UUID | None = None,
) -> CollectionRunResponse:
    # The fields of the request model fill the function's remaining arguments, as in the service.
    request = CollectionRunCreate(name=name, category_ids=categories or ["garden"])
    return await store.call(
        ops.CREATE_RUN,
        request,
        org_id=org_id,
        created_by=created_by,
        name=name,
        estimated_cost_cents=cost,
        total_items=items,
        provider="sandbox",
    )


async def transition(
    store: Store, org_id: uuid.UUID, run_id: uuid.UUID, action: str
) -> CollectionRunResponse:
    return await store.call(
        ops.TRANSITION_RUN, org_id=org_id, run_id=run_id, action=action, actor=None, reason=None
    )


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused


# ----------------------------------------------------------------------------------------------------
class TestConfiguration:
    @pytest.fixture(autouse=True)
    def clean_environment(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        for name in Settings.model_fields:
            monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.chdir(tmp_path)  # no .env

    def settings(self, **values: Any) -> Settings:
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    def test_url_and_key_choose_the_rest_mode(self) -> None:
        settings = self.settings(supabase_url=URL, supabase_service_role_key=SERVICE_ROLE_KEY)
        assert settings.store_mode is StoreMode.SUPABASE_REST
        # Tokens are verified with the project's signing keys, from the same URL.
        assert settings.jwks_url == f"{URL}/auth/v1/.well-known/jwks.json"
        assert settings.jwt_issuer == f"{URL}/auth/v1"

    def test_database_url_wins_over_the_rest_settings(self) -> None:
        settings = self.settings(
            database_url="postgresql://u:p@db.example:5432/postgres",
            supabase_url=URL,
            supabase_service_role_key=SERVICE_ROLE_KEY,
        )
        assert settings.store_mode is StoreMode.POSTGRES

    def test_neither_is_the_embedded_database(self) -> None:
        assert self.settings().store_mode is StoreMode.EMBEDDED

    def test_a_secret_key_is_accepted(self) -> None:
        settings = self.settings(supabase_url=URL, supabase_service_role_key="sb_secret_abc123")
        assert settings.store_mode is StoreMode.SUPABASE_REST

    def test_production_accepts_the_rest_mode_without_a_database_url(self) -> None:
        settings = self.settings(
            app_env="production", supabase_url=URL, supabase_service_role_key=SERVICE_ROLE_KEY
        )
        assert settings.store_mode is StoreMode.SUPABASE_REST

    @pytest.mark.parametrize(
        ("values", "names"),
        [
            pytest.param({"supabase_url": URL}, "SUPABASE_SERVICE_ROLE_KEY", id="url-without-key"),
            pytest.param(
                {"supabase_service_role_key": SERVICE_ROLE_KEY}, "SUPABASE_URL", id="key-without-url"
            ),
            pytest.param(
                {
                    "supabase_url": "abcdefghijklmnop.supabase.co",
                    "supabase_service_role_key": SERVICE_ROLE_KEY,
                },
                "SUPABASE_URL must be an http(s) URL",
                id="url-without-scheme",
            ),
            pytest.param(
                {
                    "supabase_url": "ftp://abcdefghijklmnop.supabase.co",
                    "supabase_service_role_key": SERVICE_ROLE_KEY,
                },
                "SUPABASE_URL must be an http(s) URL",
                id="not-http",
            ),
            pytest.param(
                {"supabase_url": URL, "supabase_service_role_key": ANON_KEY}, "'anon'", id="anon-key"
            ),
            pytest.param(
                {"supabase_url": URL, "supabase_service_role_key": "sb_publishable_abc"},
                "publishable key",
                id="publishable-key",
            ),
            pytest.param(
                {"supabase_url": URL, "supabase_service_role_key": "not-a-key"},
                "service_role JWT",
                id="garbage",
            ),
        ],
    )
    def test_misconfiguration_is_refused_naming_the_setting(self, values: dict[str, Any], names: str) -> None:
        with pytest.raises(ValidationError) as refused:
            self.settings(**values)
        assert names in str(refused.value)

    def test_the_command_line_refuses_a_url_without_a_key_before_starting(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("SUPABASE_URL", URL)

        assert cli_main(["serve"]) == 2

        err = capsys.readouterr().err
        assert "configuration refused" in err and "SUPABASE_SERVICE_ROLE_KEY" in err
        assert "Traceback" not in err

    @pytest.mark.parametrize("command", ["migrate", "token"])
    def test_local_only_commands_refuse_the_rest_mode(
        self, command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("SUPABASE_URL", URL)
        monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", SERVICE_ROLE_KEY)
        monkeypatch.setenv("SUPABASE_JWT_SECRET", JWT_SECRET)

        assert cli_main([command]) == 2

        err = capsys.readouterr().err
        assert ("supabase db push" if command == "migrate" else "local mode only") in err


class TestLifespan:
    async def test_one_client_opened_at_start_logged_and_closed_at_shutdown(
        self, bridge: PostgrestBridge, open_app: Callable[..., Any], caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger="app.main")
        context, app = open_app(bridge.url)
        async with context:
            transport = app.state.store.transport
            assert isinstance(transport, RestTransport)
            assert f"store: Supabase REST API at {bridge.url}" in caplog.text
            assert not transport._http.is_closed
        assert transport._http.is_closed

    async def test_starts_while_the_api_is_unreachable_and_answers_503(
        self, open_app: Callable[..., Any], world: World
    ) -> None:
        admin = await world.admin()
        context, app = open_app(closed_port_url())
        async with context, await client_for(app) as client:
            assert (await client.get("/healthz")).status_code == 200
            response = await client.get("/collection/runs", headers=admin.headers)
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "database_unavailable"
        assert int(response.headers["Retry-After"]) > 0


class TestWhatTheAdapterSends:
    async def test_each_operation_is_one_rpc_with_named_arguments_and_the_service_key(
        self, rest_client: httpx.AsyncClient, bridge: PostgrestBridge, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin()
        bridge.reset()

        run = await create_run(rest_client, admin, ["garden", "kitchen"])

        calls = bridge.requests
        assert [c.function for c in calls] == [
            "collection_user_access",
            "collection_estimate_inputs",
            "collection_create_run",
        ]
        for call in calls:
            assert call.method == "POST" and call.path == f"/rest/v1/rpc/{call.function}"
            assert call.headers["apikey"] == SERVICE_ROLE_KEY
            assert call.headers["authorization"] == f"Bearer {SERVICE_ROLE_KEY}"
            assert call.headers["content-profile"] == "public"
        # Every argument the operation declares, by name (so none can land in another's place).
        assert list(calls[2].body) == [f"p_{name}" for name in ops.CREATE_RUN.args]
        assert (
            calls[2].body
            | {
                "p_org_id": str(admin.org_id),
                "p_created_by": str(admin.user_id),
                "p_name": run["name"],
                "p_category_ids": ["garden", "kitchen"],
                "p_estimated_cost_cents": 1000,
                "p_total_items": 100,
                "p_provider": "sandbox",
            }
            == calls[2].body
        )
        stored = await db.fetchval(
            "select category_ids from collection_runs where id = $1", uuid.UUID(run["id"])
        )
        assert stored == ["garden", "kitchen"]


# ----------------------------------------------------------------------------------------------------
async def outcome(call: Awaitable[Any]) -> tuple[type[BaseException], str] | tuple[str, Any]:
    try:
        return ("returned", await call)
    except CollectionError as exc:
        return type(exc), exc.message


class TestBothStoresAgree:
    """The same operation through asyncpg and through PostgREST: the same domain error, the same
    typed result."""

    @pytest.fixture
    async def org(self, world: World) -> uuid.UUID:
        return await world.org("acme")

    async def test_budget_exceeded(self, pg_store: Store, rest_store: Store, org: uuid.UUID) -> None:
        expected = (BudgetExceeded, "Estimated cost $30.00 exceeds budget cap $25.00")
        assert (
            await outcome(new_run(pg_store, org, "big", cost=3000))
            == await outcome(new_run(rest_store, org, "big", cost=3000))
            == expected
        )

    async def test_concurrent_run_limit(self, pg_store: Store, rest_store: Store, org: uuid.UUID) -> None:
        await pg_store.call(ops.UPDATE_SETTINGS, CollectionSettingsUpdate(max_concurrent_runs=1), org_id=org)
        await new_run(pg_store, org, "first")
        pg, rest = (
            await outcome(new_run(pg_store, org, "second")),
            await outcome(new_run(rest_store, org, "second")),
        )
        assert pg == rest and pg[0] is ConcurrentRunLimit

    async def test_run_not_found_and_invalid_transition(
        self, pg_store: Store, rest_store: Store, org: uuid.UUID
    ) -> None:
        run = await new_run(pg_store, org)
        for run_id, action, error in [
            (uuid.uuid4(), "start", RunNotFound),
            (run.id, "pause", InvalidTransition),
        ]:
            pg = await outcome(transition(pg_store, org, run_id, action))
            rest = await outcome(transition(rest_store, org, run_id, action))
            assert pg == rest and pg[0] is error
        assert rest[1] == "Cannot pause a run that is pending"

    async def test_lease_lost(self, pg_store: Store, rest_store: Store, org: uuid.UUID) -> None:
        run = await new_run(pg_store, org)
        args = {"run_id": run.id, "token": uuid.uuid4(), "category_id": "garden", "asin": None}
        pg, rest = (
            await outcome(pg_store.call(ops.GIVE_BACK_WORK, **args, calls_made=False)),
            await outcome(rest_store.call(ops.GIVE_BACK_WORK, **args, calls_made=False)),
        )
        assert pg == rest and pg[0] is LeaseLost

    async def test_check_violation_names_the_rule(
        self, pg_store: Store, rest_store: Store, org: uuid.UUID
    ) -> None:
        # Past the model's own bound, as a client of the database could send it.
        changes = CollectionSettingsUpdate.model_construct(budget_cap_cents=-1)
        pg, rest = (
            await outcome(pg_store.call(ops.UPDATE_SETTINGS, changes, org_id=org)),
            await outcome(rest_store.call(ops.UPDATE_SETTINGS, changes, org_id=org)),
        )
        assert (
            pg
            == rest
            == (ConstraintViolation, "The request breaks the rule collection_settings_budget_cap_cents_check")
        )

    async def test_an_unexpected_database_error_is_not_disguised(
        self, pg_store: Store, rest_store: Store, org: uuid.UUID
    ) -> None:
        args = {
            "run_id": uuid.uuid4(),
            "token": uuid.uuid4(),
            "category_id": "garden",
            "asin": "B0X",
            "status": "bogus",
            "attempts": 1,
            "cost_cents": 0,
            "result": None,
            "error": None,
            "sellers": [],
            "worker": "w",
            "max_failed_share": 0.5,
            "min_items": 20,
        }
        with pytest.raises(asyncpg.PostgresError):
            await pg_store.call(ops.RECORD_ITEM, **args)
        with pytest.raises(RestStoreError) as raised:
            await rest_store.call(ops.RECORD_ITEM, **args)
        assert raised.value.code == "22023"

    async def test_every_read_has_the_same_values_and_types(
        self, pg_store: Store, rest_store: Store, world: World
    ) -> None:
        admin = await world.admin("acme")
        run = await new_run(
            pg_store, admin.org_id, categories=["garden", "kitchen"], created_by=admin.user_id
        )
        await transition(pg_store, admin.org_id, run.id, "start")

        reads: list[tuple[ops.Operation[Any], dict[str, Any]]] = [
            (ops.GET_RUN, {"org_id": admin.org_id, "run_id": run.id}),
            (ops.GET_RUN, {"org_id": admin.org_id, "run_id": uuid.uuid4()}),
            (ops.USER_ACCESS, {"user_id": admin.user_id}),
            (ops.GET_SETTINGS, {"org_id": admin.org_id}),
            (ops.ESTIMATE_INPUTS, {"org_id": admin.org_id, "category_ids": ["garden"]}),
            (
                ops.LIST_RUNS,
                {
                    "org_id": admin.org_id,
                    "limit": 10,
                    "offset": 0,
                    "status": None,
                    "after_created_at": None,
                    "after_id": None,
                },
            ),
            (
                ops.LIST_RUNS,
                {
                    "org_id": admin.org_id,
                    "limit": 10,
                    "offset": 0,
                    "status": "running",
                    "after_created_at": run.created_at,
                    "after_id": uuid.uuid4(),
                },
            ),
            (
                ops.LIST_ITEMS,
                {"org_id": admin.org_id, "run_id": run.id, "status": None, "limit": 10, "offset": 0},
            ),
            (ops.LIST_SELLERS, {"org_id": admin.org_id, "limit": 10, "offset": 0}),
            (ops.RUN_EVENTS_SINCE, {"org_id": admin.org_id, "run_id": run.id, "after_id": 0, "limit": 10}),
            (ops.INCOMPLETE_RUNS, {"limit": 10}),
            (ops.RUN_STATUS_COUNTS, {}),
            (ops.APPLIED_MIGRATIONS, {}),
        ]
        for operation, args in reads:
            direct, rest = await pg_store.call(operation, **args), await rest_store.call(operation, **args)
            assert direct == rest, operation
        assert (await rest_store.call(ops.GET_RUN, org_id=admin.org_id, run_id=run.id)) == run.model_copy(
            update={
                "status": "running",
                "started_at": (
                    await pg_store.call(ops.GET_RUN, org_id=admin.org_id, run_id=run.id)
                ).started_at,  # type: ignore[union-attr]
            }
        )

    async def test_the_executor_calls_keep_their_shapes(
        self, rest_store: Store, pg_store: Store, org: uuid.UUID
    ) -> None:
        run = await new_run(pg_store, org)
        await transition(pg_store, org, run.id, "start")
        token = uuid.uuid4()

        rates = await rest_store.call(ops.CONFIGURE_RATES, rates={"provider": 50, "provider:rendered": 13})
        assert {r.name: r.per_s for r in rates} == {"provider": 50, "provider:rendered": 13}  # a set of rows
        view = await rest_store.call(ops.HEARTBEAT, owner="w1", token=token, lease_s=30)  # a JSON document
        assert view.executors == 1 and view.rates == pytest.approx(
            {"provider": 45.0, "provider:rendered": 11.7}
        )
        units = await rest_store.call(  # a table (here of one row: the run's only unit)
            ops.NEXT_WORK,
            owner="w1",
            token=token,
            lease_s=30,
            horizon_s=1.0,
            item_cents=10,
            discovery_cents=5,
            limit=4,
        )
        assert [(work.kind, work.run_id, work.category_id) for work in units] == [
            ("discovery", run.id, "garden")
        ]
        slot = await rest_store.call(ops.TAKE_SLOT, buckets=["provider"], horizon_s=1.0)  # OUT parameters
        assert slot.granted and 0 < slot.wait_s <= 1 / 45.0 + 0.01
        unit = {"run_id": run.id, "token": token, "category_id": "garden", "asin": None}
        assert await rest_store.call(ops.GIVE_BACK_WORK, **unit, calls_made=False) is None  # void: 204
        with pytest.raises(LeaseLost):  # given back: no longer this process's to record
            await rest_store.call(
                ops.RECORD_DISCOVERY,
                **{k: v for k, v in unit.items() if k != "asin"},
                products=[],
                cost_cents=5,
                error=None,
                estimated_per_category=50,
            )
        assert await rest_store.call(ops.RELEASE_WORK, token=token) is None
        after = await pg_store.call(ops.GET_RUN, org_id=org, run_id=run.id)
        assert after is not None and after.reserved_cents == 0 and after.actual_cost_cents == 0


# ----------------------------------------------------------------------------------------------------
UNAVAILABLE_ANSWERS = [
    pytest.param(Answer(503, error_body("PGRST000", "Could not connect with the database")), id="PGRST000"),
    pytest.param(
        Answer(503, error_body("PGRST001", "Database client error. Retrying the connection.")), id="PGRST001"
    ),
    pytest.param(
        Answer(503, error_body("PGRST002", "Could not query the database for the schema cache.")),
        id="PGRST002",
    ),
    pytest.param(
        Answer(504, error_body("PGRST003", "Timed out acquiring connection from connection pool.")),
        id="PGRST003",
    ),
    pytest.param(Answer(503, error_body("08006", "server closed the connection unexpectedly")), id="08006"),
    pytest.param(Answer(503, error_body("53300", "sorry, too many clients already")), id="53300"),
    pytest.param(
        Answer(500, error_body("57014", "canceling statement due to statement timeout")), id="57014"
    ),
    pytest.param(
        Answer(500, error_body("57P01", "terminating connection due to administrator command")), id="57P01"
    ),
    pytest.param(
        Answer(502, raw="<html><body>502 Bad Gateway</body></html>", content_type="text/html"), id="html-502"
    ),
    pytest.param(Answer(520, raw="error code: 520", content_type="text/plain"), id="cloudflare-520"),
    pytest.param(Answer(504), id="empty-504"),
    pytest.param(
        Answer(401, {"message": "Invalid API key", "hint": "Double check your key"}), id="gateway-401"
    ),
    pytest.param(Answer(401, error_body("PGRST301", "JWSError JWSInvalidSignature")), id="PGRST301"),
    pytest.param(Answer(403, error_body("42501", "permission denied for function x")), id="42501"),
    pytest.param(Answer(404, error_body("PGRST202", "Could not find the function")), id="PGRST202"),
]


class TestErrorMapping:
    @pytest.mark.parametrize("answer", UNAVAILABLE_ANSWERS)
    async def test_unavailability_is_503_with_retry_after(
        self, rest_client: httpx.AsyncClient, bridge: PostgrestBridge, world: World, answer: Answer
    ) -> None:
        admin = await world.admin()
        bridge.script("collection_get_settings", answer)

        response = await rest_client.get("/collection/settings", headers=admin.headers)

        assert response.status_code == 503, response.text
        assert response.json()["error"] == "database_unavailable"
        assert int(response.headers["Retry-After"]) > 0
        timed_out = answer.status == 504 or (answer.body is not None and answer.body.get("code") == "57014")
        assert ("did not answer in time" in response.json()["detail"]) is timed_out

    async def test_no_answer_in_time_is_503(
        self, bridge: PostgrestBridge, open_app: Callable[..., Any], world: World
    ) -> None:
        admin = await world.admin()
        context, app = open_app(bridge.url, db_statement_timeout_ms=100)  # reads wait 1.1 s
        bridge.script("collection_get_settings", Answer(200, {}, delay_s=3))
        async with context, await client_for(app) as client:
            response = await client.get("/collection/settings", headers=admin.headers)
        assert response.status_code == 503, response.text
        assert "did not answer in time" in response.json()["detail"]

    async def test_a_refused_key_is_503_and_logged_for_the_operator(
        self,
        bridge: PostgrestBridge,
        open_app: Callable[..., Any],
        world: World,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        admin = await world.admin()
        forged = jwt.encode({"role": "service_role"}, "another-project-secret-" + "y" * 20, algorithm="HS256")
        bridge.api_keys = bridge.api_keys | {forged}  # the gateway knows it; PostgREST cannot verify it
        try:
            context, app = open_app(bridge.url, supabase_service_role_key=SecretStr(forged))
            async with context, await client_for(app) as client:
                response = await client.get("/collection/runs", headers=admin.headers)
        finally:
            bridge.api_keys = bridge.api_keys - {forged}
        assert response.status_code == 503, response.text
        assert "refused this service's key" in caplog.text and "PGRST301" in caplog.text

    async def test_an_unexpected_error_is_a_plain_500_as_in_the_direct_mode(
        self, rest_client: httpx.AsyncClient, bridge: PostgrestBridge, world: World
    ) -> None:
        admin = await world.admin()
        bridge.script("collection_get_settings", Answer(400, error_body("22023", "invalid parameter value")))

        response = await rest_client.get("/collection/settings", headers=admin.headers)

        assert response.status_code == 500
        assert response.json() == {"detail": "Internal server error", "error": "internal_error"}

    async def test_domain_errors_keep_their_status_through_the_api(
        self, rest_client: httpx.AsyncClient, world: World
    ) -> None:
        admin = await world.admin()
        over = await rest_client.post(
            "/collection/runs", json={"category_ids": [f"c{n}" for n in range(6)]}, headers=admin.headers
        )
        assert over.status_code == 400 and over.json()["error"] == "budget_exceeded"
        missing = await rest_client.post(f"/collection/runs/{uuid.uuid4()}/start", headers=admin.headers)
        assert missing.status_code == 404 and missing.json()["error"] == "run_not_found"

    @pytest.mark.parametrize(
        ("sqlstate", "role", "status"),
        [
            ("CR001", "service_role", 400),
            ("23514", "service_role", 400),
            ("P0001", "service_role", 400),
            ("42501", "anon", 401),
            ("42501", "service_role", 403),
            ("42883", "service_role", 404),
            ("23505", "service_role", 409),
            ("53300", "service_role", 503),
            ("53400", "service_role", 500),
            ("57014", "service_role", 500),
            ("PT402", "service_role", 402),
        ],
    )
    def test_the_bridge_uses_postgrests_status_table(self, sqlstate: str, role: str, status: int) -> None:
        assert http_status(sqlstate, role) == status


class TestReadiness:
    async def test_ready_when_every_migration_is_applied(self, rest_client: httpx.AsyncClient) -> None:
        response = await rest_client.get("/readyz")
        assert response.status_code == 200, response.text
        assert response.json() == {"ready": True}

    async def test_not_ready_naming_the_missing_version(
        self, rest_client: httpx.AsyncClient, db: asyncpg.Pool, migrated_dsn: str
    ) -> None:
        missing = migrations(make_settings(migrated_dsn, Path(".")).supabase_dir)[-1]
        row = await db.fetchrow(
            "delete from supabase_migrations.schema_migrations where version = $1 returning *",
            missing.version,
        )
        try:
            response = await rest_client.get("/readyz")
        finally:
            await db.execute(
                "insert into supabase_migrations.schema_migrations (version, name, statements) "
                "values ($1, $2, $3)",
                row["version"],
                row["name"],
                row["statements"],
            )
        assert response.status_code == 503
        assert response.json() == {"ready": False, "detail": f"migrations not applied: {missing.version}"}
        assert (await rest_client.get("/readyz")).status_code == 200

    async def test_not_ready_when_the_api_knows_no_readiness_function(
        self, rest_client: httpx.AsyncClient, bridge: PostgrestBridge
    ) -> None:
        bridge.script(
            "collection_applied_migrations",
            Answer(
                404,
                error_body("PGRST202", "Could not find the function public.collection_applied_migrations"),
            ),
        )
        response = await rest_client.get("/readyz")
        assert response.status_code == 503
        assert "migrations have not been applied" in response.json()["detail"]

    async def test_not_ready_when_the_api_is_unreachable(self, open_app: Callable[..., Any]) -> None:
        context, app = open_app(closed_port_url())
        async with context, await client_for(app) as client:
            response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {"ready": False, "detail": "The database is unavailable; retry shortly"}
        assert response.headers["Retry-After"]


class TestTheBridge:
    """The bridge itself answers as PostgREST and Supabase's gateway do (see its docstring)."""

    @pytest.fixture
    async def http(self, bridge: PostgrestBridge) -> AsyncIterator[httpx.AsyncClient]:
        async with httpx.AsyncClient(base_url=f"{bridge.url}/rest/v1") as c:
            yield c

    KEY = {"apikey": SERVICE_ROLE_KEY, "Authorization": f"Bearer {SERVICE_ROLE_KEY}"}

    async def test_the_gateway_wants_a_known_api_key(self, http: httpx.AsyncClient) -> None:
        missing = await http.post("/rpc/collection_run_status_counts", json={})
        assert missing.status_code == 401 and missing.json()["message"] == "No API key found in request"
        wrong = await http.post("/rpc/collection_run_status_counts", json={}, headers={"apikey": ANON_KEY})
        assert wrong.status_code == 401 and wrong.json()["message"] == "Invalid API key"

    async def test_without_a_token_the_call_runs_as_anon_and_the_grant_refuses_it(
        self, http: httpx.AsyncClient, bridge: PostgrestBridge
    ) -> None:
        bridge.api_keys = bridge.api_keys | {ANON_KEY}
        try:
            response = await http.post(
                "/rpc/collection_run_status_counts", json={}, headers={"apikey": ANON_KEY}
            )
        finally:
            bridge.api_keys = bridge.api_keys - {ANON_KEY}
        assert response.status_code == 401
        assert response.json()["code"] == "42501"
        assert "permission denied for function" in response.json()["message"]

    async def test_a_token_not_signed_by_the_project_is_pgrst301(self, http: httpx.AsyncClient) -> None:
        forged = jwt.encode({"role": "service_role"}, "not-the-project-secret-" + "z" * 20, algorithm="HS256")
        response = await http.post(
            "/rpc/collection_run_status_counts",
            json={},
            headers={"apikey": SERVICE_ROLE_KEY, "Authorization": f"Bearer {forged}"},
        )
        assert response.status_code == 401 and response.json()["code"] == "PGRST301"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")

    async def test_shapes_of_answers(self, http: httpx.AsyncClient, world: World) -> None:
        org = str(await world.org("acme"))
        scalar = await http.post(
            "/rpc/collection_estimate_inputs",
            json={"p_org_id": org, "p_category_ids": ["a"]},
            headers=self.KEY,
        )
        assert scalar.status_code == 200 and scalar.json()["history"] == {}
        void = await http.post("/rpc/collection_release_work", json={"p_token": org}, headers=self.KEY)
        assert void.status_code == 204 and void.content == b""
        single = await http.post("/rpc/collection_get_settings", json={"p_org_id": org}, headers=self.KEY)
        assert single.status_code == 200 and single.json()["budget_cap_cents"] == 2500
        empty_set = await http.post(
            "/rpc/collection_get_run", json={"p_org_id": org, "p_run_id": org}, headers=self.KEY
        )
        assert empty_set.json() == [] and empty_set.headers["Content-Range"] == "*/*"

    async def test_named_arguments_defaults_and_unknown_names(
        self, http: httpx.AsyncClient, world: World
    ) -> None:
        org = str(await world.org("acme"))
        # p_actor and p_reason have defaults: leaving them out is allowed.
        defaults = await http.post(
            "/rpc/collection_transition_run",
            json={"p_org_id": org, "p_run_id": org, "p_action": "start"},
            headers=self.KEY,
        )
        assert defaults.status_code == 400 and defaults.json()["code"] == "CR003"
        unknown = await http.post("/rpc/collection_get_settings", json={"org_id": org}, headers=self.KEY)
        assert unknown.status_code == 404 and unknown.json()["code"] == "PGRST202"
        bad_input = await http.post(
            "/rpc/collection_get_settings", json={"p_org_id": "not-a-uuid"}, headers=self.KEY
        )
        assert bad_input.status_code == 400 and bad_input.json()["code"] == "22P02"

    async def test_only_the_exposed_schema_and_no_tables(self, http: httpx.AsyncClient) -> None:
        other = await http.post(
            "/rpc/collection_run_status_counts", json={}, headers={**self.KEY, "Content-Profile": "auth"}
        )
        assert other.status_code == 406 and other.json()["code"] == "PGRST106"
        table = await http.get("/collection_runs", headers=self.KEY)
        assert table.status_code == 404 and table.json()["code"] == "PGRST205"
