"""Supabase access tokens, verified locally, and the caller's permission in their organisation, as
FastAPI dependencies: `current_user` (the bearer token verified, the organisation chosen from
`X-Org-Id`) and `require_permission(...)` on top of it.

Tokens: HS256 with the project's legacy JWT secret, or ES256/RS256 with a key from the project's JWKS
(fetched without blocking the loop, cached). The algorithm decides the key *type*: an HS256 token is
only ever checked against the shared secret and an asymmetric one only against a JWKS key, which rules
out algorithm confusion; `none` and everything else is refused.

Permissions: memberships and role permissions are looked up once per user and reused for
`AUTH_CACHE_S` seconds (default 5): that is the longest a revoked permission can still act.
A verified token is reused for as long, never past its `exp` (keyed by the whole token): checking a
signature is most of our own work on a request (benchmarks/README.md has the figures).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import time as wall_clock  # for `exp`; `time.monotonic` measures the cache windows
from typing import Annotated, Any
from uuid import UUID

import httpx
import jwt
from fastapi import Depends, Header, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.config import Settings
from app.errors import NotAuthenticated, OrganisationRequired, PermissionDenied
from app.operations import OrgAccess

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

    def __init__(self, lookup: Callable[[UUID], Awaitable[list[OrgAccess]]], ttl_s: float) -> None:
        self._lookup = lookup
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
        access = await self._lookup(user_id)
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

bearer_scheme = HTTPBearer(
    # No token is our own JSON 401 (current_user), not HTTPBearer's plain 403.
    auto_error=False,
    scheme_name="HTTPBearer",
    description="A Supabase access token (`make token` locally)",
)


async def verified_claims(request: Request, token: str) -> tuple[float, dict[str, Any]]:
    """The claims of a bearer token this service accepts, and until when they may be reused."""
    verifier: TokenVerifier = request.app.state.token_verifier
    return await verifier.verify_until(token)


async def current_user(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    x_org_id: Annotated[
        str | None,
        Header(
            alias=ORG_HEADER,
            max_length=ORG_HEADER_MAX_LENGTH,
            description="Organisation id or slug; needed only by users in several organisations",
        ),
    ] = None,
) -> CurrentUser:
    """Dependency: the verified caller, in the organisation they chose (any organisation they are in)."""
    if credentials is None:
        raise NotAuthenticated("Missing bearer token")
    token = credentials.credentials
    access: AccessCache = request.app.state.access_cache
    cached = access.caller(token, x_org_id)
    if cached is not None:
        return cached
    token_until, claims = await verified_claims(request, token)
    try:
        user_id = UUID(str(claims["sub"]))
    except ValueError:
        raise NotAuthenticated("Invalid bearer token") from None
    access_until, memberships = await access.get_until(user_id)
    chosen = choose_org(memberships, x_org_id)
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
    access.remember_caller(token, x_org_id, caller, min(token_until, access_until))
    return caller


def require_permission(permission: str) -> Callable[[CurrentUser], Awaitable[CurrentUser]]:
    """Dependency factory: the current user, holding `permission` in the organisation acted on."""

    async def permitted_user(user: Annotated[CurrentUser, Depends(current_user)]) -> CurrentUser:
        if permission not in user.permissions:
            raise PermissionDenied(f"Your role '{user.role}' lacks the permission '{permission}'")
        return user

    permitted_user.__qualname__ = f"require_permission({permission!r})"
    return permitted_user


async def refused_authentication(request: Request) -> NotAuthenticated | None:
    """Why the request's bearer token is refused (None: it verifies). For an operation that needs one,
    this answer comes before anything about the request's body or parameters: FastAPI parses a JSON
    body and an operation's headers before it calls `current_user`, so the validation error handler
    asks here first (main.py)."""
    credentials = await bearer_scheme(request)
    if credentials is None:
        return NotAuthenticated("Missing bearer token")
    try:
        await verified_claims(request, credentials.credentials)
    except NotAuthenticated as exc:
        return exc
    return None


def needs_authentication(route: APIRoute) -> bool:
    """Whether the operation depends on `current_user` (however deep), so only a verified caller may
    learn anything about it."""
    pending = list(route.dependant.dependencies)
    while pending:
        dependency = pending.pop()
        if dependency.call is current_user:
            return True
        pending.extend(dependency.dependencies)
    return False
