"""Part 3: what one request costs.

- Database round trips per request of each endpoint, counted by pg_stat_statements on the bench's
  private Postgres (deltas over N sequential requests; the executor's own background calls excluded).
- Verifying a token (HS256, ES256) through the app's TokenVerifier: the full check, and a reuse.
- The caller's permission: cold (the database) and warm (the access cache).
- Where a request's CPU goes: GET /runs/{id} driven in-process through the ASGI app, one layer removed
  at a time with FastAPI's public means (CPU µs per request of this process, the best of 10
  interleaved rounds).
"""

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any
from uuid import UUID

import asyncpg
import httpx
import jwt
from common import load_average, log, table  # noqa: I001  (common puts apps/api/src on sys.path)
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from pydantic import SecretStr
from starlette.routing import Route

from app import operations as ops
from app.auth import ORG_HEADER, CurrentUser, bearer_scheme, current_user
from app.deps import Admin, Service, require_admin

ROUND_TRIP_REQUESTS = 100
ANATOMY_ROUNDS = 10
BACKGROUND = re.compile(
    r"pg_stat_statements|collection_heartbeat|collection_claim_runs|pg_catalog|pg_database"
)
FUNCTION = re.compile(r"public\.(collection_\w+)")


# ---------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------
async def statement_calls(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch(
        "select query, calls from pg_stat_statements "
        "where dbid = (select oid from pg_database where datname = current_database())"
    )
    calls: dict[str, int] = {}
    for row in rows:
        if BACKGROUND.search(row["query"]):
            continue
        match = FUNCTION.search(row["query"])
        name = match.group(1) if match else row["query"].split("\n")[0][:60]
        calls[name] = calls.get(name, 0) + row["calls"]
    return calls


async def round_trips(ctx: Any) -> list[dict[str, Any]]:
    ctx.api.ensure_running()
    headers = {"Authorization": f"Bearer {ctx.token}"}
    conn = await asyncpg.connect(ctx.pg.dsn)
    results = []
    created: list[str] = []

    async def create(client: httpx.AsyncClient) -> httpx.Response:
        response = await client.post(
            "/collection/runs", json={"category_ids": ["electronics", "home-garden"]}
        )
        created.append(response.json()["id"])
        return response

    async def cancel(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(f"/collection/runs/{created.pop()}/cancel")

    endpoints: list[tuple[str, Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]]] = [
        ("GET /runs/{id}", lambda c: c.get(f"/collection/runs/{ctx.run_id}")),
        ("GET /runs", lambda c: c.get("/collection/runs", params={"limit": 20})),
        (
            "GET /runs?cursor=…",
            lambda c: c.get("/collection/runs", params={"limit": 20, "cursor": ctx.cursor}),
        ),
        ("POST /estimate", lambda c: c.post("/collection/estimate", json={"category_ids": ["a", "b", "c"]})),
        ("POST /runs", create),
        ("POST /runs/{id}/cancel", cancel),
        ("GET /settings", lambda c: c.get("/collection/settings")),
    ]
    try:
        async with httpx.AsyncClient(base_url=ctx.api.url, headers=headers, timeout=30) as client:
            for label, call in endpoints:
                if label != "POST /runs/{id}/cancel":
                    for _ in range(5):  # warm: connections open, statements prepared, caches filled
                        await call(client)
                        if label == "POST /runs":
                            await cancel(client)
                await conn.execute("select pg_stat_statements_reset()")
                statuses = set()
                for _ in range(ROUND_TRIP_REQUESTS):
                    statuses.add((await call(client)).status_code)
                calls = await statement_calls(conn)
                per_request = {k: round(v / ROUND_TRIP_REQUESTS, 3) for k, v in sorted(calls.items())}
                results.append(
                    {
                        "endpoint": label,
                        "statuses": sorted(statuses),
                        "round_trips_per_request": round(sum(per_request.values()), 2),
                        "statements_per_request": per_request,
                    }
                )
                log(f"  {label:24s} {sum(per_request.values()):.2f} round trips/request {per_request}")
    finally:
        await conn.close()
    return results


# ---------------------------------------------------------------------------------------------------
# Token verification and permission lookup
# ---------------------------------------------------------------------------------------------------
def best_us(samples: list[float]) -> float:
    return round(min(samples) * 1e6, 2)


async def timed(call: Callable[[], Awaitable[Any]], n: int, rounds: int = 5) -> float:
    """Best of `rounds` of n sequential calls: µs per call (wall clock)."""
    for _ in range(min(n, 200)):
        await call()
    per_call = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(n):
            await call()
        per_call.append((time.perf_counter() - started) / n)
    return best_us(per_call)


async def token_costs(ctx: Any) -> list[dict[str, Any]]:
    from cryptography.hazmat.primitives.asymmetric import ec

    from app.auth import TokenVerifier
    from app.config import Settings

    now = int(time.time())
    claims = {
        "sub": str(ctx.bench.user_id),
        "email": "bench@local.test",
        "aud": "authenticated",
        "role": "authenticated",
        "iss": "https://bench.supabase.co/auth/v1",
        "iat": now,
        "exp": now + 3600,
        "session_id": str(uuid.uuid4()),
        "is_anonymous": False,
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": {"email_verified": True},
        "aal": "aal1",
        "amr": [{"method": "password", "timestamp": now}],
    }
    secret = "bench-" + "s" * 40
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    jwk.update(kid="bench-es256", alg="ES256", use="sig")
    jwks = {"keys": [jwk]}
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(200, json=jwks)))
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        supabase_jwt_secret=SecretStr(secret),
        supabase_jwt_issuer=claims["iss"],
        supabase_jwks_url="http://jwks.bench/.well-known/jwks.json",
        auth_cache_s=5,
    )
    verifier = TokenVerifier(settings, client)
    tokens = {
        "HS256": jwt.encode(claims, secret, algorithm="HS256"),
        "ES256": jwt.encode(claims, private, algorithm="ES256", headers={"kid": "bench-es256"}),
    }
    results = []
    for algorithm, token in tokens.items():
        full = await timed(lambda t=token: verifier._verify_signature(t), 2000)
        reused = await timed(lambda t=token: verifier.verify(t), 20000)
        results.append({"what": f"verify {algorithm} token (signature, claims)", "us": full})
        results.append({"what": f"verify {algorithm} token again (reused for AUTH_CACHE_S)", "us": reused})
    await client.aclose()
    return results


async def permission_costs(ctx: Any) -> list[dict[str, Any]]:
    from app.auth import AccessCache
    from app.config import Settings
    from app.database import PostgresTransport, create_pool
    from app.services.collection import CollectionService
    from app.store import Store

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=SecretStr(ctx.pg.dsn), supabase_jwt_secret=SecretStr(ctx.secret)
    )
    # As the lifespan builds them: the store on a Postgres transport, the cache on the service's lookup.
    store = Store(PostgresTransport(await create_pool(settings), settings.db_acquire_timeout_s), [])
    service = CollectionService(store, settings.pricing)
    user = ctx.bench.user_id
    try:
        cold = AccessCache(service.user_access, 0)
        warm = AccessCache(service.user_access, 5)
        return [
            {
                "what": "permission lookup, cold (collection_user_access: 1 round trip)",
                "us": await timed(lambda: cold.get(user), 500),
            },
            {
                "what": "permission lookup, warm (access cache hit)",
                "us": await timed(lambda: warm.get(user), 20000),
            },
        ]
    finally:
        await store.close()


# ---------------------------------------------------------------------------------------------------
# Where a request's CPU goes
# ---------------------------------------------------------------------------------------------------
def scope(path: str, token: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"authorization", f"Bearer {token}".encode()),
            (b"accept", b"*/*"),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }


async def cpu_per_request(
    app: Any, path: str, token: str, n: int = 1000, rounds: int = 5, warm: int = 50
) -> float:
    """CPU µs of this process per request through the ASGI app (no HTTP parsing, no sockets)."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def one() -> None:
        await app(scope(path, token), receive, send)

    for _ in range(warm):
        await one()
    assert set(statuses) == {200}, (path, set(statuses))
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(n):
            await one()
        best = min(best, (time.process_time() - started) / n)
    return round(best * 1e6, 1)


async def anatomy(ctx: Any) -> list[dict[str, Any]]:
    """GET /runs/{id}'s CPU, one layer removed per step, with FastAPI's public means only: a second app
    without RequestContextMiddleware, `dependency_overrides` for the permission, and a probe route for
    the service, store and models.

    While any override is set, FastAPI re-reads every dependency of the route on each request
    (`solve_dependencies` builds a new dependant for each with `get_dependant`), which costs more
    than our cached auth does. So the override that removes auth comes after a step with an override
    that removes nothing (require_admin's own check, called directly): the difference between those
    two is auth's own work. And after the probe, the same probe declaring the constant caller itself
    with no override set shows what the override costs; the step that adds the first override is that
    cost less FastAPI's resolution of require_admin's chain (bearer scheme, X-Org-Id, nested calls)."""
    import importlib.util

    from common import BENCH

    from app.config import Settings
    from app.main import create_app
    from app.observability import RequestContextMiddleware, configure_logging

    org, run_id, token = ctx.bench.org_id, str(ctx.run_id), ctx.token
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=SecretStr(ctx.pg.dsn),
        supabase_jwt_secret=SecretStr(ctx.secret),
        supabase_jwt_issuer="collection-api-local",
        executor_enabled=False,
    )
    # The access lines as served (INFO, the app's writer), written where they cost nothing to the terminal.
    devnull = open(os.devnull, "w")  # noqa: SIM115
    configure_logging("INFO", stream=devnull)
    access = logging.getLogger("app.access")

    constant = CurrentUser(ctx.bench.user_id, None, org, "bench", "admin", frozenset({"admin.automation"}))

    # Both overrides take the request, so FastAPI's own work for them is the same; and both are
    # coroutines (FastAPI runs a plain function, such as a lambda, in its thread pool).
    async def checked_caller(request: Request) -> CurrentUser:
        """require_admin's own check, called directly: the bearer token, the caller, the permission."""
        credentials = await bearer_scheme(request)
        user = await current_user(request, credentials, request.headers.get(ORG_HEADER))
        return await require_admin(user)

    async def constant_caller(request: Request) -> CurrentUser:
        return constant

    async def raw_row(request: Request, org_id: UUID, run_id: str) -> Response:
        pool = request.app.state.store.transport.pool
        row = await pool.fetchrow(
            ops.GET_RUN.sql, *ops.GET_RUN.bind(None, {"org_id": org_id, "run_id": UUID(run_id)}).values()
        )
        return Response(json.dumps(dict(row), default=str), media_type="application/json")

    # Both probes declare the real route's dependencies (a caller, and the service they leave unused),
    # so that FastAPI's work is the same and only what the endpoint does differs.
    async def raw_get_run(run_id: str, request: Request, admin: Admin, service: Service) -> Response:
        return await raw_row(request, admin.org_id, run_id)

    async def raw_get_run_constant(
        run_id: str,
        request: Request,
        admin: Annotated[CurrentUser, Depends(constant_caller)],
        service: Service,
    ) -> Response:
        return await raw_row(request, admin.org_id, run_id)

    os.environ.update(BENCH_DSN=ctx.pg.dsn, BENCH_ORG_ID=str(org), BENCH_USER_ID=str(ctx.bench.user_id))
    spec = importlib.util.spec_from_file_location("bare_app", BENCH / "bare_app.py")
    assert spec and spec.loader
    bare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bare)
    bare_app: FastAPI = bare.app

    served = create_app(settings)
    lean = create_app(settings)
    lean.user_middleware = [m for m in lean.user_middleware if m.cls is not RequestContextMiddleware]
    # The probe is reached as the real route is, through an included router with the same prefix,
    # placed just before the collection router so that finding it costs the same (the app tries its
    # routes in order: the documentation's, then the routers create_app includes, collection's first).
    probes = APIRouter(prefix="/collection")
    probes.add_api_route("/runs-probe/{run_id}", raw_get_run, methods=["GET"])
    probes.add_api_route("/runs-probe-constant/{run_id}", raw_get_run_constant, methods=["GET"])
    lean.include_router(probes)
    routes = lean.router.routes
    included = routes.pop()
    routes.insert(next(i for i, r in enumerate(routes) if not isinstance(r, Route)), included)

    path = f"/collection/runs/{run_id}"
    probe_path = f"/collection/runs-probe/{run_id}"
    # (label, the layer's short name, app, path, access line on, require_admin's override)
    plan: list[tuple[str, str, FastAPI, str, bool, Callable[..., Any] | None]] = [
        ("GET /runs/{id} as served", "", served, path, True, None),
        ("- the access line", "access line", served, path, False, None),
        (
            "- RequestContextMiddleware (request id, headers, metrics)",
            "RequestContextMiddleware",
            lean,
            path,
            False,
            None,
        ),
        (
            "+ require_admin overridden by its own check, called directly (with any override set, "
            "FastAPI re-reads each dependency per request)",
            OVERRIDE_SET,
            lean,
            path,
            False,
            checked_caller,
        ),
        (
            "- auth: require_admin overridden by a constant caller (still a dependency; no token, "
            "caller cache or permission)",
            "auth (token, caller, permission)",
            lean,
            path,
            False,
            constant_caller,
        ),
        (
            "- service, store, model_validate + serialisation (probe route: raw pool.fetchrow + "
            "json.dumps, the same dependencies and override)",
            "service, store, models",
            lean,
            probe_path,
            False,
            constant_caller,
        ),
        (
            "- the override itself (the same probe declaring the constant caller as its dependency; "
            "no override set)",
            OVERRIDE_COST,
            lean,
            f"/collection/runs-probe-constant/{run_id}",
            False,
            None,
        ),
        (
            "the bare app (the same SQL; no dependencies, no middleware, its routes on the app)",
            "FastAPI: two dependencies, an included router",
            bare_app,
            path,
            False,
            None,
        ),
    ]
    best = {label: float("inf") for label, *_ in plan}
    try:
        async with (
            served.router.lifespan_context(served),
            lean.router.lifespan_context(lean),
            bare_app.router.lifespan_context(bare_app),
        ):
            # Rounds interleave the steps, so a burst of load from elsewhere cannot favour one of them.
            for _ in range(ANATOMY_ROUNDS):
                for label, _, app, url, logged, override in plan:
                    access.disabled = not logged
                    app.dependency_overrides.clear()
                    if override is not None:
                        app.dependency_overrides[require_admin] = override
                    us = await cpu_per_request(app, url, token, n=400, rounds=1)
                    best[label] = min(best[label], us)
    finally:
        access.disabled = False
        logging.getLogger().handlers.clear()
        devnull.close()
    # Each line's layer is what removing it saved (the line above minus this one; negative: it added).
    rows = []
    for i, (label, layer, *_) in enumerate(plan):
        previous = best[plan[i - 1][0]] if i else None
        rows.append(
            {
                "step": label,
                "layer": layer,
                "cpu_us": best[label],
                "layer_us": round(previous - best[label], 1) if previous is not None else None,
            }
        )
    return rows


async def run(ctx: Any) -> dict[str, Any]:
    log("part 3: round trips per request (pg_stat_statements)")
    trips = await round_trips(ctx)
    log("part 3: token verification and permission lookup")
    tokens = await token_costs(ctx)
    permissions = await permission_costs(ctx)
    for row in tokens + permissions:
        log(f"  {row['what']:62s} {row['us']:8.2f} µs")
    log("part 3: where GET /runs/{id} spends its CPU (in-process, layer by layer)")
    layers = await anatomy(ctx)
    for row in layers:
        log(f"  {row['cpu_us']:7.1f} µs  {row['step']}")
    return {
        "round_trips": trips,
        "auth": tokens + permissions,
        "anatomy": layers,
        "load_average": load_average(),
    }


OVERRIDE_SET = "an override, less require_admin's chain"
OVERRIDE_COST = "an override being set"


def require_admin_chain_us(steps: list[dict[str, Any]]) -> float | None:
    """FastAPI's own resolution of require_admin's chain: what the override costs (its own line) less
    what the line that sets it added."""
    by_layer = {r["layer"]: r["layer_us"] for r in steps}
    if by_layer.get(OVERRIDE_COST) is None or by_layer.get(OVERRIDE_SET) is None:
        return None
    return round(by_layer[OVERRIDE_COST] + by_layer[OVERRIDE_SET], 1)


def layers(steps: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """GET /runs/{id}'s server CPU by layer: the steps' differences, the two lines about the override
    taken together as FastAPI's resolution of require_admin's chain, and the bare app whole."""
    found: list[tuple[str, float]] = []
    for r in steps:
        if r["layer_us"] is None or r["layer"] == OVERRIDE_COST:
            continue
        if r["layer"] == OVERRIDE_SET:
            chain = require_admin_chain_us(steps)
            if chain is not None:
                found.append(("FastAPI: require_admin's chain", chain))
            continue
        found.append((r["layer"], r["layer_us"]))
    return [*found, ("the bare app, all of it", steps[-1]["cpu_us"])]


def tables(result: dict[str, Any]) -> str:
    out = [
        table(
            ["endpoint", "round trips / request", "statements per request"],
            [
                [
                    r["endpoint"],
                    r["round_trips_per_request"],
                    ", ".join(f"{k} {v:g}" for k, v in r["statements_per_request"].items()),
                ]
                for r in result["round_trips"]
            ],
            "Part 3: database round trips per request (pg_stat_statements, 100 sequential requests)",
        ),
        table(
            ["what", "µs per call"],
            [[r["what"], r["us"]] for r in result["auth"]],
            "Part 3: token and permission",
        ),
        table(
            [
                "GET /runs/{id}, in-process, one layer removed (-) or added (+) per line",
                "CPU µs/request",
                "the line above minus this one µs",
            ],
            [[r["step"], r["cpu_us"], r["layer_us"]] for r in result["anatomy"]],
            "Part 3: where the server's CPU goes (same process, no HTTP parsing)",
        ),
    ]
    chain = require_admin_chain_us(result["anatomy"])
    if chain is not None:
        out.append(
            "FastAPI resolving require_admin's chain (bearer scheme, X-Org-Id, nested dependencies) = "
            f"the override's cost less what the line setting it added: {chain:.1f} µs"
        )
    return "\n".join(out)
