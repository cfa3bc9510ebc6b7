"""A loopback PostgREST: the calls SupabaseRestStore makes, answered by running them on a real Postgres.

No PostgREST can be installed here, so this bridge serves exactly what the adapter sends to
`{SUPABASE_URL}/rest/v1` and nothing more, each behaviour following the PostgREST (v12-v14) or Supabase
documentation section named beside it:

- `POST /rest/v1/rpc/{function}` with a JSON object whose keys are the function's named arguments; keys
  left out take the function's defaults; among overloads the one whose argument names fit is called
  (PostgREST "Functions as RPC": "Calling with POST", "Overloaded functions").
- Arguments are converted the way PostgREST converts them: the body goes through `json_to_record` with
  the argument types the schema cache holds for the function (pg_proc), so a JSON array becomes a
  Postgres array, an object a jsonb value, and bad input a Postgres error such as 22P02
  ("Functions as RPC": "Functions with array parameters"; "Schema Cache").
- Functions are looked up once and kept (a stale cache answers as PostgREST's would, until
  `reload_schema_cache()`); none whose names fit: 404 PGRST202; several: 300 PGRST203
  ("Schema Cache"; "Errors": "PostgREST Error Codes", group 2).
- The answer's shape follows the return type ("Functions as RPC": "Scalar functions", "Table-Valued
  Functions"): a scalar as its JSON value, a set or a table as a JSON array, a single composite as one
  object (an object of nulls when the function returns null, since PostgREST selects `call.*` from it),
  void as `204 No Content` with no body (PostgREST PR #2058, "Returning 204 No Content where
  appropriate").
- On a set, `order=col.asc|desc`, `limit` and `offset` apply to the function's rows, every answer is cut
  at `max_rows` (Supabase's default, `db-max-rows` = 1000), and `Content-Range: 0-N/*` says what was
  sent ("Tables and Views": "Ordering"; "Pagination and Count": "Limits and Pagination";
  "Configuration": "db-max-rows").
- One transaction per call, read-write for POST, rolled back on error; inside it the role is switched
  with `set_config('role', ...)` and the claims are in `request.jwt.claims`, so grants and `auth.uid()`
  apply as under PostgREST ("Transactions"; "Authentication": "Roles", "JWT-Based User Impersonation").
- `Authorization: Bearer <JWT>` is verified with the project's JWT secret (HS256, `exp` checked) and its
  `role` claim is the role; no token: the anonymous role `anon`; a bad token: 401 PGRST301 with a
  `WWW-Authenticate` header ("Authentication"; "Errors": group 3).
- Supabase's API gateway in front of it: every request needs the `apikey` header holding a key of the
  project (401 "No API key found in request" / "Invalid API key" otherwise), and a secret key
  (`sb_secret_...`) sent as the bearer token stands for `service_role` (Supabase "API keys": "How API
  keys work").
- `Content-Profile` / `Accept-Profile` must name an exposed schema (`public`): 406 PGRST106 otherwise
  ("Schemas": "Multiple schemas").
- Errors are `{code, message, details, hint}` with PostgREST's HTTP status for the SQLSTATE: the whole
  table of "Errors": "HTTP Status Codes" (P0001 and "other" codes such as our CR001..CR005 and 23514:
  400; 42501: 401 for the anonymous role, 403 otherwise; 42883/42P01: 404; 08*, 53*: 503; ...), and
  `PTxyz` answers status xyz ("Errors": "RAISE errors with HTTP Status Codes").
- The database out of reach: 503 PGRST000 (cannot connect) or PGRST001 (connection lost); no free pool
  connection in time: 504 PGRST003 ("Errors": group 0; "Connection Pool": "Acquisition Timeout").
- A table path (`/rest/v1/{table}`) answers 404 PGRST205: the adapter reads no table, and a test would
  notice if it started to ("Errors": group 2).

Not reproduced, because the adapter sends none of it: GET/HEAD calls, `Prefer` (count, params, tx,
return), filters other than `order`/`limit`/`offset`, embedding, writes to tables, OpenAPI, CORS,
asymmetric JWTs.

Tests can also script answers for a function (`bridge.script("collection_get_run", Answer(...))`) to
provoke what a real database will not do on demand (PGRST000..003, a proxy's HTML 502, a slow answer),
and read every request the bridge received (`bridge.requests`).

    with serve_postgrest_bridge(dsn, jwt_secret, service_key) as bridge:
        settings = Settings(supabase_url=bridge.url, supabase_service_role_key=service_key, ...)
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import jwt
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

EXPOSED_SCHEMAS = ("public",)
ANON_ROLE = "anon"

# "Errors": "HTTP Status Codes", in the order PostgREST checks them (exact codes before classes).
STATUS_BY_SQLSTATE: tuple[tuple[str, int], ...] = (
    ("23503", 409),
    ("23505", 409),
    ("25006", 405),
    ("53400", 500),
    ("P0001", 400),
    ("42883", 404),
    ("42P01", 404),
    ("42P17", 500),
    ("08", 503),
    ("09", 500),
    ("0L", 403),
    ("0P", 403),
    ("25", 500),
    ("28", 403),
    ("2D", 500),
    ("38", 500),
    ("39", 500),
    ("3B", 500),
    ("40", 500),
    ("53", 503),
    ("54", 500),
    ("55", 500),
    ("57", 500),
    ("58", 500),
    ("F0", 500),
    ("HV", 500),
    ("P0", 500),
    ("XX", 500),
)


def http_status(sqlstate: str, role: str) -> int:
    if sqlstate == "42501":
        return 401 if role == ANON_ROLE else 403
    if sqlstate.startswith("PT") and sqlstate[2:].isdigit():
        return int(sqlstate[2:])
    for prefix, status in STATUS_BY_SQLSTATE:
        if sqlstate.startswith(prefix):
            return status
    return 400


def error_body(
    code: str, message: str, details: str | None = None, hint: str | None = None
) -> dict[str, Any]:
    return {"code": code, "details": details, "hint": hint, "message": message}


@dataclass(frozen=True)
class Answer:
    """A scripted answer: `body` as JSON, or `raw` as it is (e.g. a proxy's HTML), after `delay_s`."""

    status: int = 503
    body: Any = None
    raw: str | None = None
    delay_s: float = 0.0
    content_type: str = "application/json; charset=utf-8"


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    function: str | None
    headers: dict[str, str]
    query: dict[str, str]
    body: Any


@dataclass(frozen=True)
class Function:
    """A function as PostgREST's schema cache holds it."""

    name: str
    args: tuple[tuple[str, str], ...]  # (name, type) of the input arguments, in order
    required: frozenset[str]
    returns: str  # void | scalar | composite | set


@dataclass
class PostgrestBridge:
    dsn: str
    jwt_secret: str
    api_keys: frozenset[str]
    max_rows: int | None = 1000
    acquire_timeout_s: float = 5.0
    url: str = ""
    _cache: dict[str, list[Function]] = field(default_factory=dict)
    _scripts: defaultdict[str, deque[Answer]] = field(default_factory=lambda: defaultdict(deque))
    _requests: deque[ReceivedRequest] = field(default_factory=lambda: deque(maxlen=5000))
    # The server runs on its own thread and loop; tests script and read from theirs.
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pool: asyncpg.Pool | None = None

    def script(self, function: str, *answers: Answer) -> None:
        """The next calls of `function` get these answers, in order, instead of running it."""
        with self._lock:
            self._scripts[function].extend(answers)

    @property
    def requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        with self._lock:
            self._scripts.clear()
            self._requests.clear()

    def reload_schema_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def _record(self, received: ReceivedRequest) -> None:
        with self._lock:
            self._requests.append(received)

    def _scripted(self, function: str) -> Answer | None:
        with self._lock:
            queued = self._scripts.get(function)
            return queued.popleft() if queued else None

    # --- Authentication -----------------------------------------------------------------------------
    def _role(self, request: Request) -> tuple[str, dict[str, Any]] | Response:
        """The role and claims of the request, or the gateway's or PostgREST's refusal."""
        apikey = request.headers.get("apikey")
        if apikey is None:
            return JSONResponse(
                {
                    "message": "No API key found in request",
                    "hint": "No `apikey` request header or url param was found.",
                },
                status_code=401,
            )
        if apikey not in self.api_keys:
            return JSONResponse(
                {
                    "message": "Invalid API key",
                    "hint": "Double check your Supabase `anon` or `service_role` API key.",
                },
                status_code=401,
            )
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return ANON_ROLE, {"role": ANON_ROLE}
        if token == apikey and token.startswith("sb_secret_"):
            return "service_role", {"role": "service_role"}
        try:
            claims: dict[str, Any] = jwt.decode(
                token, self.jwt_secret, algorithms=["HS256"], options={"verify_aud": False}
            )
        except jwt.PyJWTError as exc:
            return JSONResponse(
                error_body("PGRST301", str(exc) or "JWT could not be decoded"),
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return str(claims.get("role") or ANON_ROLE), claims

    # --- The schema cache ---------------------------------------------------------------------------
    async def _functions(self, conn: asyncpg.Connection, name: str) -> list[Function]:
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None:
            return cached
        rows = await conn.fetch(
            """
            select p.proargnames as names, p.proargmodes::text[] as modes, p.pronargdefaults as defaults,
                   p.proretset as is_set, p.prorettype = 'void'::regtype as is_void,
                   t.typtype = 'c' as is_composite,
                   array(select format_type(a, null)
                           from unnest(coalesce(p.proallargtypes, p.proargtypes::oid[])) a) as types
              from pg_proc p join pg_type t on t.oid = p.prorettype
             where p.pronamespace = any ($1::regnamespace[]) and p.proname = $2 and p.prokind = 'f'
            """,
            list(EXPOSED_SCHEMAS),
            name,
        )
        found = []
        for row in rows:
            modes = row["modes"] or ["i"] * len(row["types"])
            names = row["names"] or [""] * len(row["types"])
            args = tuple(
                (n, t) for n, t, m in zip(names, row["types"], modes, strict=True) if m in ("i", "b", "v")
            )
            required = frozenset(n for n, _ in args[: len(args) - row["defaults"]])
            returns = (
                "void"
                if row["is_void"]
                else "set"
                if row["is_set"]
                else "composite"
                if row["is_composite"]
                else "scalar"
            )
            found.append(Function(name, args, required, returns))
        with self._lock:
            self._cache[name] = found
        return found

    # --- Serving ------------------------------------------------------------------------------------
    async def rpc(self, request: Request) -> Response:
        function_name = request.path_params["function"]
        raw_body = await request.body()
        try:
            body = json.loads(raw_body) if raw_body else {}
        except ValueError:
            body = None
        self._record(
            ReceivedRequest(
                method=request.method,
                path=request.url.path,
                function=function_name,
                headers={k: v for k, v in request.headers.items() if k in RECORDED_HEADERS},
                query=dict(request.query_params),
                body=body,
            )
        )
        scripted = self._scripted(function_name)
        if scripted is not None:
            return await _answer(scripted)
        role = self._role(request)
        if isinstance(role, Response):
            return role
        role_name, claims = role
        profile = request.headers.get("content-profile", EXPOSED_SCHEMAS[0])
        if profile not in EXPOSED_SCHEMAS:
            return JSONResponse(
                error_body(
                    "PGRST106",
                    "Invalid schema: " + profile,
                    None,
                    "Only the following schemas are exposed: public",
                ),
                status_code=406,
            )
        if not isinstance(body, dict):
            return JSONResponse(error_body("PGRST102", "Empty or invalid json"), status_code=400)
        try:
            order = parse_order(request.query_params.get("order"))
            limit = _int_param(request.query_params.get("limit"))
            offset = _int_param(request.query_params.get("offset")) or 0
        except ValueError as exc:
            return JSONResponse(
                error_body("PGRST100", f'"failed to parse order or limit" ({exc})'), status_code=400
            )

        assert self._pool is not None
        try:
            async with self._pool.acquire(timeout=self.acquire_timeout_s) as conn:
                candidates = [f for f in await self._functions(conn, function_name) if _fits(f, set(body))]
                if not candidates:
                    return _function_not_found(function_name, sorted(body))
                if len(candidates) > 1:
                    return JSONResponse(
                        error_body(
                            "PGRST203",
                            "Could not choose the best candidate function between: "
                            + ", ".join(
                                f"public.{f.name}({', '.join(n for n, _ in f.args)})" for f in candidates
                            ),
                            hint="Try renaming the parameters or the function itself in the database so "
                            "function overloading can be resolved",
                        ),
                        status_code=300,
                    )
                call = candidates[0]
                if limit is not None and self.max_rows is not None:
                    limit = min(limit, self.max_rows)
                elif self.max_rows is not None and call.returns == "set":
                    limit = self.max_rows
                query = call_query(call, [k for k, _ in call.args if k in body], order, limit, offset)
                async with conn.transaction():
                    await conn.execute(
                        "select set_config('role', $1, true), set_config('request.jwt.claims', $2, true), "
                        "set_config('request.method', $3, true), set_config('request.path', $4, true), "
                        "set_config('search_path', 'public, extensions', true)",
                        role_name,
                        json.dumps(claims),
                        request.method,
                        request.url.path,
                    )
                    result = await conn.fetchval(query, json.dumps(body))
        except asyncpg.PostgresError as exc:
            if isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.CannotConnectNowError):
                return JSONResponse(
                    error_body("PGRST001", "Database client error. Retrying the connection."), status_code=503
                )
            sqlstate = exc.sqlstate or "XX000"
            return JSONResponse(
                error_body(sqlstate, exc.message, getattr(exc, "detail", None), getattr(exc, "hint", None)),
                status_code=http_status(sqlstate, role_name),
            )
        except TimeoutError:
            return JSONResponse(
                error_body("PGRST003", "Timed out acquiring connection from connection pool."),
                status_code=504,
            )
        except (OSError, asyncpg.InterfaceError):
            return JSONResponse(
                error_body("PGRST000", "Database connection error. Retrying the connection."), status_code=503
            )

        if call.returns == "void":
            return Response(status_code=204)
        headers = {}
        if call.returns == "set":
            count = len(json.loads(result))
            headers["Content-Range"] = f"{offset}-{offset + count - 1}/*" if count else "*/*"
        return Response(result, media_type="application/json; charset=utf-8", headers=headers)

    async def table(self, request: Request) -> Response:
        self._record(
            ReceivedRequest(request.method, request.url.path, None, {}, dict(request.query_params), None)
        )
        table = request.path_params["table"]
        return JSONResponse(
            error_body("PGRST205", f"Could not find the table 'public.{table}' in the schema cache"),
            status_code=404,
        )

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=10)
        try:
            yield
        finally:
            await self._pool.close()


RECORDED_HEADERS = frozenset(
    {
        "apikey",
        "authorization",
        "content-type",
        "content-profile",
        "accept-profile",
        "prefer",
        "x-client-info",
    }
)


def _fits(function: Function, keys: set[str]) -> bool:
    return function.required <= keys <= {name for name, _ in function.args}


def _function_not_found(name: str, keys: list[str]) -> JSONResponse:
    listed = ", ".join(keys)
    return JSONResponse(
        error_body(
            "PGRST202",
            f"Could not find the function public.{name}({listed}) in the schema cache",
            f"Searched for the function public.{name} with parameters {listed or 'none'} or with a single "
            "unnamed json/jsonb parameter, but no matches were found in the schema cache.",
        ),
        status_code=404,
    )


def _int_param(value: str | None) -> int | None:
    if value is None:
        return None
    number = int(value)
    if number < 0:
        raise ValueError(f"{value} is negative")
    return number


def parse_order(value: str | None) -> list[tuple[str, str, str]]:
    """`col.asc,other.desc.nullslast` -> [(col, asc, ''), (other, desc, 'nulls last')]."""
    if not value:
        return []
    terms = []
    for term in value.split(","):
        column, _, rest = term.partition(".")
        parts = rest.split(".") if rest else []
        direction = parts[0] if parts and parts[0] in ("asc", "desc") else "asc"
        nulls = {"nullsfirst": "nulls first", "nullslast": "nulls last"}.get(parts[-1], "") if parts else ""
        if not column:
            raise ValueError(term)
        terms.append((column, direction, nulls))
    return terms


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def call_query(
    function: Function, passed: list[str], order: list[tuple[str, str, str]], limit: int | None, offset: int
) -> str:
    """PostgREST's shape of a call: the body through json_to_record, then the function by named arguments."""
    types = dict(function.args)
    call = (
        f"public.{_ident(function.name)}("
        + ", ".join(f"{_ident(a)} := pgrst_args.{_ident(a)}" for a in passed)
        + ")"
    )
    source = (
        "json_to_record($1::json) as pgrst_args(" + ", ".join(f"{_ident(a)} {types[a]}" for a in passed) + ")"
        if passed
        else "(select $1::json) as pgrst_body"
    )
    if function.returns == "void":
        return f"select {call}::text from {source}"
    if function.returns == "scalar":
        return f"select coalesce(to_json({call})::text, 'null') from {source}"
    clauses = ""
    if order:
        clauses += " order by " + ", ".join(f"pgrst_call.{_ident(c)} {d} {n}" for c, d, n in order)
    if limit is not None:
        clauses += f" limit {int(limit)}"
    if offset:
        clauses += f" offset {int(offset)}"
    rows = f"select pgrst_call.* from {source}, lateral {call} pgrst_call{clauses}"
    if function.returns == "composite":
        return f"select coalesce((json_agg(pgrst_t) -> 0)::text, 'null') from ({rows}) pgrst_t"
    return f"select coalesce(json_agg(pgrst_t), '[]')::text from ({rows}) pgrst_t"


async def _answer(answer: Answer) -> Response:
    if answer.delay_s:
        await asyncio.sleep(answer.delay_s)
    if answer.raw is not None:
        return Response(answer.raw, status_code=answer.status, media_type=answer.content_type)
    if answer.body is None:
        return Response(status_code=answer.status)
    return Response(json.dumps(answer.body), status_code=answer.status, media_type=answer.content_type)


def build_app(bridge: PostgrestBridge) -> Starlette:
    return Starlette(
        routes=[
            Route("/rest/v1/rpc/{function}", bridge.rpc, methods=["POST"]),
            Route("/rest/v1/{table}", bridge.table, methods=["GET", "HEAD", "POST", "PATCH", "DELETE"]),
        ],
        lifespan=bridge.lifespan,
    )


@contextmanager
def serve_postgrest_bridge(
    dsn: str, jwt_secret: str, *api_keys: str, max_rows: int | None = 1000
) -> Iterator[PostgrestBridge]:
    """Run the bridge on a free loopback port (uvicorn on a background thread) for the block."""
    bridge = PostgrestBridge(dsn=dsn, jwt_secret=jwt_secret, api_keys=frozenset(api_keys), max_rows=max_rows)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        build_app(bridge), log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="postgrest-bridge", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the PostgREST bridge did not start")
        time.sleep(0.01)
    bridge.url = f"http://127.0.0.1:{port}"
    try:
        yield bridge
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
