"""The dashboard in a real headless Chromium: load, filter, open a job, retry a failed one, live updates.

CI installs Debian's `chromium` and the `playwright` package; locally the test skips without them,
but with CI set in the environment a missing browser is a failure, not a skip.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from app.fakeportal.portal import COMPANY, CONTACT, LEAD, FakePortal
from tests.conftest import API_TOKEN, post_event

if os.environ.get("CI"):
    import playwright.async_api as playwright_api
else:
    playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM) and not os.environ.get("CI"),
                                reason=f"no {CHROMIUM}: apt-get install -y chromium")


@pytest.fixture
async def page() -> Any:
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = await browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.errors = errors
        yield page
        await browser.close()


async def test_a_person_finds_the_failed_job_reads_the_fix_and_retries_it(
        admin: Any, make_worker: Any, portal: FakePortal, page: Any) -> None:
    client = admin  # retrying needs the API token; the page keeps it as a person would enter it
    await page.add_init_script(f"localStorage.setItem('b24-token', '{API_TOKEN}')")
    lead = portal.add_lead(title="Anna")
    made = portal.convert_lead(lead)
    fine, broken = (portal.add_activity([(LEAD, lead)]) for _ in range(2))
    await post_event(client, "ONCRMACTIVITYADD", fine)
    await make_worker().run_check()
    portal.fail_next(1, status=403, error="ACCESS_DENIED", description="Access denied!")
    _, failed = await post_event(client, "ONCRMACTIVITYADD", broken)
    await make_worker().run_check()
    expect = playwright_api.expect

    await page.goto(str(client.make_url("/")))

    await expect(page.locator("#live")).to_have_text("live")
    await expect(page.locator('#state-counts [data-state="succeeded"] .value')).to_have_text("1")
    await expect(page.locator('#state-counts [data-state="failed"] .value')).to_have_text("1")
    await expect(page.locator("#jobs tbody tr")).to_have_count(2)
    await expect(page.locator("#portals tbody tr[data-portal=acme]")).to_contain_text("of 1000")
    await expect(page.locator("#failed-list li")).to_contain_text("CRM rights")

    await page.select_option("#filters select[name=state]", "failed")
    await page.click("#filters button[type=submit]")
    await expect(page.locator("#jobs tbody tr")).to_have_count(1)
    await page.click(f'#jobs tbody tr[data-job="{failed["job_id"]}"]')
    await expect(page.locator("#d-what")).to_contain_text("CRM rights")
    await expect(page.locator("#d-state")).to_have_attribute("data-state", "failed")

    await page.click("#d-retry")
    await expect(page.locator("#d-state")).to_have_attribute("data-state", "queued")
    await make_worker().run_check()

    # No reload: the stream brings the new state to the open job, the counts and the list.
    await expect(page.locator("#d-state")).to_have_attribute("data-state", "succeeded")
    await expect(page.locator(f"#d-changes tr[data-item='activity {broken}']")).to_contain_text(
        f"contact {made['contact']}, company {made['company']}")
    await expect(page.locator("#attention-empty")).to_be_visible()
    await expect(page.locator('#state-counts [data-state="succeeded"] .value')).to_have_text("2")
    await expect(page.locator("#jobs tbody tr")).to_have_count(0)  # the filter still says "failed"
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    assert portal.bindings(broken) == [(CONTACT, made["contact"]), (COMPANY, made["company"])]

    await page.click("#d-undo")  # and back: the activity returns to the lead, as it was before the job
    await expect(page.locator("#d-message")).to_contain_text("Restored 1 item")
    assert portal.bindings(broken) == [(LEAD, lead)]
    assert page.errors == []


async def test_a_bad_filter_is_shown_in_words(client: Any, page: Any) -> None:
    await page.goto(str(client.make_url("/")))
    await page.fill("#filters input[name=entity]", "abc")
    await page.click("#filters button[type=submit]")

    await expect_text(page, "#filter-error", "entity must be a whole number")


async def expect_text(page: Any, selector: str, text: str) -> None:
    await playwright_api.expect(page.locator(selector)).to_contain_text(text)
