"""Row 11 (group ``dashboard``): the dashboard's first render with 10,000 jobs.

A namespace of its own holds ``dashboard_jobs`` records made by the job scripts (as row 10
makes them), messages on the five queues and a live worker; a ``morag api`` with an admin
key serves it. Headless Chromium (the system's, driven by Playwright, as
tests/e2e/test_dashboard.py runs it; no host but 127.0.0.1 resolves) opens ``/ui/`` in a
fresh context (empty cache and session storage), logs in with the key, and the page's own
clock (``performance.now()`` read by a MutationObserver an init script installs) times:

- after login: from the login form's submit to the first job row in the DOM, and to the
  whole first page (the list shows 50 jobs a page, with a *more* button);
- opening a logged-in tab (a reload: the key is in session storage): from navigation start
  (HTML, script and style, then the same reads) to the first row and the full page.

The baseline, interleaved sample by sample, is the raw ``GET /api/v1/status/?limit=50`` the
page itself makes, timed from this process over a keep-alive connection.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from bench.infra import Bench, wait_for
from bench.metrics_scrape import Http, drop_namespace, fill_jobs, fill_queues
from bench.report import Row, paired_ratios, skipped
from bench.stats import percentile, summary

KEY = "bench-dashboard-key"
PAGE = 50  # jobs per page of the list (app.js asks for limit=50)

# Runs in every document before the page's script: stamps the submit and the moments the
# first job row, and a full page of them, are in the list.
TIMER = f"""
(() => {{
  const t = window.__bench = {{}};
  document.addEventListener("submit", () => {{ t.submit = performance.now(); }}, true);
  new MutationObserver(() => {{
    const rows = document.querySelectorAll("#jobs [data-task-id]").length;
    if (rows && t.first === undefined) t.first = performance.now();
    if (rows >= {PAGE} && t.page === undefined) t.page = performance.now();
  }}).observe(document, {{ childList: true, subtree: true }});
}})();
"""

# The last queue read's duration (request sent to last byte), from the page's resource timing.
QUEUES_READ = """
(() => {
  const reads = performance.getEntriesByType("resource")
    .filter((e) => e.name.includes("/api/v1/status/stats/queues"));
  const last = reads[reads.length - 1];
  return last.responseEnd - last.requestStart;
})()
"""


def chromium() -> str | None:
    return os.environ.get("MORAG_TEST_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None
    )


def stamps(page: Any) -> dict[str, float]:
    """The timer's stamps once a full page of jobs is shown (waited for with a selector:
    the page's CSP forbids the eval ``wait_for_function`` needs)."""
    page.wait_for_selector(f"#jobs > [data-task-id]:nth-child({PAGE})")
    return wait_for(
        lambda: (t := page.evaluate("window.__bench")) and "page" in t and t,
        10,
        "the timer's stamps",
    )


def render_once(browser: Any, base: str) -> dict[str, float]:
    """One fresh tab: log in, then reopen it; milliseconds of each figure."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    try:
        context.add_init_script(TIMER)
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(f"{base}/ui/")
        page.wait_for_selector("#login:not([hidden])")
        page.fill("#key", KEY)
        page.click("#login button[type=submit]")
        login = stamps(page)
        login_queues = page.evaluate(QUEUES_READ)
        page.reload()
        opened = stamps(page)
        open_queues = page.evaluate(QUEUES_READ)
        rows = page.locator("#jobs [data-task-id]").count()
        if rows != PAGE or not page.locator("#more").is_visible():
            raise RuntimeError(f"the list shows {rows} rows (expected {PAGE} and more)")
        return {
            "login_first": login["first"] - login["submit"],
            "login_page": login["page"] - login["submit"],
            "open_first": opened["first"],
            "open_page": opened["page"],
            "login_queues": login_queues,
            "open_queues": open_queues,
            "login_rest": login["first"] - login["submit"] - login_queues,
        }
    finally:
        context.close()


def run_dashboard(bench: Bench, cfg: dict[str, Any]) -> list[Row]:
    """Row 11: /ui's first job row with ``dashboard_jobs`` records, vs the list's GET."""
    path = chromium()
    title = "dashboard: login to the first job row"
    if path is None:
        return [skipped("11", title, "no chromium (apt-get install chromium)")]
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return [skipped("11", title, "playwright is not installed (dev extras)")]

    n, reps, samples = cfg["dashboard_jobs"], cfg["reps"], cfg["dashboard_samples"]
    client = bench.client()
    ns = f"{bench.morag_ns}-ui"
    try:
        started = time.perf_counter()
        fill_jobs(client, ns, n)
        fill_queues(client, ns)
        fill_seconds = time.perf_counter() - started
        # No remote-control cache: every first render pays the queue read's Celery
        # inspect, as a user opening the page does unless someone read the queues in the
        # last inspect_cache_seconds (2 s); otherwise samples would split by the cache.
        api, base = bench.start_api(
            key_prefix=ns,
            broker_namespace=f"{ns}:",
            admin_keys=f"ops:{KEY}",
            inspect_cache_seconds="0",
        )
        raw = Http(base, {"Authorization": f"Bearer {KEY}"})

        def list_get() -> float:
            status, body, ms = raw.get(f"/api/v1/status/?limit={PAGE}")
            if status != 200:
                raise RuntimeError(f"the list answered {status}: {body[:300]!r}")
            return ms

        figures = (
            "login_first",
            "login_page",
            "open_first",
            "open_page",
            "login_queues",
            "open_queues",
            "login_rest",
        )
        p50: dict[str, list[float]] = {k: [] for k in (*figures, "list")}
        p99: dict[str, list[float]] = {k: [] for k in (*figures, "list")}
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=path,
                headless=True,
                args=[
                    "--no-sandbox",
                    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--no-pings",
                ],
            )
            try:
                for _ in range(2):  # warm-up: the browser's first contexts, the API's pools
                    render_once(browser, base)
                    list_get()
                for rep in range(reps):
                    got: dict[str, list[float]] = {k: [] for k in p50}
                    for sample in range(samples):
                        first_browser = (rep + sample) % 2 == 0
                        if not first_browser:
                            got["list"].append(list_get())
                        for name, ms in render_once(browser, base).items():
                            got[name].append(ms)
                        if first_browser:
                            got["list"].append(list_get())
                    for name, values in got.items():
                        p50[name].append(percentile(values, 50))
                        p99[name].append(percentile(values, 99))
            finally:
                browser.close()
        raw.close()
        bench.stop(api)
    finally:
        drop_namespace(client, ns)

    def row(key: str, figure: str, name: str, q: str, notes: str = "") -> Row:
        table = p50 if q == "p50" else p99
        return Row(
            key=key,
            figure=figure,
            unit="ms",
            value=summary(table[name], 1),
            baseline_name=f"GET /api/v1/status/?limit={PAGE} {q}",
            baseline=summary(table["list"], 2),
            ratio=paired_ratios(table[name], table["list"]),
            target="reported",
            met=None,
            notes=notes,
            details={"whole_first_page_ms": summary(table[name.replace("_first", "_page")], 1)},
        )

    page_same = all(
        abs(a - b) < 1 for a, b in zip(p50["login_first"], p50["login_page"], strict=True)
    )
    notes = (
        f"{n:,} job records (a third finished) made by the job scripts, 5 queues, a live "
        f"worker; an admin key. Headless Chromium ({os.path.basename(path)}, Playwright), a "
        f"fresh context per sample; {samples} samples per repetition, {reps} repetitions, "
        f"each sample interleaved with the baseline GET from this process (http.client); "
        f"p99 of {samples} samples is close to their maximum. Times are the page's own "
        f"clock until the row is in the DOM. The first render makes two reads one after the "
        f"other (queues, then the list); the queue read "
        f"(GET /api/v1/status/stats/queues) took a median "
        f"{summary(p50['login_queues'], 1)['median']} ms after login and "
        f"{summary(p50['open_queues'], 1)['median']} ms on opening: with a live worker it "
        f"asks Celery for active tasks (inspect().active(), which waits its whole "
        f"inspect_timeout, 0.5 s, not knowing how many workers will answer); the API runs "
        f"here with MORAG_INSPECT_CACHE_SECONDS=0, so every sample pays it, as a user "
        f"opening the page does unless the queues were read in the last 2 s (the default "
        f"cache). Without that wait the first row comes a median "
        f"{summary(p50['login_rest'], 1)['median']} ms after login. "
        f"The list shows {PAGE} jobs a page "
        f"(*more* for the next): the whole first page is rendered "
        + ("in the same DOM update as the first row" if page_same else "later")
        + f" (median {summary(p50['login_page'], 1)['median']} ms after login, "
        f"{summary(p50['open_page'], 1)['median']} ms after opening). Filled in "
        f"{fill_seconds:.0f} s."
    )
    return [
        row(
            "11a", f"dashboard, {n:,} jobs: login → first job row, p50", "login_first", "p50", notes
        ),
        row("11b", f"dashboard, {n:,} jobs: login → first job row, p99", "login_first", "p99"),
        row(
            "11c",
            f"dashboard, {n:,} jobs: open a logged-in tab → first job row, p50",
            "open_first",
            "p50",
        ),
        row(
            "11d",
            f"dashboard, {n:,} jobs: open a logged-in tab → first job row, p99",
            "open_first",
            "p99",
        ),
    ]
