"""Verified tokens are reused for AUTH_CACHE_S seconds, never past their `exp`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.auth import TokenVerifier
from app.main import create_app
from conftest import World, make_settings, sign_token

RUNS = "/collection/runs"


@pytest.fixture
async def cached_app(migrated_dsn: str, tmp_path: Path) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    application = create_app(make_settings(migrated_dsn, tmp_path, auth_cache_s=5))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield application, client


def count_signature_checks(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    verifier: TokenVerifier = app.state.token_verifier
    checked: list[str] = []
    original = verifier._verify_signature

    async def counting(token: str) -> dict[str, Any]:
        checked.append(token)
        return await original(token)

    monkeypatch.setattr(verifier, "_verify_signature", counting)
    return checked


class TestVerifiedTokenCache:
    async def test_a_token_is_checked_once_within_the_window(
        self, cached_app: tuple[FastAPI, httpx.AsyncClient], world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        app, client = cached_app
        admin = await world.admin()
        checked = count_signature_checks(app, monkeypatch)

        for _ in range(3):
            assert (await client.get(RUNS, headers=admin.headers)).status_code == 200

        assert checked == [admin.token]

    async def test_a_cached_token_is_refused_once_it_expires(
        self, cached_app: tuple[FastAPI, httpx.AsyncClient], world: World
    ) -> None:
        app, client = cached_app
        admin = await world.admin()
        expires = int(time.time()) + 1
        token = sign_token(admin.user_id, exp=expires)
        headers = {"Authorization": f"Bearer {token}"}
        assert (await client.get(RUNS, headers=headers)).status_code == 200

        await asyncio.sleep(max(0.0, expires - time.time()) + 0.05)
        response = await client.get(RUNS, headers=headers)

        assert response.status_code == 401
        assert response.json()["detail"] == "Token has expired"

    async def test_a_bad_token_is_never_cached(
        self, cached_app: tuple[FastAPI, httpx.AsyncClient], world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        app, client = cached_app
        admin = await world.admin()
        forged = admin.token[:-4] + ("AAAA" if not admin.token.endswith("AAAA") else "BBBB")
        checked = count_signature_checks(app, monkeypatch)

        for _ in range(2):
            assert (await client.get(RUNS, headers={"Authorization": f"Bearer {forged}"})).status_code == 401

        assert checked == [forged, forged]
