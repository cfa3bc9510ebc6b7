"""One Settings object, read from the environment (and `.env`), shared by the whole service."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property, lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit

import jwt
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def packaged(name: str) -> Path:
    """A folder shipped inside the `app` package (the wheel carries them; in a checkout they are links
    to the repository's own `supabase/` and `apps/web/`)."""
    return Path(str(files("app").joinpath(name)))


# Values that must never reach a shared environment.
PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "secret", "super-secret-jwt-token-with-at-least-32-characters-long"}
)


class Environment(StrEnum):
    LOCAL = "local"
    PRODUCTION = "production"


class StoreMode(StrEnum):
    """How the service reaches its data (see `Settings.store_mode`)."""

    POSTGRES = "postgres"  # DATABASE_URL: an asyncpg pool, direct or through Supavisor
    SUPABASE_REST = "supabase_rest"  # SUPABASE_URL + SUPABASE_SERVICE_ROLE_KEY: PostgREST via supabase-py
    EMBEDDED = "embedded"  # neither: local mode starts the embedded Postgres and sets DATABASE_URL


@dataclass(frozen=True, slots=True)
class Pricing:
    """Unit prices and counts: what the estimate assumes and what the executor reserves and charges.
    Integer cents throughout."""

    products_per_category: int
    amazon_product_cents: int
    ebay_search_cents: int
    ebay_searches_per_product: int
    bestsellers_cents: int = 0

    @property
    def cents_per_product(self) -> int:
        return self.amazon_product_cents + self.ebay_searches_per_product * self.ebay_search_cents

    @property
    def cents_per_category(self) -> int:
        """The plan's estimate for a category with no history."""
        return self.products_per_category * self.cents_per_product


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    app_env: Environment = Environment.LOCAL
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # /metrics: open in local mode; in production only with this bearer token (unset: not served).
    metrics_token: SecretStr | None = None

    # Database. Unset in local mode: the embedded Postgres is started and its URL used.
    database_url: SecretStr | None = None
    db_pool_max_size: int = Field(default=10, ge=1)
    db_statement_timeout_ms: int = Field(default=5000, ge=100)
    db_connect_timeout_s: float = Field(default=5.0, gt=0)
    db_acquire_timeout_s: float = Field(default=5.0, gt=0)
    # None: automatic (0 for Supabase's transaction pooler on port 6543, which forbids prepared
    # statements; asyncpg's default otherwise).
    db_statement_cache_size: int | None = Field(default=None, ge=0)

    # Supabase REST mode (SUPABASE_URL and this key, no DATABASE_URL): the same SQL functions called
    # through the project's REST API. The legacy service_role JWT or a secret key (sb_secret_...).
    supabase_service_role_key: SecretStr | None = None

    # Embedded Postgres (local mode): its data and the local JWT secret, under the working directory.
    data_dir: Path = Path(".data")
    embedded_pg_port: int = Field(default=54329, ge=1, le=65535)

    # Supabase auth.
    supabase_url: str | None = None
    supabase_jwt_secret: SecretStr | None = None
    supabase_jwt_issuer: str | None = None
    supabase_jwks_url: str | None = None
    jwt_audience: str = "authenticated"
    jwt_leeway_s: int = Field(default=0, ge=0, le=300)
    jwks_cache_s: int = Field(default=600, ge=0)
    # How long a membership/permission lookup is reused: the longest a revoked permission can act.
    auth_cache_s: float = Field(default=5.0, ge=0, le=60)

    # Estimate: the plan's numbers until real product counts exist.
    products_per_category: int = Field(default=50, ge=1, le=100_000)
    amazon_product_cost_cents: int = Field(default=5, ge=0, le=100_000)
    ebay_search_cost_cents: int = Field(default=5, ge=0, le=100_000)
    ebay_searches_per_product: int = Field(default=1, ge=0, le=100)

    amazon_bestsellers_cost_cents: int = Field(default=5, ge=0, le=100_000)

    # Provider: Oxylabs when both credentials are set, else the sandbox.
    oxylabs_username: str | None = None
    oxylabs_password: SecretStr | None = None
    oxylabs_base_url: str = "https://realtime.oxylabs.io"
    oxylabs_timeout_s: float = Field(default=60.0, gt=0)
    sandbox_latency_ms: int = Field(default=100, ge=0, le=60_000)
    sandbox_failure_rate: float = Field(default=0.0, ge=0, le=1)
    sandbox_charged_failure_rate: float = Field(default=0.0, ge=0, le=1)
    sandbox_call_log: Path | None = None  # tests: every sandbox call, one line each

    # Executor.
    executor_enabled: bool = True
    worker_id: str | None = None
    lease_ttl_s: int = Field(default=10, ge=2, le=3600)
    executor_tick_s: float = Field(default=0.5, gt=0, le=10)
    # The provider account's limits, shared by every process on the database (0: none). Oxylabs' plans:
    # 10 and 3 on the free trial, 50 and 13 from Micro to Venture, 100 and 25 on Business and Corporate.
    provider_rate_per_s: float = Field(default=50.0, ge=0)
    provider_rendered_rate_per_s: float = Field(default=13.0, ge=0)
    # At most this many provider calls in flight from one process (Little's law sizes it below this).
    max_calls_in_flight: int = Field(default=64, ge=1, le=1000)
    provider_max_attempts: int = Field(default=4, ge=1, le=20)
    provider_backoff_s: float = Field(default=0.2, ge=0, le=60)
    max_failed_share: float = Field(default=0.5, gt=0, le=1)
    min_items_for_failure_share: int = Field(default=20, ge=1)
    shutdown_grace_s: float = Field(default=10.0, ge=0)

    recovery_log_limit: int = Field(default=50, ge=1, le=10_000)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # migrations/, local/bootstrap.sql and seed.sql: those shipped with the package unless set.
    supabase_dir: Path = Field(default_factory=lambda: packaged("supabase"))

    @field_validator("cors_origins", mode="before")
    @classmethod
    def split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("supabase_url")
    @classmethod
    def check_supabase_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"SUPABASE_URL must be an http(s) URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("supabase_service_role_key")
    @classmethod
    def check_service_role_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value().strip() == "":
            return None
        key = value.get_secret_value().strip()
        if key.startswith("sb_secret_"):
            return SecretStr(key)
        if key.startswith("sb_publishable_"):
            raise ValueError(
                "SUPABASE_SERVICE_ROLE_KEY holds a publishable key; use a secret key (sb_secret_...)"
            )
        try:
            role = jwt.decode(key, options={"verify_signature": False}).get("role")
        except jwt.PyJWTError:
            role = None
        if role != "service_role":
            # The anon key passes PostgREST but is refused every function: fail now, not per request.
            got = f"a JWT for the role {role!r}" if role else "neither"
            raise ValueError(
                "SUPABASE_SERVICE_ROLE_KEY must be the project's secret key (sb_secret_...) or its "
                f"service_role JWT; got {got}"
            )
        return SecretStr(key)

    @field_validator("database_url", mode="before")
    @classmethod
    def normalise_dsn(cls, value: object) -> object:
        # asyncpg speaks postgresql://; SQLAlchemy-style DSNs are common in copied settings.
        if isinstance(value, str):
            if value == "":
                return None
            for prefix in ("postgresql+asyncpg://", "postgres+asyncpg://"):
                if value.startswith(prefix):
                    return "postgresql://" + value[len(prefix) :]
        return value

    @model_validator(mode="after")
    def refuse_half_a_rest_configuration(self) -> Self:
        # Without DATABASE_URL, the URL and the key together choose the REST mode; one of them alone
        # would silently fall back to the embedded database.
        if self.database_url is None:
            if self.supabase_service_role_key is not None and self.supabase_url is None:
                raise ValueError(
                    "SUPABASE_SERVICE_ROLE_KEY is set but SUPABASE_URL is not: the REST mode needs both"
                )
            if self.supabase_url is not None and self.supabase_service_role_key is None:
                raise ValueError(
                    "SUPABASE_URL is set but neither SUPABASE_SERVICE_ROLE_KEY (REST mode) nor "
                    "DATABASE_URL (direct mode) is"
                )
        return self

    @model_validator(mode="after")
    def refuse_placeholder_secrets(self) -> Self:
        if self.app_env is Environment.PRODUCTION:
            if self.store_mode is StoreMode.EMBEDDED:
                raise ValueError(
                    "DATABASE_URL, or SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY, is required when "
                    "APP_ENV=production"
                )
            secret = self.supabase_jwt_secret.get_secret_value() if self.supabase_jwt_secret else None
            if secret is not None and (secret in PLACEHOLDER_SECRETS or len(secret) < 32):
                raise ValueError("SUPABASE_JWT_SECRET is a placeholder or shorter than 32 characters")
        return self

    def refuse_unverifiable_tokens(self) -> None:
        """ValueError when a server on these settings could verify no token, so every request would be
        a 401: said at start by whatever serves (not a rule of the settings themselves, which
        `collection-api migrate` reads without any token to verify). Local mode without DATABASE_URL
        gets its secret from the embedded data folder."""
        if (
            self.store_mode is not StoreMode.EMBEDDED
            and self.supabase_jwt_secret is None
            and self.jwks_url is None
        ):
            raise ValueError("set SUPABASE_URL (JWKS) or SUPABASE_JWT_SECRET so tokens can be verified")

    @property
    def is_local(self) -> bool:
        return self.app_env is Environment.LOCAL

    @property
    def store_mode(self) -> StoreMode:
        """DATABASE_URL wins; else the URL and the service-role key; else the embedded database."""
        if self.database_url is not None:
            return StoreMode.POSTGRES
        if self.supabase_url is not None and self.supabase_service_role_key is not None:
            return StoreMode.SUPABASE_REST
        return StoreMode.EMBEDDED

    @property
    def jwks_url(self) -> str | None:
        if self.supabase_jwks_url:
            return self.supabase_jwks_url
        if self.supabase_url:
            return f"{self.supabase_url}/auth/v1/.well-known/jwks.json"
        return None

    @property
    def jwt_issuer(self) -> str | None:
        if self.supabase_jwt_issuer:
            return self.supabase_jwt_issuer
        if self.supabase_url:
            return f"{self.supabase_url}/auth/v1"
        return None

    @property
    def provider_name(self) -> str:
        return "oxylabs" if self.oxylabs_username and self.oxylabs_password else "sandbox"

    @property
    def effective_worker_id(self) -> str:
        # Stable per host and port, so a restarted process takes its own runs back at once.
        return self.worker_id or f"{socket.gethostname()}:{self.port}"

    @cached_property
    def pricing(self) -> Pricing:
        return Pricing(
            products_per_category=self.products_per_category,
            amazon_product_cents=self.amazon_product_cost_cents,
            ebay_search_cents=self.ebay_search_cost_cents,
            ebay_searches_per_product=self.ebay_searches_per_product,
            bestsellers_cents=self.amazon_bestsellers_cost_cents,
        )

    @property
    def uses_transaction_pooler(self) -> bool:
        if self.database_url is None:
            return False
        try:
            return urlsplit(self.database_url.get_secret_value()).port == 6543
        except ValueError:
            return False

    @property
    def statement_cache_size(self) -> int:
        if self.db_statement_cache_size is not None:
            return self.db_statement_cache_size
        return 0 if self.uses_transaction_pooler else 100


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use (not at import, so a
    misconfiguration is reported by whoever starts the service, with its reasons)."""
    return Settings()
