"""The web dashboard in a real browser, against the real daemon and API (playground).

Needs Chromium at /usr/bin/chromium and Python Playwright; never downloads a browser.
Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from analysis.budget import BURN_WINDOWS_S, Events
from canaryd.playground import Playground, Sample
from canaryd.ports import SloService
from canaryd.slo import ServiceSlo, service_slo
from canaryd.spec import parse_spec

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: the browser test needs it"
)


@pytest.fixture
def playground() -> Iterator[Playground]:
    samples = (
        Sample("checkout", "healthy", "x"),
        Sample("cart", "healthy", "x", (50,)),
    )
    yield from running(samples)


def running(samples: tuple[Sample, ...]) -> Generator[Playground, None, None]:
    """A playground of ``samples`` in a thread, until the generator is closed."""
    pg = Playground(
        host="127.0.0.1", port=0, speed=60, interval_s=1.0, restart_after_s=5.0, samples=samples
    )
    loop_box: list[asyncio.AbstractEventLoop] = []
    stop_box: list[asyncio.Event] = []
    failure: list[BaseException] = []

    async def main() -> None:
        stop = asyncio.Event()
        loop_box.append(asyncio.get_running_loop())
        stop_box.append(stop)
        await pg.run(stop)

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by the test
            failure.append(exc)

    # the playground's traffic is simulated and has no history: give both services
    # error-budget figures as the SLO monitor would read them from Prometheus
    pg.hub.set_slos([budget("checkout", 0.0002, 0.5), budget("cart", 0.0007, 1.0)])
    thread = threading.Thread(target=target, name="playground", daemon=True)
    thread.start()
    wait_until(lambda: len(canaries(pg)) == len(samples), 20.0, "the canaries to appear")
    try:
        yield pg
    finally:
        if loop_box and stop_box:
            loop_box[0].call_soon_threadsafe(stop_box[0].set)
        thread.join(15.0)
        assert not failure, f"the playground failed: {failure[0]!r}"


def budget(service: str, bad_ratio: float, recent_burn: float) -> ServiceSlo:
    """Figures for ``service`` at 99.9% over 30 days with ``bad_ratio`` of its requests
    failed, burning ``recent_burn``× the budget's rate lately; cart also has a latency
    objective."""
    slo: dict[str, Any] = {"availabilityPct": 99.9, "budgetPolicy": {}}
    if service == "cart":
        slo["latency"] = {"thresholdMs": 300, "targetPct": 99}
    spec = parse_spec({"service": service, "analysis": {"slo": slo}})
    window_s = 30 * 86400.0
    total = 1e8
    availability = {window_s: Events(total * (1 - bad_ratio), total)}
    latency = {window_s: Events(total * 0.9925, total)}
    for w in BURN_WINDOWS_S:
        availability[w] = Events(1e5 * (1 - recent_burn * 0.001), 1e5)
        latency[w] = Events(1e5 * 0.99, 1e5)
    events = {"availability": availability, "latency": latency}
    return service_slo(
        SloService("shop", service, (service, f"{service}-canary"), spec), events, datetime.now(UTC)
    )


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5.0) as resp:  # a local test server
        return json.loads(resp.read())


def canaries(pg: Playground) -> dict[str, dict[str, Any]]:
    try:
        rows = get_json(pg.url + "api/v1/canaries")
    except OSError:
        return {}
    return {row["name"]: row for row in rows}


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")


def test_dashboard_live_table_detail_and_approve(playground: Playground) -> None:
    from playwright.sync_api import expect, sync_playwright

    pg = playground
    ARTIFACTS.mkdir(exist_ok=True)
    weight_cell = 'tr[data-key="shop/checkout"] .weight-text'
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on(
                "console",
                lambda msg: (
                    errors.append(msg.text)
                    if msg.type == "error" and "401" not in msg.text  # the wrong token, below
                    else None
                ),
            )
            page.goto(pg.url)

            # The table lists both canaries, and the stream is live.
            rows = page.locator("#canary-rows tr")
            expect(rows).to_have_count(2, timeout=10_000)
            expect(page.locator('tr[data-key="shop/checkout"]')).to_contain_text("checkout")
            expect(page.locator('tr[data-key="shop/cart"]')).to_contain_text("cart")
            expect(page.locator("#conn")).to_contain_text("live", timeout=10_000)

            # Under the table, each service's error budget and the tier it puts releases in.
            expect(page.locator("#slo-section")).to_be_visible(timeout=5_000)
            expect(page.locator("#slo-rows tr")).to_have_count(3)  # cart has two objectives
            checkout = page.locator('#slo-rows tr[data-service="shop/checkout"]')
            expect(checkout).to_contain_text("80%")
            expect(checkout.locator(".tier")).to_have_text("Normal")
            cart = page.locator('#slo-rows tr[data-service="shop/cart"]').first
            expect(cart).to_contain_text("30%")
            expect(cart.locator(".tier")).to_have_text("Every later step needs approval")

            # A weight change in the API shows in the page within 2 s, without a reload.
            page.evaluate("window.__noReload = true")
            before = canaries(pg)["checkout"]["canaryWeight"]
            wait_until(
                lambda: canaries(pg)["checkout"]["canaryWeight"] != before,
                30.0,
                "checkout's weight to change",
            )
            changed_at = time.monotonic()
            after = canaries(pg)["checkout"]["canaryWeight"]
            page.wait_for_function(
                "([sel, want]) => { const e = document.querySelector(sel);"
                " return e !== null && e.textContent === want; }",
                arg=[weight_cell, f"{after}%"],
                timeout=2_000,
            )
            assert time.monotonic() - changed_at <= 2.0
            assert page.evaluate("window.__noReload === true"), "the page was reloaded"
            page.screenshot(path=str(ARTIFACTS / "dashboard-table-wide.png"), full_page=True)
            page.set_viewport_size({"width": 420, "height": 900})
            page.screenshot(path=str(ARTIFACTS / "dashboard-table-narrow.png"), full_page=True)
            page.set_viewport_size({"width": 1400, "height": 900})

            # Keyboard: focus the cart row and press Enter to open its detail view.
            wait_until(
                lambda: canaries(pg)["cart"]["phase"] == "WaitingApproval",
                40.0,
                "cart to wait for approval",
            )
            page.locator('tr[data-key="shop/cart"]').focus()
            page.keyboard.press("Enter")
            expect(page).to_have_url(pg.url + "#/shop/cart")
            approve = page.locator("#btn-approve")
            expect(approve).to_be_visible(timeout=5_000)
            expect(approve).to_be_disabled()  # no token yet
            expect(page.locator("#actions-box .hint")).to_contain_text("operator token")
            expect(page.locator("#charts svg")).to_have_count(3, timeout=5_000)
            card = page.locator("section.card", has_text="Error budget · cart")
            expect(card).to_be_visible()
            expect(card.locator(".policy")).to_contain_text("error budget 30% remaining")
            expect(card.locator("tbody tr")).to_have_count(2)

            # A wrong token: the API's error message is shown, and nothing moves.
            page.fill("#token-input", "not-the-token")
            page.click("#token-save")
            expect(approve).to_be_enabled(timeout=5_000)
            approve.click()
            expect(page.locator(".flash-error")).to_contain_text("unknown token", timeout=5_000)
            assert canaries(pg)["cart"]["phase"] == "WaitingApproval"

            page.fill("#token-input", pg.token)
            page.click("#token-save")
            expect(page.locator("#token-state")).to_have_text("token set")
            expect(approve).to_be_enabled(timeout=5_000)
            page.wait_for_timeout(1_500)  # let the series grow a little for the screenshot
            page.screenshot(path=str(ARTIFACTS / "dashboard-detail-wide.png"), full_page=True)
            approve.click()
            expect(page.locator(".flash-ok")).to_contain_text("accepted", timeout=5_000)
            wait_until(
                lambda: canaries(pg)["cart"]["phase"] != "WaitingApproval",
                10.0,
                "cart to leave WaitingApproval after Approve",
            )
            expect(page.locator('[id="summary-box"] .phase')).not_to_have_text(
                "Waiting for approval", timeout=5_000
            )
            page.set_viewport_size({"width": 420, "height": 900})
            page.wait_for_timeout(400)
            page.screenshot(path=str(ARTIFACTS / "dashboard-detail-narrow.png"), full_page=True)

            # Back returns to the table.
            page.go_back()
            expect(page.locator("#list-view")).to_be_visible()
            assert not errors, f"errors in the page: {errors}"
        finally:
            browser.close()


def test_a_blue_green_detail_names_its_strategy_and_the_mirrored_step() -> None:
    from playwright.sync_api import expect, sync_playwright

    sample = Sample(
        "storefront",
        "healthy",
        "blue/green",
        spec=(
            ("strategy", "blueGreen"),
            ("blueGreen", {"mirrorPercent": 50, "approval": True, "scaleDownDelay": "30s"}),
        ),
    )
    ARTIFACTS.mkdir(exist_ok=True)
    with contextlib.closing(running((sample,))) as pgs:
        pg = next(pgs)
        wait_until(
            lambda: canaries(pg)["storefront"]["phase"] in ("Progressing", "WaitingApproval"),
            20.0,
            "the blue/green to start",
        )
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
            )
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(pg.url + "#/shop/storefront")
                facts = page.locator("#summary-box .facts")
                expect(facts).to_contain_text("blue/green", timeout=10_000)
                expect(facts).to_contain_text("50% mirror of the rest")
                expect(facts).to_contain_text("users stay on stable")
                # the switch is judged for scaleDownDelay, not stepDuration
                expect(page.locator("#detail-view")).to_contain_text(
                    "12.0s per step, the 100% step 30.0s"
                )
                page.wait_for_timeout(1_000)
                page.screenshot(path=str(ARTIFACTS / "dashboard-bluegreen.png"), full_page=True)
            finally:
                browser.close()
