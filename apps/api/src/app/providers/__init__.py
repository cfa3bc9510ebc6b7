"""Scraping providers: Oxylabs when credentials are configured, else the sandbox."""

from __future__ import annotations

from app.config import Settings
from app.providers.base import Provider


def make_provider(settings: Settings) -> Provider:
    if settings.provider_name == "oxylabs":
        from app.providers.oxylabs import OxylabsProvider

        assert settings.oxylabs_username is not None and settings.oxylabs_password is not None
        return OxylabsProvider(
            settings.oxylabs_username,
            settings.oxylabs_password.get_secret_value(),
            base_url=settings.oxylabs_base_url,
            timeout_s=settings.oxylabs_timeout_s,
        )
    from app.providers.sandbox import SandboxProvider

    return SandboxProvider(
        latency_ms=settings.sandbox_latency_ms,
        failure_rate=settings.sandbox_failure_rate,
        charged_failure_rate=settings.sandbox_charged_failure_rate,
        call_log=settings.sandbox_call_log,
        worker_id=settings.effective_worker_id,
    )
