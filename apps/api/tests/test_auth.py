"""Authentication (Supabase access tokens) and authorisation (the caller's permission in their org).

Tokens are checked against a real endpoint of the real app. The only fake is the project's JWKS
endpoint: a small HTTP server on 127.0.0.1 that this module starts, serving public keys we generate.
Where a test must outlive a cache window it moves the auth module's monotonic clock forward instead
of sleeping; nothing of the app itself is replaced.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import FastAPI
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from app import auth as auth_module
from app.config import Settings
from app.main import create_app
from conftest import JWT_ISSUER, JWT_SECRET, World, create_run, free_port, make_settings, sign_token

RUNS = "/collection/runs"
INVALID = "Invalid bearer token"
EXPIRED = "Token has expired"
# What a request that carries no usable credentials may be told; neither names a failed check.
NO_CREDENTIALS = {"Missing bearer token", INVALID}


# --------------------------------------------------------------------------------------------------
# Keys, tokens and the JWKS endpoint
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: str  # ES256 or RS256
    private_key: Any

    def public_jwk(self, *, with_alg: bool = True) -> dict[str, Any]:
        algorithm = ECAlgorithm if self.algorithm == "ES256" else RSAAlgorithm
        jwk: dict[str, Any] = dict(algorithm.to_jwk(self.private_key.public_key(), as_dict=True))
        jwk.update(kid=self.kid, use="sig")
        if with_alg:
            jwk["alg"] = self.algorithm
        return jwk

    @property
    def public_pem(self) -> bytes:
        return bytes(
            self.private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        return jwt.encode(
            claims,
            self.private_key,
            algorithm=header.pop("alg", self.algorithm),
            headers={"kid": self.kid, **header},
        )


def es256_key(kid: str) -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


def rs256_key(kid: str) -> SigningKey:
    return SigningKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


@dataclass(frozen=True)
class Keys:
    es: SigningKey  # served
    rs: SigningKey  # served
    es_rotated: SigningKey  # served only once a test rotates it in
    es_unknown: SigningKey  # never served


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(es256_key("es-1"), rs256_key("rs-1"), es256_key("es-2"), es256_key("es-unknown"))


def claims_for(user_id: uuid.UUID | str, **overrides: Any) -> dict[str, Any]:
    """Supabase access-token claims; override or drop claims (value None drops)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": str(user_id),
        "aud": "authenticated",
        "role": "authenticated",
        "iss": JWT_ISSUER,
        "iat": now,
        "exp": now + 3600,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made_token(
    header: dict[str, Any], claims: dict[str, Any], hmac_key: bytes | None, signer: SigningKey | None = None
) -> str:
    """A JWS built without PyJWT's checks (it refuses to make these): HS256 over `hmac_key`, signed
    by `signer` whatever the header says, or unsigned."""
    signing_input = ".".join(
        b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    ).encode()
    if signer is not None:
        signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input, signer.private_key)
    elif hmac_key is not None:
        signature = hmac.new(hmac_key, signing_input, hashlib.sha256).digest()
    else:
        signature = b""
    return f"{signing_input.decode()}.{b64url(signature)}"


class JwksServer:
    """The project's JWKS endpoint, served for real on 127.0.0.1; counts the fetches it answers."""

    def __init__(self) -> None:
        self.document: Any = {"keys": []}
        self.raw_body: bytes | None = None  # served instead of `document` when set
        self.status = 200
        self.delay_s = 0.0
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                if server.delay_s:
                    time.sleep(server.delay_s)
                body = (
                    server.raw_body if server.raw_body is not None else json.dumps(server.document).encode()
                )
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/auth/v1/.well-known/jwks.json"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()
        self.running = True

    def serve(self, *keys: SigningKey) -> None:
        self.document = {"keys": [k.public_jwk() for k in keys]}

    def stop(self) -> None:
        if self.running:
            self.running = False
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)


@pytest.fixture
def jwks_server(keys: Keys) -> Iterator[JwksServer]:
    server = JwksServer()
    server.serve(keys.es, keys.rs)
    yield server
    server.stop()


class Clock:
    """The auth module's monotonic clock, which a test can move forward past a cache window."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(auth_module, "time", fake)
    return fake


@dataclass
class Served:
    app: FastAPI
    client: httpx.AsyncClient


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[Served]:
    """The real app with its own lifespan, as the `app`/`client` fixtures build it."""
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        # As a server would: an unhandled error is a 500 response, not an exception in the test.
        transport = httpx.ASGITransport(app=application, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            yield Served(application, c)


@pytest.fixture
async def jwks_app(migrated_dsn: str, tmp_path: Path, jwks_server: JwksServer) -> AsyncIterator[Served]:
    async with serve(make_settings(migrated_dsn, tmp_path, supabase_jwks_url=jwks_server.url)) as served:
        yield served


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_unauthenticated(response: httpx.Response, details: set[str] | str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].split()[0] == "Bearer"
    body = response.json()
    assert set(body) == {"detail", "error"}
    assert body["error"] == "not_authenticated"
    allowed = {details} if isinstance(details, str) else details
    assert body["detail"] in allowed, body


async def run_count(db: asyncpg.Pool) -> int:
    count: int = await db.fetchval("select count(*) from collection_runs")
    return count


# --------------------------------------------------------------------------------------------------
# Refused tokens
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Subject:
    """An admin with a run in their org: a token that slipped through would be served, not 403."""

    user_id: uuid.UUID
    keys: Keys


HeaderCase = Callable[[Subject], dict[str, str]]


def token_case(make: Callable[[Subject], str]) -> HeaderCase:
    return lambda s: bearer(make(s))


NO_CREDENTIAL_CASES: dict[str, HeaderCase] = {
    "no-authorization-header": lambda s: {},
    "bearer-without-token": lambda s: {"Authorization": "Bearer"},
    "bearer-with-blank-token": lambda s: {"Authorization": "Bearer   "},
    "basic-scheme": lambda s: {"Authorization": "Basic dXNlcjpwYXNzd29yZA=="},
    "valid-token-under-token-scheme": lambda s: {"Authorization": f"Token {sign_token(s.user_id)}"},
    "valid-token-without-scheme": lambda s: {"Authorization": sign_token(s.user_id)},
}

INVALID_TOKEN_CASES: dict[str, HeaderCase] = {
    "malformed-not-a-jwt": token_case(lambda s: "not-a-jwt"),
    "malformed-three-garbage-segments": token_case(lambda s: "abc.def.ghi"),
    "malformed-header-not-an-object": token_case(
        lambda s: f"{b64url(b'[]')}.{b64url(json.dumps(claims_for(s.user_id)).encode())}.x"
    ),
    "hs256-bad-signature": token_case(
        lambda s: jwt.encode(claims_for(s.user_id), "another-secret-" + "y" * 40, algorithm="HS256")
    ),
    "hs256-payload-swapped": token_case(
        lambda s: ".".join(
            [
                sign_token(s.user_id).split(".")[0],
                sign_token(uuid.uuid4()).split(".")[1],
                sign_token(s.user_id).split(".")[2],
            ]
        )
    ),
    "alg-none": token_case(
        lambda s: hand_made_token({"alg": "none", "typ": "JWT"}, claims_for(s.user_id), None)
    ),
    "alg-None": token_case(
        lambda s: hand_made_token({"alg": "None", "typ": "JWT"}, claims_for(s.user_id), None)
    ),
    "alg-NONE": token_case(
        lambda s: hand_made_token({"alg": "NONE", "typ": "JWT"}, claims_for(s.user_id), None)
    ),
    "alg-none-with-valid-hs256-signature": token_case(
        lambda s: hand_made_token({"alg": "none"}, claims_for(s.user_id), JWT_SECRET.encode())
    ),
    "alg-missing": token_case(
        lambda s: hand_made_token({"typ": "JWT"}, claims_for(s.user_id), JWT_SECRET.encode())
    ),
    "confusion-hs256-keyed-with-rs256-pem": token_case(
        lambda s: hand_made_token(
            {"alg": "HS256", "typ": "JWT", "kid": s.keys.rs.kid}, claims_for(s.user_id), s.keys.rs.public_pem
        )
    ),
    "confusion-hs256-keyed-with-es256-pem": token_case(
        lambda s: hand_made_token(
            {"alg": "HS256", "typ": "JWT", "kid": s.keys.es.kid}, claims_for(s.user_id), s.keys.es.public_pem
        )
    ),
    "confusion-hs256-keyed-with-jwk-json": token_case(
        lambda s: hand_made_token(
            {"alg": "HS256", "kid": s.keys.rs.kid},
            claims_for(s.user_id),
            json.dumps(s.keys.rs.public_jwk()).encode(),
        )
    ),
    "confusion-es256-header-on-rsa-kid": token_case(
        lambda s: jwt.encode(
            claims_for(s.user_id), s.keys.es.private_key, algorithm="ES256", headers={"kid": s.keys.rs.kid}
        )
    ),
    "hs512-with-project-secret": token_case(
        lambda s: jwt.encode(claims_for(s.user_id), JWT_SECRET, algorithm="HS512")
    ),
    "ps256-on-served-rsa-kid": token_case(lambda s: s.keys.rs.sign(claims_for(s.user_id), alg="PS256")),
    "not-yet-valid": token_case(lambda s: sign_token(s.user_id, nbf=int(time.time()) + 600)),
    "wrong-audience": token_case(lambda s: sign_token(s.user_id, aud="anon")),
    "missing-audience": token_case(lambda s: sign_token(s.user_id, aud=None)),
    "wrong-issuer": token_case(
        lambda s: sign_token(s.user_id, iss="https://other-project.supabase.co/auth/v1")
    ),
    "missing-issuer": token_case(lambda s: sign_token(s.user_id, iss=None)),
    "missing-sub": token_case(lambda s: sign_token(s.user_id, sub=None)),
    "empty-sub": token_case(lambda s: sign_token(s.user_id, sub="")),
    "non-uuid-sub": token_case(lambda s: sign_token(s.user_id, sub="admin@example.com")),
    "missing-exp": token_case(lambda s: sign_token(s.user_id, exp=None)),
    "non-numeric-exp": token_case(lambda s: sign_token(s.user_id, exp="tomorrow")),
    "supabase-anon-key": token_case(
        lambda s: jwt.encode(
            {"iss": "supabase", "role": "anon", "iat": int(time.time()), "exp": int(time.time()) + 3600},
            JWT_SECRET,
            algorithm="HS256",
        )
    ),
    "es256-unknown-kid": token_case(lambda s: s.keys.es_unknown.sign(claims_for(s.user_id))),
    "es256-served-kid-wrong-key": token_case(
        lambda s: jwt.encode(
            claims_for(s.user_id),
            s.keys.es_unknown.private_key,
            algorithm="ES256",
            headers={"kid": s.keys.es.kid},
        )
    ),
    "es256-without-kid": token_case(
        lambda s: jwt.encode(claims_for(s.user_id), s.keys.es.private_key, algorithm="ES256")
    ),
    "es256-non-string-kid": token_case(
        lambda s: hand_made_token({"alg": "ES256", "kid": ["es-1"]}, claims_for(s.user_id), None, s.keys.es)
    ),
    "es256-wrong-audience": token_case(lambda s: s.keys.es.sign(claims_for(s.user_id, aud="anon"))),
}

EXPIRED_CASES: dict[str, HeaderCase] = {
    "hs256-expired": token_case(lambda s: sign_token(s.user_id, exp=int(time.time()) - 60)),
    "es256-expired": token_case(lambda s: s.keys.es.sign(claims_for(s.user_id, exp=int(time.time()) - 60))),
}

ENDPOINTS = [("GET", RUNS), ("POST", RUNS)]


@pytest.fixture
async def subject(world: World, db: asyncpg.Pool, keys: Keys, jwks_app: Served) -> Subject:
    admin = await world.admin("acme")
    await create_run(jwks_app.client, admin)
    return Subject(admin.user_id, keys)


async def request_runs(client: httpx.AsyncClient, method: str, headers: dict[str, str]) -> httpx.Response:
    body = {"category_ids": ["electronics"]} if method == "POST" else None
    return await client.request(method, RUNS, headers=headers, json=body)


class TestRefusedTokens:
    @pytest.mark.parametrize(("method", "path"), ENDPOINTS)
    @pytest.mark.parametrize("case", NO_CREDENTIAL_CASES.values(), ids=NO_CREDENTIAL_CASES.keys())
    async def test_no_usable_credentials_is_401(
        self, jwks_app: Served, subject: Subject, db: asyncpg.Pool, method: str, path: str, case: HeaderCase
    ) -> None:
        response = await request_runs(jwks_app.client, method, case(subject))
        assert_unauthenticated(response, NO_CREDENTIALS)
        assert await run_count(db) == 1

    @pytest.mark.parametrize(("method", "path"), ENDPOINTS)
    @pytest.mark.parametrize("case", INVALID_TOKEN_CASES.values(), ids=INVALID_TOKEN_CASES.keys())
    async def test_invalid_token_is_401_without_saying_why(
        self, jwks_app: Served, subject: Subject, db: asyncpg.Pool, method: str, path: str, case: HeaderCase
    ) -> None:
        response = await request_runs(jwks_app.client, method, case(subject))
        assert_unauthenticated(response, INVALID)
        assert await run_count(db) == 1

    @pytest.mark.parametrize(("method", "path"), ENDPOINTS)
    @pytest.mark.parametrize("case", EXPIRED_CASES.values(), ids=EXPIRED_CASES.keys())
    async def test_expired_token_is_401_expired(
        self, jwks_app: Served, subject: Subject, db: asyncpg.Pool, method: str, path: str, case: HeaderCase
    ) -> None:
        response = await request_runs(jwks_app.client, method, case(subject))
        assert_unauthenticated(response, EXPIRED)
        assert await run_count(db) == 1

    async def test_hs256_is_refused_when_the_project_has_no_secret(
        self,
        migrated_dsn: str,
        tmp_path: Path,
        jwks_server: JwksServer,
        world: World,
        db: asyncpg.Pool,
        keys: Keys,
    ) -> None:
        """A JWKS-only project: neither the PEM of a served key nor any secret can sign an HS256 token."""
        admin = await world.admin()
        settings = make_settings(
            migrated_dsn, tmp_path, supabase_jwks_url=jwks_server.url, supabase_jwt_secret=None
        )
        async with serve(settings) as served:
            for hmac_key in (keys.es.public_pem, keys.rs.public_pem, JWT_SECRET.encode()):
                token = hand_made_token(
                    {"alg": "HS256", "kid": keys.es.kid}, claims_for(admin.user_id), hmac_key
                )
                response = await request_runs(served.client, "POST", bearer(token))
                assert_unauthenticated(response, INVALID)
            ok = await request_runs(served.client, "POST", bearer(keys.es.sign(claims_for(admin.user_id))))
            assert ok.status_code == 201, ok.text
        assert await run_count(db) == 1


# --------------------------------------------------------------------------------------------------
# Accepted tokens
# --------------------------------------------------------------------------------------------------
class TestAcceptedTokens:
    async def test_hs256_signed_with_the_project_secret(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        admin = await world.admin()
        run = await create_run(client, admin)
        response = await client.get(RUNS, headers=bearer(sign_token(admin.user_id)))
        assert response.status_code == 200, response.text
        assert [r["id"] for r in response.json()["runs"]] == [run["id"]]

    @pytest.mark.parametrize("algorithm", ["ES256", "RS256"])
    async def test_asymmetric_token_verified_with_a_served_key(
        self, jwks_app: Served, world: World, db: asyncpg.Pool, keys: Keys, algorithm: str
    ) -> None:
        admin = await world.admin()
        key = keys.es if algorithm == "ES256" else keys.rs
        token = key.sign(claims_for(admin.user_id, email="admin@example.com"))
        assert jwt.get_unverified_header(token)["alg"] == algorithm

        created = await jwks_app.client.post(RUNS, json={"category_ids": ["toys"]}, headers=bearer(token))
        assert created.status_code == 201, created.text
        row = await db.fetchrow(
            "select org_id, created_by from collection_runs where id = $1", created.json()["id"]
        )
        assert (row["org_id"], row["created_by"]) == (admin.org_id, admin.user_id)

        listed = await jwks_app.client.get(RUNS, headers=bearer(token))
        assert listed.status_code == 200
        assert [r["id"] for r in listed.json()["runs"]] == [created.json()["id"]]

    @pytest.mark.parametrize("signing", ["hmac-with-project-secret", "es256-served-key"])
    async def test_hand_made_tokens_are_sound(
        self, jwks_app: Served, world: World, keys: Keys, signing: str
    ) -> None:
        """Control for the hand-made refused tokens: built the same way but honest, they pass."""
        admin = await world.admin()
        claims = claims_for(admin.user_id)
        if signing == "hmac-with-project-secret":
            token = hand_made_token({"alg": "HS256", "typ": "JWT"}, claims, JWT_SECRET.encode())
        else:
            token = hand_made_token({"alg": "ES256", "kid": keys.es.kid}, claims, None, keys.es)
        response = await jwks_app.client.get(RUNS, headers=bearer(token))
        assert response.status_code == 200, response.text

    async def test_served_key_without_alg_member_is_used_for_its_key_type(
        self, jwks_app: Served, jwks_server: JwksServer, world: World, keys: Keys
    ) -> None:
        jwks_server.document = {"keys": [keys.es.public_jwk(with_alg=False)]}
        admin = await world.admin()
        response = await jwks_app.client.get(RUNS, headers=bearer(keys.es.sign(claims_for(admin.user_id))))
        assert response.status_code == 200, response.text


# --------------------------------------------------------------------------------------------------
# The JWKS: fetched, cached, rotated, unavailable
# --------------------------------------------------------------------------------------------------
class TestJwks:
    async def test_keys_are_fetched_once_and_cached(
        self, jwks_app: Served, jwks_server: JwksServer, world: World, keys: Keys
    ) -> None:
        admin = await world.admin()
        for key in (keys.es, keys.rs, keys.es, keys.rs):
            response = await jwks_app.client.get(RUNS, headers=bearer(key.sign(claims_for(admin.user_id))))
            assert response.status_code == 200, response.text
        assert jwks_server.hits == 1

    async def test_concurrent_first_requests_fetch_once(
        self, jwks_app: Served, jwks_server: JwksServer, world: World, keys: Keys
    ) -> None:
        admin = await world.admin()
        token = keys.es.sign(claims_for(admin.user_id))
        responses = await asyncio.gather(
            *(jwks_app.client.get(RUNS, headers=bearer(token)) for _ in range(20))
        )
        assert [r.status_code for r in responses] == [200] * 20
        assert jwks_server.hits == 1

    async def test_fetch_does_not_block_other_requests(
        self, jwks_app: Served, jwks_server: JwksServer, world: World, keys: Keys
    ) -> None:
        admin = await world.admin()
        jwks_server.delay_s = 0.5
        slow = asyncio.create_task(
            jwks_app.client.get(RUNS, headers=bearer(keys.es.sign(claims_for(admin.user_id))))
        )
        while jwks_server.hits == 0:
            await asyncio.sleep(0.01)
        fast = await jwks_app.client.get(RUNS, headers=bearer(sign_token(admin.user_id)))
        assert fast.status_code == 200
        assert not slow.done(), "an HS256 request waited for the JWKS fetch"
        assert (await slow).status_code == 200

    async def test_key_rotated_into_the_jwks_is_picked_up(
        self, jwks_app: Served, jwks_server: JwksServer, world: World, keys: Keys, clock: Clock
    ) -> None:
        admin = await world.admin()
        old_token = keys.es.sign(claims_for(admin.user_id))
        new_token = keys.es_rotated.sign(claims_for(admin.user_id))
        assert (await jwks_app.client.get(RUNS, headers=bearer(old_token))).status_code == 200

        jwks_server.serve(keys.es, keys.es_rotated)
        # Unknown kids refetch at most every JWKS_MIN_REFRESH_S; well inside the 10-minute cache.
        clock.advance(auth_module.JWKS_MIN_REFRESH_S + 1)
        response = await jwks_app.client.get(RUNS, headers=bearer(new_token))
        assert response.status_code == 200, response.text
        assert jwks_server.hits == 2
        assert (await jwks_app.client.get(RUNS, headers=bearer(old_token))).status_code == 200

        # The old key retired: once the cache expires, its tokens stop working.
        jwks_server.serve(keys.es_rotated)
        clock.advance(600 + 1)
        assert_unauthenticated(await jwks_app.client.get(RUNS, headers=bearer(old_token)), INVALID)
        assert (await jwks_app.client.get(RUNS, headers=bearer(new_token))).status_code == 200

    async def test_unknown_kids_do_not_hammer_the_jwks(
        self, jwks_app: Served, jwks_server: JwksServer, world: World, keys: Keys, clock: Clock
    ) -> None:
        admin = await world.admin()
        for _ in range(20):
            token = jwt.encode(
                claims_for(admin.user_id),
                keys.es_unknown.private_key,
                algorithm="ES256",
                headers={"kid": str(uuid.uuid4())},
            )
            assert_unauthenticated(await jwks_app.client.get(RUNS, headers=bearer(token)), INVALID)
        assert jwks_server.hits == 1
        clock.advance(auth_module.JWKS_MIN_REFRESH_S + 1)
        assert_unauthenticated(
            await jwks_app.client.get(RUNS, headers=bearer(keys.es_unknown.sign(claims_for(admin.user_id)))),
            INVALID,
        )
        assert jwks_server.hits == 2

    async def test_jwks_down_from_the_start_is_401_not_500(
        self, migrated_dsn: str, tmp_path: Path, world: World, keys: Keys
    ) -> None:
        nothing_listens = f"http://127.0.0.1:{free_port()}/auth/v1/.well-known/jwks.json"
        admin = await world.admin()
        async with serve(make_settings(migrated_dsn, tmp_path, supabase_jwks_url=nothing_listens)) as served:
            for key in (keys.es, keys.es_unknown, keys.rs):
                response = await served.client.get(RUNS, headers=bearer(key.sign(claims_for(admin.user_id))))
                assert_unauthenticated(response, INVALID)
            # The legacy secret does not depend on the JWKS.
            assert (
                await served.client.get(RUNS, headers=bearer(sign_token(admin.user_id)))
            ).status_code == 200

    async def test_jwks_going_down_keeps_the_keys_already_fetched(
        self, jwks_app: Served, jwks_server: JwksServer, world: World, keys: Keys, clock: Clock
    ) -> None:
        admin = await world.admin()
        token = keys.es.sign(claims_for(admin.user_id))
        assert (await jwks_app.client.get(RUNS, headers=bearer(token))).status_code == 200
        await asyncio.to_thread(jwks_server.stop)

        clock.advance(600 + 1)  # the cache is stale: the refetch fails
        assert (await jwks_app.client.get(RUNS, headers=bearer(token))).status_code == 200
        unknown = keys.es_unknown.sign(claims_for(admin.user_id))
        assert_unauthenticated(await jwks_app.client.get(RUNS, headers=bearer(unknown)), INVALID)

    @pytest.mark.parametrize(
        ("status", "body"),
        [
            (500, b'{"error": "internal"}'),
            (404, b"not found"),
            (200, b"<html>captive portal</html>"),
            (200, b'{"keys": []}'),
            (200, b'{"keys": "none"}'),
            (200, b'{"keys": [{"kty": "EC"}, 7]}'),
            (200, b"{}"),
            (200, b"[]"),
            (200, b"null"),
            (200, b'"keys"'),
        ],
        ids=[
            "http-500",
            "http-404",
            "html",
            "empty-key-list",
            "keys-not-a-list",
            "unusable-keys",
            "empty-object",
            "json-array",
            "json-null",
            "json-string",
        ],
    )
    async def test_unusable_jwks_document_is_401_not_500(
        self,
        jwks_app: Served,
        jwks_server: JwksServer,
        world: World,
        keys: Keys,
        clock: Clock,
        status: int,
        body: bytes,
    ) -> None:
        admin = await world.admin()
        jwks_server.status, jwks_server.raw_body = status, body
        token = keys.es.sign(claims_for(admin.user_id))
        assert_unauthenticated(await jwks_app.client.get(RUNS, headers=bearer(token)), INVALID)
        assert (await jwks_app.client.get(RUNS, headers=bearer(sign_token(admin.user_id)))).status_code == 200

        # Once the endpoint serves keys again, they are used.
        jwks_server.status, jwks_server.raw_body = 200, None
        clock.advance(auth_module.JWKS_MIN_REFRESH_S + 1)
        assert (await jwks_app.client.get(RUNS, headers=bearer(token))).status_code == 200


# --------------------------------------------------------------------------------------------------
# Authorisation: organisation and permission
# --------------------------------------------------------------------------------------------------
async def runs_of(db: asyncpg.Pool, org_id: uuid.UUID) -> list[uuid.UUID]:
    rows = await db.fetch("select id from collection_runs where org_id = $1", org_id)
    return [r["id"] for r in rows]


def assert_forbidden(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    assert response.json()["error"] == "permission_denied"
    assert set(response.json()) == {"detail", "error"}


class TestOrganisationChoice:
    async def test_user_without_membership_is_403(self, client: httpx.AsyncClient, world: World, db) -> None:
        await world.org("acme")
        user_id = await world.user()
        headers = bearer(sign_token(user_id))
        assert_forbidden(await client.get(RUNS, headers=headers))
        assert_forbidden(await client.post(RUNS, json={"category_ids": ["a"]}, headers=headers))
        assert await run_count(db) == 0

    async def test_member_without_permission_is_403(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        member = await world.member_only("acme")
        assert_forbidden(await client.get(RUNS, headers=member.headers))
        assert_forbidden(await client.post(RUNS, json={"category_ids": ["a"]}, headers=member.headers))
        assert await run_count(db) == 0

    async def test_user_in_two_orgs_must_choose_one(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.actor("acme", "globex")
        for response in (
            await client.get(RUNS, headers=admin.headers),
            await client.post(RUNS, json={"category_ids": ["a"]}, headers=admin.headers),
        ):
            assert response.status_code == 400, response.text
            assert response.json()["error"] == "organisation_required"
        assert await run_count(db) == 0

    @pytest.mark.parametrize("form", ["uuid", "uppercase-uuid", "slug"])
    async def test_x_org_id_selects_the_org(
        self, client: httpx.AsyncClient, world: World, db, form: str
    ) -> None:
        admin = await world.actor("acme", "globex")
        globex = admin.org_ids["globex"]
        other = await create_run(client, await world.admin("acme"))
        chosen = {"uuid": str(globex), "uppercase-uuid": str(globex).upper(), "slug": "globex"}[form]
        headers = {**admin.headers, "X-Org-Id": chosen}

        created = await client.post(RUNS, json={"category_ids": ["a"]}, headers=headers)
        assert created.status_code == 201, created.text
        assert await runs_of(db, globex) == [uuid.UUID(created.json()["id"])]

        listed = await client.get(RUNS, headers=headers)
        assert listed.status_code == 200, listed.text
        assert [r["id"] for r in listed.json()["runs"]] == [created.json()["id"]]
        assert other["id"] not in {r["id"] for r in listed.json()["runs"]}

    async def test_single_org_user_needs_no_header(self, client: httpx.AsyncClient, world: World, db) -> None:
        admin = await world.admin("acme")
        created = await client.post(RUNS, json={"category_ids": ["a"]}, headers=admin.headers)
        assert created.status_code == 201, created.text
        assert await runs_of(db, admin.org_id) == [uuid.UUID(created.json()["id"])]

    @pytest.mark.parametrize("target", ["other-org-id", "other-org-slug", "unknown-uuid", "garbage"])
    async def test_x_org_id_of_an_org_they_are_not_in_is_403(
        self, client: httpx.AsyncClient, world: World, db, target: str
    ) -> None:
        admin = await world.actor("acme", "globex")
        initech = await world.org("initech")
        await world.admin("initech")
        value = {
            "other-org-id": str(initech),
            "other-org-slug": "initech",
            "unknown-uuid": str(uuid.uuid4()),
            "garbage": "'; drop table organizations; --",
        }[target]
        headers = {**admin.headers, "X-Org-Id": value}
        assert_forbidden(await client.get(RUNS, headers=headers))
        assert_forbidden(await client.post(RUNS, json={"category_ids": ["a"]}, headers=headers))
        assert await run_count(db) == 0

    async def test_single_org_user_naming_another_org_is_403(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.admin("acme")
        globex = await world.org("globex")
        response = await client.post(RUNS, json={"category_ids": ["a"]}, headers=admin.headers_for(globex))
        assert_forbidden(response)
        assert await run_count(db) == 0

    async def test_admin_in_one_org_member_in_another(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        user = await world.admin("acme")
        globex = await world.org("globex")
        await world.member(user.user_id, globex, "member")

        assert_forbidden(
            await client.post(RUNS, json={"category_ids": ["a"]}, headers=user.headers_for(globex))
        )
        assert_forbidden(await client.get(RUNS, headers=user.headers_for("globex")))
        assert await run_count(db) == 0

        created = await client.post(RUNS, json={"category_ids": ["a"]}, headers=user.headers_for(user.org_id))
        assert created.status_code == 201, created.text
        assert await runs_of(db, user.org_id) == [uuid.UUID(created.json()["id"])]


class TestPermissionsFromDatabase:
    async def test_deleted_membership_takes_effect_on_the_next_request(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.admin()
        await create_run(client, admin)
        await db.execute("delete from memberships where user_id = $1", admin.user_id)
        assert_forbidden(await client.post(RUNS, json={"category_ids": ["a"]}, headers=admin.headers))
        assert await run_count(db) == 1

    async def test_demotion_takes_effect_on_the_next_request(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.admin()
        await create_run(client, admin)
        await db.execute("update memberships set role = 'member' where user_id = $1", admin.user_id)
        assert_forbidden(await client.post(RUNS, json={"category_ids": ["a"]}, headers=admin.headers))
        assert await run_count(db) == 1

    async def test_promotion_takes_effect_on_the_next_request(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        member = await world.member_only()
        assert_forbidden(await client.get(RUNS, headers=member.headers))
        await db.execute("update memberships set role = 'admin' where user_id = $1", member.user_id)
        await create_run(client, member)
        assert await runs_of(db, member.org_id) != []

    async def test_permission_comes_from_role_permissions(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.admin()
        member = await world.member_only()
        # role_permissions is reference data the per-test truncation keeps: restore it whatever happens.
        try:
            async with db.acquire() as conn, conn.transaction():
                await conn.execute("delete from role_permissions where role = 'admin'")
                await conn.execute(
                    "insert into role_permissions (role, permission_key) "
                    "values ('member', 'admin.automation')"
                )
            assert_forbidden(await client.get(RUNS, headers=admin.headers))
            await create_run(client, member)
        finally:
            async with db.acquire() as conn, conn.transaction():
                await conn.execute("delete from role_permissions where role = 'member'")
                await conn.execute(
                    "insert into role_permissions (role, permission_key) "
                    "values ('admin', 'admin.automation') on conflict do nothing"
                )
        assert await run_count(db) == 1


@pytest.fixture
async def cached_app(migrated_dsn: str, tmp_path: Path) -> AsyncIterator[Served]:
    async with serve(make_settings(migrated_dsn, tmp_path, auth_cache_s=5)) as served:
        yield served


class TestAccessCache:
    async def test_demoted_admin_keeps_acting_within_the_window_until_cleared(
        self, cached_app: Served, world: World, db
    ) -> None:
        admin = await world.admin()
        await create_run(cached_app.client, admin)
        await db.execute("update memberships set role = 'member' where user_id = $1", admin.user_id)

        for _ in range(2):
            await create_run(cached_app.client, admin)
        assert await run_count(db) == 3  # both after the demotion: the old permission was reused

        cached_app.app.state.access_cache.clear()
        assert_forbidden(
            await cached_app.client.post(RUNS, json={"category_ids": ["a"]}, headers=admin.headers)
        )
        assert await run_count(db) == 3

    async def test_revoked_membership_acts_until_the_window_ends(
        self, cached_app: Served, world: World, db, clock: Clock
    ) -> None:
        admin = await world.admin()
        assert (await cached_app.client.get(RUNS, headers=admin.headers)).status_code == 200
        await db.execute("delete from memberships where user_id = $1", admin.user_id)

        clock.advance(4.5)
        await create_run(cached_app.client, admin)
        assert await run_count(db) == 1

        clock.advance(1.0)  # 5.5 s after the lookup: past AUTH_CACHE_S=5
        assert_forbidden(
            await cached_app.client.post(RUNS, json={"category_ids": ["a"]}, headers=admin.headers)
        )
        assert await run_count(db) == 1

    async def test_cache_is_per_user(self, cached_app: Served, world: World, db) -> None:
        admin = await world.admin()
        other = await world.admin()
        assert (await cached_app.client.get(RUNS, headers=admin.headers)).status_code == 200
        await db.execute("update memberships set role = 'member' where user_id = $1", other.user_id)
        assert_forbidden(await cached_app.client.get(RUNS, headers=other.headers))
        await create_run(cached_app.client, admin)
        assert await run_count(db) == 1


class TestAuthenticationComesFirst:
    """A caller without a verifiable token learns nothing about an operation but 401: not that its
    body is malformed, nor its parameters or headers out of bounds."""

    @pytest.mark.parametrize(
        ("method", "path", "body"),
        [
            ("POST", RUNS, {"category_ids": 5}),
            ("POST", "/collection/estimate", {"category_ids": "not a list"}),
            ("POST", RUNS, b'{"category_ids": ["a"'),  # not JSON at all: FastAPI parses it first
            ("POST", "/collection/estimate", b"\xff\xfe"),
            ("GET", RUNS + "?limit=0", None),
            ("PATCH", "/collection/settings", {"budget_cap_cents": -1}),
            ("PATCH", "/collection/settings", b"[1, 2"),
        ],
    )
    @pytest.mark.parametrize("token", ["none", "bad"])
    async def test_a_caller_without_a_valid_token_learns_nothing_but_401(
        self, client: httpx.AsyncClient, world: World, db, method: str, path: str, body: Any, token: str
    ) -> None:
        send: dict[str, Any] = (
            {"content": body, "headers": {"Content-Type": "application/json"}}
            if isinstance(body, bytes)
            else {"json": body}
        )
        bad = {"Authorization": "Bearer " + sign_token(uuid.uuid4(), exp=int(time.time()) - 60)}
        refused = await client.request(
            method,
            path,
            **{**send, "headers": {**send.get("headers", {}), **(bad if token == "bad" else {})}},
        )
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"] == "not_authenticated"
        assert refused.headers["www-authenticate"].startswith("Bearer")
        admin = await world.admin()
        judged = await client.request(
            method, path, **{**send, "headers": {**send.get("headers", {}), **admin.headers}}
        )
        assert judged.status_code == 422, judged.text
        assert await run_count(db) == 0

    async def test_an_over_long_org_header_is_422_for_a_verified_caller_only(
        self, client: httpx.AsyncClient, world: World, db
    ) -> None:
        admin = await world.admin()
        anonymous = await client.post(RUNS, json={"category_ids": ["a"]}, headers={"X-Org-Id": "x" * 65})
        assert anonymous.status_code == 401, anonymous.text
        judged = await client.post(
            RUNS, json={"category_ids": ["a"]}, headers={**admin.headers, "X-Org-Id": "x" * 65}
        )
        assert judged.status_code == 422, judged.text
        assert judged.json()["detail"][0]["loc"] == ["header", "X-Org-Id"]
        assert await run_count(db) == 0

    async def test_concurrent_callers_each_get_their_own_organisation(
        self, client: httpx.AsyncClient, world: World
    ) -> None:
        acme, globex = await world.admin("acme"), await world.admin("globex")
        runs = {actor.org_id: (await create_run(client, actor))["id"] for actor in (acme, globex)}
        responses = await asyncio.gather(
            *(client.get(RUNS, headers=actor.headers) for actor in [acme, globex] * 20)
        )
        for actor, response in zip([acme, globex] * 20, responses, strict=True):
            assert [r["id"] for r in response.json()["runs"]] == [runs[actor.org_id]]

    async def test_every_guarded_operation_documents_the_bearer_token_and_org_header(
        self, client: httpx.AsyncClient
    ) -> None:
        schema = (await client.get("/openapi.json")).json()
        assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        operations = [
            (path, operation) for path, item in schema["paths"].items() for operation in item.values()
        ]
        for path, operation in operations:
            guarded = path.startswith("/collection/")
            assert (operation.get("security") == [{"HTTPBearer": []}]) is guarded, path
            names = [p["name"] for p in operation.get("parameters", [])]
            assert (names.count("X-Org-Id") == 1) is guarded, path
            assert ("422" in operation["responses"]) is (guarded or bool(names)), path
