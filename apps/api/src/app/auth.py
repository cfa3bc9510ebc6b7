"""Supabase access tokens, verified locally, and the caller's permission in their organisation.

Tokens: HS256 with the project's legacy JWT secret, or ES256/RS256 with a key from the project's JWKS
(fetched without blocking the loop, cached). The algorithm decides the key *type*: an HS256 token is
only ever checked against the shared secret and an asymmetric one only against a JWKS key, which rules
out algorithm confusion; `none` and everything else is refused.

Permissions: memberships and role permissions are looked up once per user and reused for
`AUTH_CACHE_S` seconds (default 5): that is the longest a revoked permission can still act.
A verified token is reused for as long, never past its `exp` (keyed by the whole token): checking a
signature is most of our own work per request (~75 µs HS256, ~135 µs ES256: benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from time import time as wall_clock  # for `exp`; `time.monotonic` measures the cache windows
from typing import Any, TypeVar
from uuid import UUID

import httpx
import jwt
from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from app.config import Settings
from app.errors import NotAuthenticated, OrganisationRequired, PermissionDenied
from app.store import OrgAccess, Store

logger = logging.getLogger(__name__)

ASYMMETRIC_ALGORITHMS = frozenset({"ES256", "RS256"})
JWKS_MIN_REFRESH_S = 30.0  # an unknown kid refetches the JWKS at most this often
ACCESS_CACHE_MAX_USERS = 10_000
VERIFIED_TOKENS_MAX = 10_000


@dataclass(frozen=True, slots=True)
class CurrentUser:
    user_id: UUID
    email: str | None
    org_id: UUID
    org_slug: str
    role: str
    permissions: frozenset[str]


class JwksCache:
    def __init__(self, url: str, ttl_s: float, client: httpx.AsyncClient) -> None:
        self._url = url
        self._ttl_s = ttl_s
        self._client = client
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def key(self, kid: str) -> jwt.PyJWK | None:
        now = time.monotonic()
        stale = now - self._fetched_at > self._ttl_s
        unknown = kid not in self._keys and now - self._fetched_at > JWKS_MIN_REFRESH_S
        if stale or unknown:
            await self._refresh()
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._fetched_at < 1.0:
                return  # another request refreshed while we waited
            try:
                response = await self._client.get(self._url, timeout=5.0)
                response.raise_for_status()
                document = response.json()
                if not isinstance(document, dict):
                    raise ValueError("the JWKS is not a JSON object")
                jwk_set = jwt.PyJWKSet.from_dict(document)
            except (httpx.HTTPError, jwt.PyJWTError, ValueError) as exc:
                # Keep the keys we have: a JWKS outage must not lock every caller out.
                logger.warning("could not fetch JWKS from %s: %s", self._url, exc)
                self._fetched_at = time.monotonic() - self._ttl_s + JWKS_MIN_REFRESH_S
                return
            self._keys = {k.key_id: k for k in jwk_set.keys if k.key_id}
            self._fetched_at = time.monotonic()


class TokenVerifier:
    def __init__(self, settings: Settings, client: httpx.AsyncClient) -> None:
        secret = settings.supabase_jwt_secret
        self._secret = secret.get_secret_value() if secret else None
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway_s
        jwks_url = settings.jwks_url
        self._jwks = JwksCache(jwks_url, settings.jwks_cache_s, client) if jwks_url else None
        # token -> (monotonic deadline, claims). Only tokens that verified are ever stored.
        self._verified: dict[str, tuple[float, dict[str, Any]]] = {}
        self._verified_ttl_s = settings.auth_cache_s

    async def verify(self, token: str) -> dict[str, Any]:
        return (await self.verify_until(token))[1]

    async def verify_until(self, token: str) -> tuple[float, dict[str, Any]]:
        """The token's claims, and the monotonic time until which they may be reused."""
        now = time.monotonic()
        hit = self._verified.get(token)
        if hit is not None and now < hit[0]:
            return hit
        claims = await self._verify_signature(token)
        # Reused until AUTH_CACHE_S passes or the token expires, whichever comes first.
        entry = (now + min(self._verified_ttl_s, claims["exp"] + self._leeway - wall_clock()), claims)
        if self._verified_ttl_s > 0:
            if len(self._verified) >= VERIFIED_TOKENS_MAX:
                self._verified.clear()
            self._verified[token] = entry
        return entry

    async def _verify_signature(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise NotAuthenticated("Invalid bearer token") from None
        algorithm = header.get("alg")
        key: Any
        if algorithm == "HS256" and self._secret is not None:
            key = self._secret
        elif algorithm in ASYMMETRIC_ALGORITHMS and self._jwks is not None:
            kid = header.get("kid")
            jwk = await self._jwks.key(kid) if isinstance(kid, str) else None
            if jwk is None or (jwk.algorithm_name not in (algorithm, None)):
                raise NotAuthenticated("Invalid bearer token")
            key = jwk.key
        else:
            raise NotAuthenticated("Invalid bearer token")

        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "sub", "aud"], "verify_iss": self._issuer is not None},
            )
        except jwt.ExpiredSignatureError:
            raise NotAuthenticated("Token has expired") from None
        except jwt.PyJWTError as exc:
            logger.debug("token refused: %s", type(exc).__name__)
            raise NotAuthenticated("Invalid bearer token") from None
        return claims


class AccessCache:
    """Each user's organisations and permissions, reused for a few seconds; and each caller worked out
    from them (a token and the X-Org-Id it came with), reused no longer than the token and the access
    it was worked out from."""

    def __init__(self, store: Store, ttl_s: float) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._entries: dict[UUID, tuple[float, list[OrgAccess]]] = {}
        # (token, X-Org-Id) -> (monotonic deadline, caller)
        self._callers: dict[tuple[str, str | None], tuple[float, CurrentUser]] = {}

    async def get(self, user_id: UUID) -> list[OrgAccess]:
        return (await self.get_until(user_id))[1]

    async def get_until(self, user_id: UUID) -> tuple[float, list[OrgAccess]]:
        """The user's access, and the monotonic time until which it may be reused."""
        now = time.monotonic()
        hit = self._entries.get(user_id)
        if hit is not None and now - hit[0] < self._ttl_s:
            return hit[0] + self._ttl_s, hit[1]
        access = await self._store.user_access(user_id)
        if self._ttl_s > 0:
            if len(self._entries) >= ACCESS_CACHE_MAX_USERS:
                self._entries.clear()
            self._entries[user_id] = (now, access)
        return now + self._ttl_s, access

    def caller(self, token: str, org: str | None) -> CurrentUser | None:
        hit = self._callers.get((token, org))
        return hit[1] if hit is not None and time.monotonic() < hit[0] else None

    def remember_caller(self, token: str, org: str | None, caller: CurrentUser, until: float) -> None:
        if self._ttl_s > 0:
            if len(self._callers) >= VERIFIED_TOKENS_MAX:
                self._callers.clear()
            self._callers[(token, org)] = (until, caller)

    def clear(self) -> None:
        self._entries.clear()
        self._callers.clear()


def choose_org(memberships: list[OrgAccess], requested: str | None) -> OrgAccess:
    if not memberships:
        raise PermissionDenied("You are not a member of any organisation")
    if requested is None or requested == "":
        if len(memberships) == 1:
            return memberships[0]
        raise OrganisationRequired(
            f"You belong to {len(memberships)} organisations; choose one with the X-Org-Id header"
        )
    try:
        requested_id: UUID | str = UUID(requested)
    except ValueError:
        requested_id = requested  # a slug
    for access in memberships:
        if requested_id in (access.org_id, access.org_slug):
            return access
    raise PermissionDenied("You are not a member of that organisation")


ORG_HEADER = "X-Org-Id"
ORG_HEADER_MAX_LENGTH = 64
BEARER_SCHEME = "HTTPBearer"
T = TypeVar("T")
Guard = Callable[[Request], Awaitable[T]]
GUARDS: set[Callable[..., Any]] = set()  # every guard made, so the OpenAPI schema can find them


def permission_guard(permission: str, bind: Callable[[CurrentUser, Request], T]) -> Guard[T]:
    """Dependency: the verified caller, in the org they chose, holding `permission` there, handed to
    `bind` with the request (so an endpoint gets what it needs beside the caller from this one
    dependency).

    A plain function that reads the bearer token and `X-Org-Id` itself. `HTTPBearer` and a `Header`
    parameter would be a dependency and a parameter of their own, and a `SecurityBase` instance is
    dearer for FastAPI to resolve than a function: FastAPI works each of them out on every request,
    and together they cost more than the token and permission checks (benchmarks/README.md). The
    OpenAPI schema gets the bearer scheme and the header from `document_guarded_operations`.
    """

    async def guard(request: Request) -> T:
        authorization = x_org_id = None
        for name, value in request.scope["headers"]:  # as Headers.get: the first of each
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"x-org-id" and x_org_id is None:
                x_org_id = value.decode("latin-1")
        if x_org_id is not None and len(x_org_id) > ORG_HEADER_MAX_LENGTH:
            # The error FastAPI gives a declared header parameter with this bound.
            raise RequestValidationError(
                [
                    {
                        "type": "string_too_long",
                        "loc": ("header", ORG_HEADER),
                        "msg": f"String should have at most {ORG_HEADER_MAX_LENGTH} characters",
                        "input": x_org_id,
                        "ctx": {"max_length": ORG_HEADER_MAX_LENGTH},
                    }
                ]
            )
        token = bearer_token(authorization)
        if token is None:
            raise NotAuthenticated("Missing bearer token")
        state = request.app.state
        access: AccessCache = state.access_cache
        user = access.caller(token, x_org_id) or await find_caller(
            state.token_verifier, access, token, x_org_id
        )
        if permission not in user.permissions:
            raise PermissionDenied(f"Your role '{user.role}' lacks the permission '{permission}'")
        return bind(user, request)

    GUARDS.add(guard)
    return guard


async def find_caller(
    verifier: TokenVerifier, access: AccessCache, token: str, org: str | None
) -> CurrentUser:
    """Who the token's holder is in the organisation they chose (any organisation they are in)."""
    token_until, claims = await verifier.verify_until(token)
    try:
        user_id = UUID(str(claims["sub"]))
    except ValueError:
        raise NotAuthenticated("Invalid bearer token") from None
    access_until, memberships = await access.get_until(user_id)
    chosen = choose_org(memberships, org)
    email = claims.get("email")
    caller = CurrentUser(
        user_id=user_id,
        email=email if isinstance(email, str) else None,
        org_id=chosen.org_id,
        org_slug=chosen.org_slug,
        role=chosen.role,
        permissions=chosen.permissions,
    )
    # Never reused past either window: a revoked token or permission acts for AUTH_CACHE_S at most.
    access.remember_caller(token, org, caller, min(token_until, access_until))
    return caller


def document_guarded_operations(routes: Sequence[BaseRoute], schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI schema with what a permission guard reads itself, on every operation behind one:
    the bearer token scheme, and `X-Org-Id` (with its 422), as FastAPI writes them for `HTTPBearer`
    and a declared header parameter."""
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[BEARER_SCHEME] = {
        "type": "http",
        "description": "A Supabase access token (`make token` locally)",
        "scheme": "bearer",
    }
    description = "Organisation id or slug; needed only by users in several organisations"
    parameter = {
        "name": ORG_HEADER,
        "in": "header",
        "required": False,
        "description": description,
        "schema": {
            "anyOf": [{"type": "string", "maxLength": ORG_HEADER_MAX_LENGTH}, {"type": "null"}],
            "title": ORG_HEADER,
            "description": description,
        },
    }
    invalid = {
        "description": "Validation Error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
    }
    for route in routes:
        if not (isinstance(route, APIRoute) and route.include_in_schema and _guarded(route)):
            continue
        for method in route.methods or ():
            operation = schema["paths"][route.path_format][method.lower()]
            if {BEARER_SCHEME: []} not in operation.setdefault("security", []):
                operation["security"].append({BEARER_SCHEME: []})
            parameters = operation.setdefault("parameters", [])
            if all(p.get("name") != ORG_HEADER for p in parameters):
                parameters.append(parameter)
            operation.setdefault("responses", {}).setdefault("422", invalid)
    return schema


def _guarded(route: APIRoute) -> bool:
    # A GuardedRoute calls its guard itself; elsewhere a guard is a dependency, however deep.
    return getattr(route, "guard", None) is not None or _depends_on_guard(route.dependant)


def _depends_on_guard(dependant: Dependant) -> bool:
    return any(d.call in GUARDS or _depends_on_guard(d) for d in dependant.dependencies)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), as HTTPBearer
    reads it."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if token and scheme.lower() == "bearer" else None
