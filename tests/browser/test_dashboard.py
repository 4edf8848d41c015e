"""The dashboard in a real browser: Debian's chromium driven by Playwright against the whole gateway
served over HTTP by uvicorn (SQLite, real Redis, mock upstream processes). An owner signs in, creates
a key, binds a provider, sends a request with the key and finds it in the logs table. Screenshots of
each section land in docs/screenshots/."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import MockProcess, write_catalog
from trex_serve.catalog import load_catalog
from trex_serve.local.embedded import free_port, port_open
from trex_serve.local.standalone import standalone_gateway
from trex_serve.settings import Settings

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
# The docs' screenshots are refreshed on request only (TREX_UPDATE_SCREENSHOTS=1); a plain test run
# writes its shots to a scratch folder so it never dirties the checkout.
SHOTS = (Path(__file__).resolve().parents[2] / "docs" / "screenshots" if os.environ.get("TREX_UPDATE_SCREENSHOTS")
         else Path(tempfile.gettempdir()) / "trex-dashboard-shots")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
OP = {"Authorization": "Bearer op"}


class Gateway(threading.Thread):
    """The gateway (same wiring as the integration ``gw`` fixture) on its own event loop, served over
    real HTTP by uvicorn so a browser can reach it."""

    def __init__(self, tmp_path: Path, mocks: dict[str, MockProcess], redis_url: str, key_prefix: str) -> None:
        super().__init__(daemon=True)
        self.tmp_path, self.mocks, self.redis_url, self.key_prefix = tmp_path, mocks, redis_url, key_prefix
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.error: BaseException | None = None
        self._server = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by the fixture
            self.error = exc

    async def _main(self) -> None:
        import uvicorn

        catalog = load_catalog(write_catalog(self.tmp_path / "catalog.yaml", self.mocks))
        database_url = f"sqlite:///{self.tmp_path / 'trex.db'}"
        settings = Settings(catalog_path="", database_url=database_url, redis_url=self.redis_url,
                            admin_token="op", secret_key="test-secret")
        async with standalone_gateway(settings, catalog, counters_prefix=self.key_prefix) as gateway:
            self._server = uvicorn.Server(uvicorn.Config(gateway.app, host="127.0.0.1", port=self.port,
                                                         log_level="warning", lifespan="off"))
            await self._server.serve()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self.join(timeout=15)


@pytest.fixture
def gateway(tmp_path, redis_url, key_prefix):
    mocks = {"alpha": MockProcess("alpha"), "beta": MockProcess("beta")}
    gw = Gateway(tmp_path, mocks, redis_url, key_prefix)
    gw.start()
    deadline = time.monotonic() + 30
    while not port_open("127.0.0.1", gw.port):
        if gw.error is not None or time.monotonic() > deadline:
            raise RuntimeError(f"gateway did not start: {gw.error!r}")
        time.sleep(0.05)
    yield gw
    gw.stop()
    for m in mocks.values():
        m.stop()


@pytest.fixture
def page():
    if CHROMIUM is None:
        pytest.skip("chromium not found (apt-get install chromium); the dashboard browser test needs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        pg = context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        pg.js_errors = errors
        yield pg
        context.close()
        browser.close()


def shot(page, name: str, selector: str | None = None) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    target = page.locator(selector) if selector else page
    if selector:
        target.scroll_into_view_if_needed()
        target.screenshot(path=str(SHOTS / f"{name}.png"))
    else:
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_owner_signs_in_creates_a_key_binds_a_provider_and_finds_the_request_in_the_logs(gateway, page):
    api = httpx.Client(base_url=gateway.url, timeout=10)
    acc = api.post("/admin/v1/accounts", json={"name": "Acme Labs", "plan": "free"}, headers=OP).json()
    api.post(f"/admin/v1/accounts/{acc['id']}/credits", json={"amount": 25, "reason": "welcome"}, headers=OP)

    page.goto(f"{gateway.url}/dashboard")
    assert page.title().startswith("Trex Serve")
    shot(page, "dashboard-signin")

    page.get_by_label("Owner token").fill(acc["owner_token"])
    page.get_by_role("button", name="Sign in").click()
    page.locator("#app").wait_for(state="visible")
    assert "Acme Labs" in page.locator("#who").inner_text()
    page.locator("#ledger-totals").get_by_text("25", exact=True).first.wait_for()

    page.get_by_label("New key name").fill("browser-test")
    page.get_by_role("button", name="Create key").click()
    page.locator("#new-key").wait_for(state="visible")
    key = page.locator("#new-key-value").inner_text().strip()
    assert key.startswith("trex-")
    keys_table = page.locator("#keys-table")
    keys_table.get_by_text("browser-test").wait_for()
    assert key not in keys_table.inner_text()

    page.get_by_label("Provider", exact=True).select_option("byok")
    page.get_by_label("Provider API key").fill("sk-browser-secret-123456789")
    page.get_by_role("button", name="Save binding").click()
    bindings = page.locator("#bindings-table")
    bindings.get_by_text("byok").wait_for()
    assert "sk-browser-secret-123456789" not in page.content()

    r = api.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                 headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    rid = r.headers["X-Trex-Request-Id"]
    # A cached Anthropic answer (the provider's own usage, replayed by the mock): its token classes show
    # in the log row and in today's totals.
    gateway.mocks["alpha"].control(usage={"input_tokens": 1200, "cache_read_input_tokens": 30000,
                                          "cache_creation_input_tokens": 2000, "output_tokens": 500,
                                          "cache_creation": {"ephemeral_5m_input_tokens": 1500,
                                                             "ephemeral_1h_input_tokens": 500}})
    cached = api.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": "cached-claude", "messages": [{"role": "user", "content": "again"}]})
    assert cached.status_code == 200, cached.text
    cached_rid = cached.headers["X-Trex-Request-Id"]
    bad = api.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
    assert bad.status_code == 404
    # A response-cache hit: its row says the cache answered, not a provider.
    hit_body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "same again"}],
                "trex": {"cache": {"ttl_s": 60}}}
    assert api.post("/v1/chat/completions", json=hit_body, headers={"Authorization": f"Bearer {key}"}
                    ).headers["X-Trex-Cache"] == "miss"
    hit = api.post("/v1/chat/completions", json=hit_body, headers={"Authorization": f"Bearer {key}"})
    assert hit.headers["X-Trex-Cache"] == "hit"
    hit_rid = hit.headers["X-Trex-Request-Id"]

    logs = page.locator("#logs-table")
    deadline = time.monotonic() + 10
    while any(r not in logs.inner_text() for r in (rid, cached_rid, hit_rid)):
        assert time.monotonic() < deadline, "the request never appeared in the logs table"
        page.locator("#logs-form").get_by_role("button", name="Apply").click()
        page.wait_for_timeout(300)
    assert "gpt-4o-mini" in logs.inner_text()
    cached_row = logs.locator("tr", has_text=cached_rid)
    assert "cache read" in cached_row.inner_text() and "cache write 1h" in cached_row.inner_text()
    assert "response cache" in logs.locator("tr", has_text=hit_rid).inner_text()

    page.get_by_role("button", name="Refresh").click()
    page.locator("#traffic-totals").get_by_text("requests").wait_for()
    page.wait_for_function("document.querySelector('#traffic-totals').textContent.match(/[1-9]\\d* requests/)")
    page.locator("#audit-table").get_by_text("binding.put").wait_for()
    page.locator("#token-classes").get_by_text("Cache reads").wait_for()
    page.wait_for_function("document.querySelector('#token-classes').textContent.match(/30,?000/)")

    page.locator("#new-key").evaluate("n => n.hidden = true")  # the key is not kept in the screenshots
    shot(page, "dashboard-overview", "#overview")
    shot(page, "dashboard-traffic", "#traffic")
    shot(page, "dashboard-keys", "#keys")
    shot(page, "dashboard-bindings", "#bindings")
    shot(page, "dashboard-logs", "#logs")
    shot(page, "dashboard-risk-events", "#risk")
    shot(page, "dashboard-audit", "#audit")
    shot(page, "dashboard-full")

    page.get_by_role("button", name="Sign out").click()
    page.locator("#signin").wait_for(state="visible")
    assert page.js_errors == []
