"""The admin console at /admin, end to end: a real server process (executor on, sandbox provider) on the
test database, driven through Debian's chromium by Playwright.

A person signs in by pasting a token, sees 401/403 explained, edits the settings (the API's 422 errors
beside the fields), watches an estimate turn amber and then red with Create refused, creates and starts
a run and watches its progress bar move to completed, and pauses and resumes another run from the list.
A run page whose event stream is cut mid-run reconnects, resuming after the last event it received, and
lists each status change once.
Screenshots of the run page go to the test's folder; with UPDATE_DOCS_SCREENSHOT=1 the finished run's
is also copied to docs/admin-run-page.png, the README's picture.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.config import Settings
from conftest import JWT_ISSUER, JWT_SECRET, REPO_ROOT, Actor, World, free_port, sign_token

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS_SCREENSHOT = REPO_ROOT / "docs" / "admin-run-page.png"

if not CHROMIUM.exists():
    pytest.skip(
        f"no chromium at {CHROMIUM}: `apt-get install chromium` (.ci/run installs it when missing)",
        allow_module_level=True,
    )

from playwright.async_api import Browser, ConsoleMessage, Page, Route, async_playwright, expect  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("db")]

START_TIMEOUT_S = 30.0
UI_TIMEOUT_MS = 10_000
# Fast and real: the sandbox answers in ~30 ms, two items in flight per run, and one call in 25 is a
# charged 404 so that the items table has failures with their errors to show.
EXECUTOR_ENV = {
    "EXECUTOR_ENABLED": "true",
    "EXECUTOR_TICK_S": "0.1",
    "SANDBOX_LATENCY_MS": "30",
    "SANDBOX_CHARGED_FAILURE_RATE": "0.04",
    "MAX_CALLS_IN_FLIGHT": "2",
    "PROVIDER_BACKOFF_S": "0.01",
}
# Category ids are data: these must show as text, never become markup or reach SQL as code.
HOSTILE_IDS = ["<img src=x onerror=alert(1)>", "'; drop table collection_runs; --"]
HOSTILE_NAME = "Waiting <img src=x onerror=alert(2)>"


@dataclass
class ConsoleServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def admin_url(self) -> str:
        return f"{self.url}/admin"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


async def start_server(database_url: str, log_dir: Path, **env: str) -> ConsoleServer:
    """`python -m app.cli serve` on a free loopback port, as `make run` serves it."""
    port = free_port()
    ours = {name.upper() for name in Settings.model_fields}
    environment = {k: v for k, v in os.environ.items() if k.upper() not in ours}
    environment.update(
        DATABASE_URL=database_url,
        SUPABASE_JWT_SECRET=JWT_SECRET,
        SUPABASE_JWT_ISSUER=JWT_ISSUER,
        HOST="127.0.0.1",
        PORT=str(port),
        WORKER_ID=f"console-test-{port}",
        AUTH_CACHE_S="0",
        DATA_DIR=str(log_dir / "data"),
        PYTHONUNBUFFERED="1",
        **EXECUTOR_ENV,
    )
    environment.update(env)
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"],
            cwd=REPO_ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = ConsoleServer(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    async with httpx.AsyncClient(timeout=2.0) as http:
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode}:\n{server.log}")
            try:
                if (await http.get(f"{server.url}/healthz")).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"server not healthy after {START_TIMEOUT_S}s:\n{server.log}")
            await asyncio.sleep(0.1)


async def stop_server(server: ConsoleServer) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        deadline = time.monotonic() + 10
        while server.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=10)


@pytest.fixture
async def serve(migrated_dsn: str, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ConsoleServer]]]:
    servers: list[ConsoleServer] = []

    async def start(**env: str) -> ConsoleServer:
        server = await start_server(migrated_dsn, tmp_path, **env)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        await asyncio.gather(*(stop_server(server) for server in servers))


@pytest.fixture(scope="module")
async def server(migrated_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ConsoleServer]:
    """One server for the tests that need no settings of their own (each test still starts from empty
    tables, and the server keeps nothing between requests: AUTH_CACHE_S=0)."""
    shared = await start_server(migrated_dsn, tmp_path_factory.mktemp("console-server"))
    try:
        yield shared
    finally:
        await stop_server(shared)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh context (its own session storage) whose page must end the test without script errors,
    CSP violations or dialogs (an alert() would mean injected markup ran)."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        text = message.text
        if message.type == "error" and "Failed to load resource" not in text:
            problems.append(f"console error: {text}")
        if "Content Security Policy" in text:
            problems.append(f"CSP: {text}")

    async def on_dialog(dialog: Any) -> None:
        if dialog.type == "confirm":
            await dialog.accept()
        else:
            problems.append(f"{dialog.type} dialog: {dialog.message}")
            await dialog.dismiss()

    page.on("console", on_console)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("dialog", on_dialog)
    yield page
    await context.close()
    assert problems == []


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = tmp_path / "screenshots"
    folder.mkdir()
    return folder


async def sign_in(page: Page, server: ConsoleServer, token: str) -> None:
    await page.goto(server.admin_url)
    await page.fill("#signin-token", token)
    await page.click("#signin-submit")
    await expect(page.locator("#nav")).to_be_visible(timeout=UI_TIMEOUT_MS)


def api_client(server: ConsoleServer, actor: Actor) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"{server.url}/collection", headers=actor.headers, timeout=10.0)


async def progress_of(page: Page, scope: str) -> tuple[int, int]:
    bar = page.locator(f"{scope} [role=progressbar]")
    now = await bar.get_attribute("aria-valuenow", timeout=UI_TIMEOUT_MS)
    top = await bar.get_attribute("aria-valuemax", timeout=UI_TIMEOUT_MS)
    return int(now or 0), int(top or 0)


class TestServing:
    async def test_admin_serves_the_console_with_a_strict_csp(self, server: ConsoleServer) -> None:
        async with httpx.AsyncClient(base_url=server.url, follow_redirects=True) as http:
            index = await http.get("/admin")
            script = await http.get("/admin/js/app.js")
            missing = await http.get("/admin/nothing-here.js")
            slash = await http.get("/admin/")

        assert index.status_code == slash.status_code == 200
        assert str(index.url).endswith("/admin/")
        assert index.headers["content-type"].startswith("text/html")
        assert "Content-Security-Policy" in index.headers
        assert "script-src 'self'" in index.headers["content-security-policy"]
        assert "<script>" not in index.text and "style=" not in index.text  # nothing inline
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert missing.status_code == 404


class TestSignIn:
    async def test_member_without_the_permission_sees_the_403_message(
        self, page: Page, server: ConsoleServer, world: World
    ) -> None:
        member = await world.member_only()

        await page.goto(server.admin_url)
        await page.fill("#signin-token", member.token)
        await page.click("#signin-submit")

        error = page.locator("#signin-error")
        await expect(error).to_be_visible(timeout=UI_TIMEOUT_MS)
        await expect(error).to_contain_text("Permission denied (403)")
        await expect(error).to_contain_text("Your role 'member' lacks the permission 'admin.automation'")
        await expect(page.locator("#nav")).to_be_hidden()
        assert await page.evaluate("sessionStorage.length") == 0

    async def test_a_refused_token_sees_the_401_message(self, page: Page, server: ConsoleServer) -> None:
        await page.goto(server.admin_url)
        await page.fill("#signin-token", sign_token("00000000-0000-4000-8000-000000000001", exp=1))
        await page.click("#signin-submit")

        error = page.locator("#signin-error")
        await expect(error).to_contain_text("Not signed in (401)", timeout=UI_TIMEOUT_MS)
        await expect(error).to_contain_text("Token has expired")
        await expect(page.locator("#nav")).to_be_hidden()

    async def test_admin_stays_signed_in_for_the_tab_until_signing_out(
        self, page: Page, server: ConsoleServer, world: World
    ) -> None:
        admin = await world.admin()

        await sign_in(page, server, admin.token)
        await expect(page.locator("#runs-table, .runs__body .empty").first).to_be_visible()
        assert await page.evaluate("sessionStorage.getItem('collection-admin.token')") == admin.token
        await page.reload()
        await expect(page.locator("#nav")).to_be_visible(timeout=UI_TIMEOUT_MS)

        await page.click("#sign-out")
        await expect(page.locator("#signin")).to_be_visible()
        assert await page.evaluate("sessionStorage.length") == 0


class TestSettings:
    async def test_edits_the_settings_in_dollars_and_shows_422_beside_the_field(
        self, page: Page, server: ConsoleServer, world: World, db: asyncpg.Pool
    ) -> None:
        admin = await world.admin()
        await sign_in(page, server, admin.token)
        await page.click("#nav >> text=Settings")
        cap = page.locator("#field-budget_cap_cents")
        await expect(cap).to_have_value("25.00", timeout=UI_TIMEOUT_MS)
        await expect(page.locator("#field-soft_warning_percent")).to_have_value("80")

        # Out of the API's bounds: its 422 messages appear beside the fields they name, nothing saved.
        await cap.fill("-1")
        await page.fill("#field-soft_warning_percent", "150")
        await page.click("#settings-form button[type=submit]")
        cap_error = page.locator("[data-field=budget_cap_cents] .field__error")
        percent_error = page.locator("[data-field=soft_warning_percent] .field__error")
        await expect(cap_error).to_contain_text("greater than or equal to 0", timeout=UI_TIMEOUT_MS)
        await expect(percent_error).to_contain_text("less than or equal to 100")
        await expect(page.locator("[data-field=max_concurrent_runs] .field__error")).to_be_hidden()
        assert (
            await db.fetchval("select count(*) from collection_settings where budget_cap_cents <> 2500") == 0
        )

        # Dollars in, integer cents stored.
        await cap.fill("40.10")
        await page.fill("#field-soft_warning_percent", "60")
        await page.fill("#field-max_concurrent_runs", "5")
        await page.click("#settings-form button[type=submit]")
        await expect(page.locator("#settings-form .form__note")).to_have_text(
            "Settings saved.", timeout=UI_TIMEOUT_MS
        )
        await expect(cap_error).to_be_hidden()
        await expect(percent_error).to_be_hidden()
        row = await db.fetchrow("select * from collection_settings where org_id = $1", admin.org_id)
        assert (row["budget_cap_cents"], row["soft_warning_percent"], row["max_concurrent_runs"]) == (
            4010,
            60,
            5,
        )

        await page.reload()
        await expect(cap).to_have_value("40.10", timeout=UI_TIMEOUT_MS)

    async def test_a_malformed_amount_is_explained_without_asking_the_api(
        self, page: Page, server: ConsoleServer, world: World
    ) -> None:
        admin = await world.admin()
        await sign_in(page, server, admin.token)
        await page.click("#nav >> text=Settings")
        await expect(page.locator("#field-budget_cap_cents")).to_have_value("25.00", timeout=UI_TIMEOUT_MS)

        await page.fill("#field-budget_cap_cents", "12.345")
        await page.click("#settings-form button[type=submit]")

        await expect(page.locator("[data-field=budget_cap_cents] .field__error")).to_contain_text(
            "amount in dollars"
        )


class TestNewRunAndRunPage:
    async def test_estimate_refusal_then_create_start_and_watch_a_run_complete(
        self, page: Page, server: ConsoleServer, world: World, db: asyncpg.Pool, shots: Path
    ) -> None:
        admin = await world.admin()  # defaults: cap $25.00, warning at 80 % ($20.00)
        await sign_in(page, server, admin.token)
        await page.click("#nav >> text=New run")
        categories = page.locator("#field-category_ids")
        estimate = page.locator("#estimate")
        create = page.locator("#create-run")
        reason = page.locator("#create-reason")

        # Live estimate as you type: under the warning threshold...
        await categories.fill("electronics, garden")
        await expect(page.locator("#estimate-total")).to_have_text("$10.00", timeout=UI_TIMEOUT_MS)
        await expect(estimate.locator(".budget")).to_have_attribute("data-level", "ok")
        await expect(create).to_be_enabled()
        # ...amber past it (at the cap is still allowed)...
        await categories.fill("c1\nc2\nc3\nc4\nc5")
        await expect(page.locator("#estimate-total")).to_have_text("$25.00", timeout=UI_TIMEOUT_MS)
        await expect(estimate.locator(".budget")).to_have_attribute("data-level", "warn")
        await expect(create).to_be_enabled()
        # ...red past the cap: Create disabled and the reason shown.
        await categories.fill("c1\nc2\nc3\nc4\nc5\nc6")
        await expect(page.locator("#estimate-total")).to_have_text("$30.00", timeout=UI_TIMEOUT_MS)
        await expect(estimate.locator(".budget")).to_have_attribute("data-level", "over")
        await expect(create).to_be_disabled()
        await expect(reason).to_contain_text("$30.00 is above the budget cap $25.00")
        await page.screenshot(path=shots / "new-run-over-budget.png", full_page=True)

        # A duplicate is the API's 422, shown beside the field.
        await categories.fill("c1, c1")
        await expect(page.locator("[data-field=category_ids] .field__error")).to_contain_text(
            "duplicate category ids: c1", timeout=UI_TIMEOUT_MS
        )
        await expect(create).to_be_disabled()

        # Ids that look like markup or SQL are shown as text.
        ids = ["electronics", *HOSTILE_IDS]
        await categories.fill("\n".join(ids))
        await expect(page.locator("#estimate-total")).to_have_text("$15.00", timeout=UI_TIMEOUT_MS)
        cells = page.locator("#estimate-breakdown tbody tr td:first-child")
        assert await cells.all_text_contents() == ids
        assert await page.locator("#estimate img").count() == 0
        await page.fill("#field-name", "Spring restock")
        await expect(create).to_be_enabled()
        await create.click()

        # The run page: pending, with Start and Cancel only.
        await expect(page.locator("#run-status")).to_have_text("pending", timeout=UI_TIMEOUT_MS)
        await expect(page.locator(".run__name")).to_have_text("Spring restock")
        await expect(page.locator("#flash")).to_contain_text("created")
        actions = page.locator("#run-actions button")
        assert await actions.all_text_contents() == ["Start", "Cancel"]
        assert await page.locator("#run-page .chip").all_text_contents() == ids
        assert await page.locator("#run-page b, #run-page img").count() == 0

        await page.click("#run-actions >> text=Start")
        await expect(page.locator("#run-status")).to_have_text("running", timeout=UI_TIMEOUT_MS)
        assert await actions.all_text_contents() == ["Pause", "Cancel"]

        # Watch the bar move to the end from the event stream.
        seen: list[int] = []
        midway_shot = False
        deadline = time.monotonic() + 40
        while True:
            done, total = await progress_of(page, "#run-progress")
            if not seen or seen[-1] != done:
                seen.append(done)
            if not midway_shot and 0 < done < total:
                await page.screenshot(path=shots / "run-page-running.png", full_page=True)
                midway_shot = True
            if await page.locator("#run-status").text_content() == "completed":
                break
            assert time.monotonic() < deadline, f"run not completed in 40 s; progress seen {seen}"
            await asyncio.sleep(0.1)
        await expect(page.locator("#run-live")).to_have_text("ended: completed", timeout=UI_TIMEOUT_MS)

        row = await db.fetchrow("select * from collection_runs where org_id = $1", admin.org_id)
        assert row["status"] == "completed"
        done, total = await progress_of(page, "#run-progress")
        assert done == total == row["processed_items"] == row["total_items"] > 0
        assert len([v for v in seen if 0 < v < total]) >= 2, f"the bar did not move visibly: {seen}"
        assert seen == sorted(seen)
        assert await actions.count() == 0  # nothing is allowed from completed
        cost = page.locator("#run-cost")
        await expect(cost).to_contain_text(f"Cost so far: ${row['actual_cost_cents'] // 100}.")
        await expect(cost).to_contain_text("cap $25.00")
        await expect(page.locator("#run-message")).to_contain_text("Completed:")

        # Items, sellers found (this run's marked), then the failures with their errors.
        await expect(page.locator("#items-table tbody tr")).to_have_count(25, timeout=UI_TIMEOUT_MS)
        await expect(page.locator("#sellers-table tbody tr").first).to_be_visible(timeout=UI_TIMEOUT_MS)
        assert await page.locator("#sellers-table .tag--this-run").count() > 0
        await page.screenshot(path=shots / "run-page-completed.png", full_page=True)

        assert row["failed_items"] > 0, "the sandbox's 4 % charged failures left no failed item"
        await page.select_option("#items-filter", "failed")
        failed_rows = page.locator("#items-table tbody tr")
        await expect(failed_rows).to_have_count(min(row["failed_items"], 25), timeout=UI_TIMEOUT_MS)
        assert set(await failed_rows.evaluate_all("rows => rows.map(r => r.dataset.status)")) == {"failed"}
        errors = await page.locator("#items-table .item__error").all_text_contents()
        assert errors and all("target answered 404" in e for e in errors)
        await page.screenshot(path=shots / "run-page-failures.png", full_page=True)
        assert midway_shot, f"never saw the run midway: {seen}"
        if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
            DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
            shutil.copyfile(shots / "run-page-failures.png", DOCS_SCREENSHOT)

        # The categories collected are now priced from history (one whose best-sellers page came back: the
        # sandbox's charged failures can lose a whole category).
        collected = await db.fetchval(
            "select category_id from collection_run_categories where run_id = $1 and error is null "
            "order by position limit 1",
            row["id"],
        )
        await page.click("#nav >> text=New run")
        await page.fill("#field-category_ids", f"{collected}\nbrand-new")
        history = page.locator(f"#estimate-breakdown tbody tr[data-category={collected}] .tag")
        await expect(history).to_have_text("history", timeout=UI_TIMEOUT_MS)
        await expect(page.locator("#estimate-breakdown tbody tr[data-category=brand-new] .tag")).to_have_text(
            "plan default"
        )


class TestRunsList:
    async def test_paged_filtered_list_with_only_the_allowed_buttons_pauses_and_resumes_a_run(
        self,
        page: Page,
        serve: Callable[..., Awaitable[ConsoleServer]],
        world: World,
        db: asyncpg.Pool,
    ) -> None:
        # Slower calls, so the run is still running when the buttons are clicked.
        server = await serve(SANDBOX_LATENCY_MS="150")
        admin = await world.admin()
        async with api_client(server, admin) as api:
            assert (await api.patch("/settings", json={"max_concurrent_runs": 5})).status_code == 200
            for i in range(20):
                run = (await api.post("/runs", json={"name": f"old {i}", "category_ids": ["toys"]})).json()
                assert (await api.post(f"/runs/{run['id']}/cancel")).status_code == 200
            waiting = {"name": HOSTILE_NAME, "category_ids": ["toys"]}
            pending = (await api.post("/runs", json=waiting)).json()
            busy = (await api.post("/runs", json={"name": "Busy", "category_ids": ["a", "b", "c"]})).json()
            assert (await api.post(f"/runs/{busy['id']}/start")).status_code == 200

        await sign_in(page, server, admin.token)
        rows = page.locator("#runs-table tbody tr")
        await expect(rows).to_have_count(20, timeout=UI_TIMEOUT_MS)
        # Newest first; the pager counts every run.
        assert (await rows.nth(0).get_attribute("data-run-id")) == busy["id"]
        assert (await rows.nth(1).get_attribute("data-run-id")) == pending["id"]
        await expect(page.locator(".pager__info")).to_have_text("1–20 of 22")
        busy_row = page.locator(f"tr[data-run-id='{busy['id']}']")
        pending_row = page.locator(f"tr[data-run-id='{pending['id']}']")
        cancelled_row = rows.nth(2)
        assert await pending_row.locator("button").all_text_contents() == ["Start", "Cancel"]
        await expect(pending_row.locator("a.run-link")).to_have_text(HOSTILE_NAME)
        assert await page.locator("#runs-table img").count() == 0
        assert await busy_row.locator("button").all_text_contents() == ["Pause", "Cancel"]
        assert await cancelled_row.locator("button").count() == 0
        await expect(busy_row.locator("[role=progressbar]")).to_be_visible()
        await expect(busy_row.locator(".cost__estimated")).to_have_text(" of est. $15.00")

        await page.click("text=Next →")
        await expect(page.locator(".pager__info")).to_have_text("21–22 of 22", timeout=UI_TIMEOUT_MS)
        await expect(rows).to_have_count(2)
        await page.click("text=← Previous")
        await expect(page.locator(".pager__info")).to_have_text("1–20 of 22", timeout=UI_TIMEOUT_MS)

        # Pause, then resume, the running run from the list.
        await busy_row.locator("button[data-action=pause]").click()
        await expect(busy_row).to_have_attribute("data-status", "paused", timeout=UI_TIMEOUT_MS)
        assert await busy_row.locator("button").all_text_contents() == ["Resume", "Cancel"]
        assert await db.fetchval("select status from collection_runs where id = $1", busy["id"]) == "paused"
        await expect(page.locator("#flash")).to_contain_text("is now paused")

        await busy_row.locator("button[data-action=resume]").click()
        await expect(busy_row).to_have_attribute("data-status", "running", timeout=UI_TIMEOUT_MS)
        assert await busy_row.locator("button").all_text_contents() == ["Pause", "Cancel"]
        assert await db.fetchval("select status from collection_runs where id = $1", busy["id"]) == "running"

        # The list's bar follows the run while it runs.
        start, _ = await progress_of(page, f"tr[data-run-id='{busy['id']}']")
        await expect(busy_row.locator("[role=progressbar]")).not_to_have_attribute(
            "aria-valuenow", str(start), timeout=UI_TIMEOUT_MS
        )

        # Filtered by status on the server: the total counts only the matching runs.
        await page.select_option("#status-filter", "cancelled")
        await expect(page.locator(".pager__info")).to_have_text("1–20 of 20", timeout=UI_TIMEOUT_MS)
        assert set(await rows.evaluate_all("rows => rows.map(r => r.dataset.status)")) == {"cancelled"}
        await page.select_option("#status-filter", "pending")
        await expect(rows).to_have_count(1, timeout=UI_TIMEOUT_MS)
        assert (await rows.first.get_attribute("data-run-id")) == pending["id"]
        await page.select_option("#status-filter", "paused")
        await expect(page.locator(".runs__body .empty")).to_have_text(
            "No paused runs.", timeout=UI_TIMEOUT_MS
        )
        assert page.url.endswith("#/runs?status=paused")

        # Opening a run from the list shows its live page.
        await page.select_option("#status-filter", "running")
        await page.click(f"tr[data-run-id='{busy['id']}'] a.run-link")
        await expect(page.locator("#run-status")).to_have_text("running", timeout=UI_TIMEOUT_MS)
        await expect(page.locator("#run-live")).to_have_text("live", timeout=UI_TIMEOUT_MS)


async def stream_cut_short(url: str, actor: Actor, change: Callable[[], Awaitable[None]]) -> str:
    """What a dropped connection delivers: the run's event stream as the server sends it up to its first
    progress snapshot, then (after `change()`) on into the transition that change makes, cut off before
    that event's `id:` line and the blank line that would complete it."""
    sent = ""
    changed = False
    block: list[str] = []
    async with httpx.AsyncClient(timeout=UI_TIMEOUT_MS / 1000) as http:
        headers = {**actor.headers, "Accept": "text/event-stream"}
        async with http.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if line:
                    block.append(line)
                    continue
                if changed and "event: transition" in block:
                    return sent + "".join(f"{field}\n" for field in block if not field.startswith("id:"))
                sent += "".join(f"{field}\n" for field in block) + "\n"
                if not changed and "event: progress" in block:
                    await change()
                    changed = True
                block = []
    raise AssertionError(f"the stream ended before the change's transition:\n{sent}")


@dataclass
class Change:
    id: int
    from_status: str
    to_status: str
    reason: str | None

    @property
    def pattern(self) -> re.Pattern[str]:
        """How the run page lists it, after the time it happened."""
        reason = f" ({self.reason})" if self.reason else ""
        return re.compile(re.escape(f" {self.from_status} → {self.to_status}{reason}") + "$")


async def changes_of(db: asyncpg.Pool, run_id: str) -> list[Change]:
    """The run's status changes (its creation aside), in order."""
    rows = await db.fetch(
        "select id, from_status, to_status, reason from public.collection_run_events "
        "where run_id = $1 and from_status is not null order by id",
        run_id,
    )
    return [Change(r["id"], r["from_status"], r["to_status"], r["reason"]) for r in rows]


class TestRunPageReconnects:
    @pytest.mark.parametrize("replayed", [False, True], ids=["server-resumes", "server-replays-everything"])
    async def test_a_cut_stream_resumes_after_its_last_event_and_lists_each_status_change_once(
        self,
        page: Page,
        serve: Callable[..., Awaitable[ConsoleServer]],
        world: World,
        db: asyncpg.Pool,
        replayed: bool,
    ) -> None:
        """`replayed`: the reconnect reaches the server without its Last-Event-ID (as through a proxy
        that drops it), so every transition comes again and the page must skip those it has listed."""
        # Slow calls: the run is far from done when the test has paused, resumed and cancelled it.
        server = await serve(SANDBOX_LATENCY_MS="1000")
        admin = await world.admin()
        async with api_client(server, admin) as api:
            run = (await api.post("/runs", json={"name": "Cut", "category_ids": ["a", "b", "c"]})).json()
            assert (await api.post(f"/runs/{run['id']}/start")).status_code == 200

            requests: list[dict[str, str]] = []  # the headers of each events request the console made
            failures: list[BaseException] = []
            cut, reconnected = asyncio.Event(), asyncio.Event()

            async def pause() -> None:
                assert (await api.post(f"/runs/{run['id']}/pause")).status_code == 200

            async def events(route: Route) -> None:
                requests.append(await route.request.all_headers())
                if len(requests) > 1:
                    reconnected.set()
                    headers = {
                        k: v for k, v in requests[-1].items() if not (replayed and k == "last-event-id")
                    }
                    await route.continue_(headers=headers)
                    return
                # The first stream drops mid-run, in the middle of an event: the pending → running
                # transition and a snapshot arrive whole, the running → paused transition only in part (the
                # reconnect must bring it, once).
                try:
                    body = await stream_cut_short(route.request.url, admin, pause)
                    await route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)
                except BaseException as error:
                    failures.append(error)
                    raise
                finally:
                    cut.set()

            await page.route("**/collection/runs/*/events", events)
            await sign_in(page, server, admin.token)
            await page.click(f"tr[data-run-id='{run['id']}'] a.run-link")
            await asyncio.wait_for(cut.wait(), UI_TIMEOUT_MS / 1000)
            assert failures == []
            await asyncio.wait_for(reconnected.wait(), UI_TIMEOUT_MS / 1000)
            await page.click("summary >> text=Status changes")
            log = page.locator("#run-log li")

            # A change made on the resumed stream: once it is listed, so is everything that stream sent
            # before it.
            await expect(page.locator("#run-status")).to_have_text("paused", timeout=UI_TIMEOUT_MS)
            await page.click("#run-actions >> text=Resume")
            await expect(log.last).to_contain_text("paused → running", timeout=UI_TIMEOUT_MS)
            await expect(log).to_have_text([c.pattern for c in await changes_of(db, run["id"])])

            await page.click("#run-actions >> text=Cancel")
            await expect(page.locator("#run-live")).to_have_text("ended: cancelled", timeout=UI_TIMEOUT_MS)

        changes = await changes_of(db, run["id"])
        assert [(c.from_status, c.to_status) for c in changes] == [
            ("pending", "running"),
            ("running", "paused"),
            ("paused", "running"),
            ("running", "cancelled"),
        ]
        await expect(log).to_have_text([c.pattern for c in changes])
        assert await log.evaluate_all("items => items.map((li) => li.dataset.eventId)") == [
            str(c.id) for c in changes
        ]
        # The console resumed after the last event it had whole, and once was enough.
        assert "last-event-id" not in requests[0]
        assert [r.get("last-event-id") for r in requests[1:]] == [str(changes[0].id)], requests
