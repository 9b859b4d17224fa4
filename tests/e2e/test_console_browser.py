"""The console in a real browser (Playwright driving Debian's chromium, installed by .ci/run) against a real
database, coordinator and workers: read a failed instance's traceback and retry it until it completes, draw a
1,000-wide map as one node, cancel an instance, send the signal a waiting instance needs. Screenshots go to
the test's tmp_path."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from support.console_helpers import console_process

import pgflow
from pgflow import tree as t

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
DEADLINE_MS = 60_000  # waits for a state, never a fixed sleep

if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed here (.ci/run installs it)", allow_module_level=True)


@pytest.fixture
def browser(tmp_path):
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="pgflow-chromium-")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS,
                                                       viewport={"width": 1280, "height": 900})
        context.set_default_timeout(DEADLINE_MS)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        context.close()
    shutil.rmtree(profile, ignore_errors=True)
    assert errors == [], errors  # no script error on any page


def _confirm(page) -> None:
    page.locator("#confirm").click()


def test_the_console_in_a_browser(dsn, engine_factory, browser, tmp_path):
    from playwright.sync_api import expect
    from support import console_flows, sample_flows

    engine = engine_factory()
    engine.coordinator()
    engine.worker("--import", "support.console_flows")
    flag = tmp_path / "open"
    failed = pgflow.start(console_flows.gate, {"n": 4, "flag": str(flag)}, label="nightly", dsn=dsn)
    wide = pgflow.start(sample_flows.wide, 1000, dsn=dsn)
    doomed = pgflow.start(t.wait_for_signal("never"), label="to-cancel", dsn=dsn)
    approval = pgflow.start(t.wait_for_signal("approval").named("d") >> "SELECT ($d.amount)::int * 2 AS doubled",
                            label="approval", dsn=dsn)
    assert pgflow.wait(failed, 60, dsn=dsn).status == "failed"
    assert pgflow.wait(wide, 120, dsn=dsn).status == "completed"
    page = browser
    with console_process(dsn) as url:
        # the list, then the failed instance: its traceback, then retry and watch it complete
        page.goto(url)
        expect(page.locator(f'#instance-rows a[href="/instances/{failed}"]')).to_be_visible()
        page.screenshot(path=str(tmp_path / "instances.png"), full_page=True)
        page.locator(f'#instance-rows a[href="/instances/{failed}"]').click()
        expect(page.locator("#instance-status")).to_have_text("failed")
        row = page.locator('#steps tr[data-step="guarded"]')
        row.locator("details.traceback summary").click()
        expect(row.locator("details.traceback pre")).to_contain_text("RuntimeError: gate closed")
        expect(page.locator('#graph g.node[data-node="guarded"]')).to_have_class("node st-failed")
        page.screenshot(path=str(tmp_path / "failed-instance.png"), full_page=True)
        flag.write_text("")
        page.locator("#retry").click()
        expect(page.locator("h1")).to_contain_text("Retry instance")
        _confirm(page)
        expect(page.locator(".notice")).to_contain_text("retried")
        expect(page.locator("#instance-status")).to_have_text("completed")  # live updates, no reload by us
        expect(page.locator("#output")).to_contain_text('"doubled": 8')
        page.screenshot(path=str(tmp_path / "retried-instance.png"), full_page=True)

        # a 1,000-wide map: one node with its progress, a handful of SVG nodes in all
        page.goto(f"{url}instances/{wide}")
        graph = page.locator("#graph")
        expect(graph).to_have_attribute("data-drawn", "3")
        expect(page.locator('#graph g.node[data-node="square"] .progress-text')).to_have_text("1000/1000")
        assert page.locator("#graph g.node").count() == 3
        assert page.evaluate("() => document.querySelectorAll('svg *').length") < 200
        expect(page.locator("#maps .map-count")).to_have_text("1000 / 1000")
        page.screenshot(path=str(tmp_path / "wide-map.png"), full_page=True)

        # cancel, one confirmation away
        page.goto(f"{url}instances/{doomed}")
        expect(page.locator("#instance-status")).to_have_text("running")
        page.locator("#cancel").click()
        _confirm(page)
        expect(page.locator("#instance-status")).to_have_text("cancelled")

        # a signal with a JSON payload unblocks a waiting instance
        page.goto(f"{url}instances/{approval}")
        expect(page.locator("#signals .awaited")).to_contain_text("wait for signal approval")
        page.fill("#signal-name", "approval")
        page.fill("#signal-data", '{"amount": 21}')
        page.locator("#send-signal").click()
        expect(page.locator(".confirm")).to_contain_text('{"amount":21}')
        _confirm(page)
        expect(page.locator("#instance-status")).to_have_text("completed")
        expect(page.locator("#output")).to_contain_text('"doubled": 42')
        page.screenshot(path=str(tmp_path / "signalled-instance.png"), full_page=True)
    assert pgflow.status(doomed, dsn=dsn).status == "cancelled"
    assert pgflow.result(approval, dsn=dsn) == [{"doubled": 42}]
    print("screenshots in", tmp_path)
