"""The dashboard in a real browser: headless Chromium (Debian's, driven by Playwright's
Python package; .ci/run installs both) against a real API and real workers.

``MORAG_SCREENSHOTS=docs`` (``scripts/screenshots``) also saves the pictures the README
shows. Chromium resolves no host but 127.0.0.1: no test sends a packet elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from morag.core.config import Settings
from morag.services.jobs import TaskStatus, get_job_store
from morag.tasks.system_tasks import probe
from tests.harness import ROOT, system_tool, wait_for
from tests.samples import make_pdf

KEY = "dashboard-test-key"
SHOTS = os.environ.get("MORAG_SCREENSHOTS", "")
PHONE = {"width": 390, "height": 844}


def chromium_path() -> str:
    return system_tool(("chromium", "chromium-browser"), "chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium_path(),
            headless=True,
            args=[
                "--no-sandbox",  # CI runs as root
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-pings",
            ],
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(30_000)
    yield opened
    context.close()


def shot(page, name: str) -> None:
    if SHOTS:
        page.screenshot(path=str(ROOT / SHOTS / f"dashboard-{name}.png"), full_page=True)


def row(page, task_id: str):
    return page.locator(f'[data-task-id="{task_id}"]')


def wait_state(page, task_id: str, state: str, timeout: float = 30_000) -> None:
    page.wait_for_selector(f'[data-task-id="{task_id}"][data-state="{state}"]', timeout=timeout)


def test_dashboard_follows_cancels_and_explains_jobs(
    api_factory, workers, page, tmp_path: Path
) -> None:
    # The admin key: the probes below are sent straight to Celery, so no key owns them.
    api = api_factory.start(admin_keys=f"ops:{KEY}")
    workers.start(queues="celery", concurrency=1)  # no document worker yet
    client = httpx.Client(base_url=api.url, headers={"X-API-Key": KEY}, timeout=30)

    page.goto(f"{api.url}/ui")
    page.wait_for_selector("#login:not([hidden])")
    page.fill("#key", KEY)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#main:not([hidden])")
    assert KEY not in page.url
    assert page.evaluate("sessionStorage.getItem('morag.key')") == KEY
    page.wait_for_selector('[data-queue="document_processing"]')

    # A document submitted through the API: queued (no worker for it), then success
    pdf = make_pdf(tmp_path / "report.pdf", pages=3).read_bytes()
    submitted = client.post(
        "/api/v1/ingest/file", files={"file": ("report.pdf", pdf, "application/pdf")}
    )
    assert submitted.status_code == 202, submitted.text
    doc = submitted.json()["task_id"]
    wait_state(page, doc, "pending", timeout=15_000)  # the list is read every 5 s
    assert "waiting for a worker" in row(page, doc).inner_text()
    page.wait_for_selector('[data-queue="document_processing"].idle')  # waiting, no consumer
    shot(page, "queued")
    workers.start(queues="document_processing", concurrency=1)
    wait_state(page, doc, "success")  # followed live through its event stream
    row(page, doc).locator(".line").click()
    history = row(page, doc).locator(".history")
    history.wait_for()
    for stage in ("queued", "started", "validating", "converting", "chunking", "success"):
        assert f"· {stage} ·" in history.inner_text(), history.inner_text()

    # A running job cancelled from the page (actions are off by default: read-only)
    running = probe.delay(steps=600, step_seconds=0.1).id
    wait_state(page, running, "progress", timeout=15_000)
    row(page, running).locator(".line").click()
    row(page, running).locator(".details").wait_for()
    assert row(page, running).locator("[data-action=cancel]").count() == 0
    page.check("#actions")
    row(page, running).locator("[data-action=cancel]").click()
    wait_state(page, running, "revoked", timeout=10_000)
    assert get_job_store(Settings()).get(running).status is TaskStatus.REVOKED

    # A failed job's error, on its row
    failed = probe.delay(fault="error").id
    wait_state(page, failed, "failure", timeout=15_000)
    assert "injected error" in row(page, failed).locator(".error").inner_text()
    shot(page, "jobs")

    # The state filter asks the API and shows only matching jobs
    page.select_option("#f-state", "failure")
    wait_for(lambda: row(page, doc).count() == 0, 10, "the filter to apply")
    assert row(page, failed).count() == 1
    page.select_option("#f-state", "")

    # On a phone-sized screen nothing is wider than the screen
    page.set_viewport_size(PHONE)
    row(page, doc).wait_for()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], width
    shot(page, "phone")
    client.close()


def test_assets_come_from_the_api_with_a_strict_policy(api_factory) -> None:
    api = api_factory.start()
    for path, media in (("/ui/", "text/html"), ("/ui/app.js", "text/javascript")):
        answer = httpx.get(api.url + path)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(media)
        assert answer.headers["content-security-policy"].startswith("default-src 'self'")
    page = httpx.get(api.url + "/ui/").text
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere
    assert httpx.get(api.url + "/ui/secrets.txt").status_code == 404
    assert httpx.get(api.url + "/ui/../pyproject.toml").status_code == 404
