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

from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
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
async def browser() -> Any:
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        await browser.close()


async def open_page(browser: Any, width: int, height: int = 1000) -> Any:
    page = await browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: page.dialogs.append(dialog.message) or dialog.accept())
    page.errors, page.dialogs = errors, []
    return page


@pytest.fixture
async def page(browser: Any) -> Any:
    return await open_page(browser, 1400)


@pytest.fixture(params=[390, 360], ids=["390px", "360px"])
async def phone(browser: Any, request: Any) -> Any:
    page = await open_page(browser, request.param, 800)
    page.width = request.param
    return page


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

    contact_link = page.locator(f"#d-changes tr[data-item='activity {broken}'] a", has_text=f"contact {made['contact']}")
    # The portal is a fake on loopback (as the demo's is): the link opens its page for the contact, which
    # shows the activity now bound there.
    contact_page = f"{portal.base_url}/crm/contact/details/{made['contact']}/"
    await expect(contact_link).to_have_attribute("href", contact_page)
    opened = await page.request.get(contact_page)
    assert opened.status == 200 and f"<tr data-activity={broken}>" in await opened.text()

    await page.click("#d-undo")  # and back: the activity returns to the lead, as it was before the job
    await expect(page.locator("#d-message")).to_contain_text("Restored 1 item")
    assert page.dialogs and "applies them again" in page.dialogs[0]  # it asked first, and said what follows
    assert portal.bindings(broken) == [(LEAD, lead)]
    await expect(page.locator("#d-state")).to_have_attribute("data-state", "undone")
    await expect(page.locator("#d-undo")).to_be_disabled()
    await expect(page.locator("#d-message")).to_contain_text("apply again on the next event")
    await expect(page.locator(f'#jobs tbody tr[data-job="{failed["job_id"]}"]')).to_have_count(0)  # filter: failed
    await page.click("#close-detail")
    await page.select_option("#filters select[name=state]", "undone")
    await page.click("#filters button[type=submit]")
    await expect(page.locator(f'#jobs tbody tr[data-job="{failed["job_id"]}"] .badge')).to_have_text("undone")
    assert page.errors == []


async def test_on_a_phone_nothing_is_wider_than_the_screen_and_the_job_panel_closes(
        client: Any, worker: Any, portal: FakePortal, phone: Any) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    await worker.run_check()
    expect = playwright_api.expect

    await phone.goto(str(client.make_url("/")))
    await expect(phone.locator("#jobs tbody tr")).to_have_count(1)
    assert await phone.evaluate("document.documentElement.scrollWidth") <= phone.width
    ARTIFACTS.mkdir(exist_ok=True)
    await phone.screenshot(path=str(ARTIFACTS / f"dashboard-{phone.width}px-list.png"), full_page=True)

    await phone.click(f'#jobs tbody tr[data-job="{answer["job_id"]}"] td:first-child')
    await expect(phone.locator("#detail")).to_be_visible()
    panel = await phone.locator("#detail").bounding_box()
    close = await phone.locator("#close-detail").bounding_box()
    assert panel["x"] >= 0 and panel["x"] + panel["width"] <= phone.width  # the panel's left edge is on the screen
    assert close["x"] >= 0 and close["x"] + close["width"] <= phone.width and close["width"] >= 44 and close["height"] >= 44
    assert await phone.evaluate("document.documentElement.scrollWidth") <= phone.width
    ARTIFACTS.mkdir(exist_ok=True)
    await phone.screenshot(path=str(ARTIFACTS / f"dashboard-{phone.width}px-job.png"))
    await phone.click("#close-detail")
    await expect(phone.locator("#detail")).to_be_hidden()
    assert phone.errors == []


async def test_at_desktop_width_the_chart_has_axes_and_each_portal_its_reachability(
        client: Any, worker: Any, portal: FakePortal, page: Any) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    await post_event(client, "ONCRMACTIVITYADD", portal.add_activity([(LEAD, lead)]))
    await worker.run_check()
    expect = playwright_api.expect

    await page.goto(str(client.make_url("/")))

    await expect(page.locator("#chart polyline")).to_have_count(3)
    await expect(page.locator("#chart polyline.jobs")).to_have_attribute("data-total", "1")
    await expect(page.locator("#chart text", has_text="60 min ago")).to_have_count(1)
    await expect(page.locator("#chart text", has_text="now")).to_have_count(1)
    await expect(page.locator("#portals tbody tr[data-portal=acme] .reach")).to_have_attribute("data-reach", "reachable")
    await expect(page.locator("#per-minute")).to_have_text("1")
    await expect(page.locator("#oldest")).to_have_text("nothing waiting")
    assert await page.evaluate("document.documentElement.scrollWidth") <= 1400
    icon = await page.request.get(str(client.make_url("/favicon.ico")))
    assert icon.status == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert page.errors == []


async def test_identical_failures_are_one_item_with_a_count(client: Any, make_worker: Any, portal: FakePortal,
                                                             page: Any) -> None:
    lead = portal.add_lead()
    portal.convert_lead(lead)
    portal.fail_next(3, status=403, error="ACCESS_DENIED", description="Access denied!")
    for _ in range(3):
        await post_event(client, "ONCRMACTIVITYADD", portal.add_activity([(LEAD, lead)]))
    await make_worker().run_check()

    await page.goto(str(client.make_url("/")))

    items = page.locator("#failed-list li")
    await playwright_api.expect(items).to_have_count(1)
    await playwright_api.expect(items).to_have_attribute("data-count", "3")
    await playwright_api.expect(items).to_contain_text("3 jobs ×")
    await playwright_api.expect(items.locator("button")).to_have_text("Retry these 3")


async def test_unauthorised_it_says_so_and_shows_the_fix(admin: Any, make_worker: Any, portal: FakePortal,
                                                         page: Any) -> None:
    portal.fail_next(1, status=403, error="ACCESS_DENIED", description="Access denied!")
    await post_event(admin, "ONCRMACTIVITYADD", portal.add_activity([(LEAD, portal.add_lead())]))
    await make_worker().run_check()

    await page.goto(str(admin.make_url("/")))  # no token in this browser

    await expect_text(page, "#auth", "needs its API token")
    await expect_text(page, "#auth", "B24_API_TOKEN")
    await expect_text(page, "#attention-empty", "Unknown: the API refused this page")
    await playwright_api.expect(page.locator("#attention-empty")).not_to_contain_text("Nothing has failed")
    await expect_text(page, "#live", "not authorised")


async def test_retry_without_a_token_on_the_service_says_how_to_fix_it(client: Any, make_worker: Any,
                                                                       portal: FakePortal, page: Any) -> None:
    portal.fail_next(1, status=403, error="ACCESS_DENIED", description="Access denied!")
    await post_event(client, "ONCRMACTIVITYADD", portal.add_activity([(LEAD, portal.add_lead())]))
    await make_worker().run_check()
    await page.goto(str(client.make_url("/")))

    await page.click("#failed-list li button.retry")

    await expect_text(page, "#auth", "Retry and undo need an API token, and this service has none set")
    await expect_text(page, "#auth-fix", "restart b24rebind")
    await playwright_api.expect(page.locator("#failed-list li")).to_have_count(1)  # reads still work


async def test_search_by_job_id_or_by_activity(client: Any, worker: Any, portal: FakePortal, page: Any) -> None:
    lead = [portal.add_lead() for _ in range(5)][-1]  # an id no activity has
    portal.convert_lead(lead)
    activity = portal.add_activity([(LEAD, lead)])
    _, answer = await post_event(client, "ONCRMACTIVITYADD", activity)
    await post_event(client, "ONCRMACTIVITYADD", portal.add_activity([(LEAD, lead)]))
    await worker.run_check()
    await page.goto(str(client.make_url("/")))

    await page.fill("#q", str(activity))
    await page.click("#search button[type=submit]")
    await playwright_api.expect(page.locator("#jobs tbody tr")).to_have_count(1)
    await expect_text(page, "#search-result", f"activity {activity} was changed by {answer['job_id']}")

    await page.fill("#q", str(lead))  # the lead: the jobs that moved its activities
    await page.click("#search button[type=submit]")
    await playwright_api.expect(page.locator("#jobs tbody tr")).to_have_count(2)
    await expect_text(page, "#search-result", f"2 jobs about activity or lead {lead}")

    await page.fill("#q", answer["job_id"])
    await page.click("#search button[type=submit]")
    await playwright_api.expect(page.locator("#d-id")).to_have_text(answer["job_id"])


async def test_a_bad_filter_is_shown_in_words(client: Any, page: Any) -> None:
    await page.goto(str(client.make_url("/")))
    await page.fill("#filters input[name=entity]", "abc")
    await page.click("#filters button[type=submit]")

    await expect_text(page, "#filter-error", "entity must be a whole number")


async def expect_text(page: Any, selector: str, text: str) -> None:
    await playwright_api.expect(page.locator(selector)).to_contain_text(text)
