"""The dashboard in a real headless Chromium, at 360, 390 and 1,400 px, asserting what a person sees:
load, filter, open a job, retry a failed one, live updates; jobs as cards on a phone; the header red
while Redis (really stopped) or a portal is away, amber when degraded; a click's outcome said where
it was clicked; the event's masked payload; the workers panel; record links that open the fake's pages.

CI installs Debian's `chromium` and the `playwright` package; locally the test skips without them,
but with CI set in the environment a missing browser is a failure, not a skip.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from app.fakeportal import COMPANY, CONTACT, LEAD, FakePortal
from app.settings import Settings
from app.store import heartbeat
from app.store.bundled_redis import BundledRedis
from app.store.queue import connect
from app.web import create_app
from workers.context import CONTEXT
from workers.main import build_worker, shutdown
from tests.conftest import API_TOKEN, TOKEN, post_event

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
        admin: Any, redis: Any, make_worker: Any, portal: FakePortal, page: Any) -> None:
    async with heartbeat.beating(redis, make_worker()):  # a worker process online, as in production
        await _find_read_and_retry(admin, make_worker, portal, page)


async def _find_read_and_retry(admin: Any, make_worker: Any, portal: FakePortal, page: Any) -> None:
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
    payload = page.locator("#d-payload")  # what the portal sent, its token masked
    await expect(payload).to_contain_text('"event": "ONCRMACTIVITYADD"')
    await expect(payload).to_contain_text('"application_token": "***"')
    assert TOKEN not in await payload.text_content()

    await page.click("#d-retry")
    await expect(page.locator("#d-state")).to_have_attribute("data-state", "queued")
    await expect(page.locator("#d-message")).to_have_attribute("data-kind", "done")
    await expect(page.locator("#d-message")).to_contain_text("Queued again")
    await make_worker().run_check()

    # No reload: the stream brings the new state to the open job, the counts and the list.
    await expect(page.locator("#d-state")).to_have_attribute("data-state", "succeeded")
    await expect(page.locator("#d-message")).to_contain_text("Retried: it ran again and is done (re-bound 1 item)")
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
    entity, what = [await page.locator(f"#jobs tbody tr td.{cell}").bounding_box() for cell in ("entity", "what")]
    assert what["x"] > entity["x"] + entity["width"] - 1 and abs(what["y"] - entity["y"]) < 2  # one row, a column each
    await expect(page.locator("#jobs thead th", has_text="What happened")).to_be_visible()
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

    said = page.locator("#failed-list li .feedback")  # in the item clicked, under its button
    await playwright_api.expect(said).to_have_attribute("data-kind", "refused")
    await expect_text(page, "#failed-list li .feedback", "set B24_API_TOKEN on the service")
    await playwright_api.expect(said).to_be_in_viewport(ratio=0.9)  # the token box opening above does not push it out
    button, box = await page.locator("#failed-list li button.retry").bounding_box(), await said.bounding_box()
    assert 0 <= box["y"] - (button["y"] + button["height"]) < 40  # right under the button
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


async def test_on_a_phone_jobs_are_cards_with_what_happened_in_view_and_an_undone_one_stays_small(
        admin: Any, make_worker: Any, portal: FakePortal, phone: Any) -> None:
    await phone.add_init_script(f"localStorage.setItem('b24-token', '{API_TOKEN}')")
    lead = portal.add_lead()
    portal.convert_lead(lead)
    _, answer = await post_event(admin, "ONCRMACTIVITYADD", portal.add_activity([(LEAD, lead)]))
    await make_worker().run_check()
    assert (await admin.post(f"/api/jobs/{answer['job_id']}/undo")).status == 200  # the longest outcome there is
    expect = playwright_api.expect

    await phone.goto(str(admin.make_url("/")))

    card = phone.locator(f'#jobs tbody tr[data-job="{answer["job_id"]}"]')
    await expect(card.locator(".badge")).to_have_text("undone")
    await expect(phone.locator("#jobs thead")).to_be_hidden()  # cards say what each thing is by its place
    what = card.locator("td.what")
    await expect(what).to_be_visible()
    await expect(what).to_contain_text("undone: 1 item restored")
    state, entity, box, whole = [await card.locator(f"td.{cell}").bounding_box()
                                 for cell in ("state", "entity", "what", "received")]
    assert box["x"] >= 0 and box["x"] + box["width"] <= phone.width  # all of it on the screen, no sideways scroll
    assert abs(state["y"] - entity["y"]) < 4 and box["y"] >= state["y"] + state["height"]  # below the top line
    assert whole["x"] + whole["width"] <= phone.width
    assert (await card.bounding_box())["height"] < 200  # not 400 px of one narrow column
    assert await phone.evaluate("document.documentElement.scrollWidth") <= phone.width
    ARTIFACTS.mkdir(exist_ok=True)
    await phone.screenshot(path=str(ARTIFACTS / f"dashboard-{phone.width}px-cards.png"), full_page=True)
    assert phone.errors == []


async def test_the_workers_panel_shows_the_processes_online_and_when_the_last_one_was_seen(
        client: Any, redis: Any, make_worker: Any, page: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(heartbeat, "EVERY", 0.1)
    worker = make_worker(max_jobs=10)
    async with heartbeat.beating(redis, worker):
        await page.goto(str(client.make_url("/")))
        await expect_text(page, "#workers-online", "1")
        await expect_text(page, "#workers li", f"pid {os.getpid()}")
        await expect_text(page, "#workers li", "0 of 10 jobs under way")
        await expect_text(page, "#workers-hint", "0 jobs under way; last seen")

    await page.reload()  # the worker stopped
    await expect_text(page, "#workers-online", "0")
    await expect_text(page, "#workers-empty", "No worker process is online (last seen")
    await playwright_api.expect(page.locator("#workers li")).to_have_count(0)


async def test_the_header_turns_amber_when_the_service_reports_itself_degraded(client: Any, page: Any) -> None:
    async def degraded(route: Any) -> None:  # the spool's count is another module's; its /readyz shape is this
        await route.fulfill(status=200, content_type="application/json",
                            body=json.dumps({"status": "ready", "redis": "ok",
                                             "spool": {"waiting_segments": 3, "quarantined": 0}}))
    await page.route("**/readyz", degraded)
    await page.goto(str(client.make_url("/")))

    await playwright_api.expect(page.locator("#live")).to_have_attribute("data-health", "degraded")
    await expect_text(page, "#health", "3 spool segments waiting to be queued")


async def test_with_redis_away_the_header_is_red_with_how_long_and_nothing_reads_as_fine(
        aiohttp_client: Any, private_redis: BundledRedis, rules: Any, portal: FakePortal, tmp_path: Path,
        page: Any) -> None:
    settings = Settings(_env_file=None, redis_url=private_redis.url, data_dir=tmp_path, rules=tmp_path / "rules.yaml",
                        api_token=API_TOKEN)
    client = await aiohttp_client(create_app(settings, rules), headers={"Authorization": f"Bearer {API_TOKEN}"})
    pool = await connect(private_redis.url)
    worker = build_worker(settings, rules, pool, burst=True, poll_delay=0.01, handle_signals=False)
    try:
        portal.fail_next(1, status=403, error="ACCESS_DENIED", description="Access denied!")
        _, failed = await post_event(client, "ONCRMACTIVITYADD", portal.add_activity([(LEAD, portal.add_lead())]))
        await worker.run_check()
        await page.add_init_script(f"localStorage.setItem('b24-token', '{API_TOKEN}')")
        await page.goto(str(client.make_url("/")))
        await playwright_api.expect(page.locator("#live")).to_have_text("live")
        await page.click("#failed-list li a")
        await playwright_api.expect(page.locator("#d-id")).to_have_text(failed["job_id"])

        private_redis.stop()

        live = playwright_api.expect(page.locator("#live"))
        await live.to_have_attribute("data-health", "down", timeout=20_000)
        await live.to_contain_text("Redis away for")
        await expect_text(page, "#health", "Redis has been unreachable for")
        await expect_text(page, "#health", "Events are still accepted into the spool")
        colour = await page.locator("#live").evaluate("e => getComputedStyle(e).backgroundColor")
        assert colour == "rgb(179, 38, 30)"  # --bad: red, not the green "live"
        await page.click("#d-retry")  # a click while Redis is away: said where it was clicked
        await playwright_api.expect(page.locator("#d-message")).to_have_attribute("data-kind", "failed")
        await expect_text(page, "#d-message", "Redis is unreachable")

        await page.reload()  # a page opened while Redis is away
        await live.to_have_attribute("data-health", "down", timeout=20_000)
        await expect_text(page, "#attention-empty", "Unknown: the failed jobs could not be read")
        await playwright_api.expect(page.locator("#attention-empty")).not_to_contain_text("Nothing has failed")
        await playwright_api.expect(page.locator("#per-minute")).to_have_text("?")
        await expect_text(page, "#stats-error", "Could not read the numbers")
        await expect_text(page, "#filter-error", "Could not read the jobs")
        await expect_text(page, "#workers-empty", "Unknown")
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "dashboard-redis-down.png"), full_page=True)

        private_redis.start()

        await live.to_have_text("live", timeout=20_000)
        await playwright_api.expect(page.locator("#health")).to_be_hidden()
        await playwright_api.expect(page.locator("#failed-list li")).to_have_count(1, timeout=20_000)
        await playwright_api.expect(page.locator("#per-minute")).not_to_have_text("?", timeout=20_000)
    finally:
        if CONTEXT in worker.ctx:
            await shutdown(worker.ctx)
        await pool.aclose()


async def test_a_portal_that_cannot_be_reached_turns_the_header_red_and_says_since_when(
        aiohttp_client: Any, settings: Any, rules: Any, redis: Any, make_worker: Any, portal_config: Any,
        page: Any) -> None:
    from pydantic import SecretStr

    away = portal_config.model_copy(update={"rest_url": SecretStr("http://127.0.0.1:9/rest/1/code/")})
    gone = rules.model_copy(update={"portals": {"acme": away}})
    client = await aiohttp_client(create_app(settings, gone))
    await post_event(client, "ONCRMACTIVITYADD", 5)
    await make_worker(rules=gone).run_check()

    await page.goto(str(client.make_url("/")))

    await playwright_api.expect(page.locator("#live")).to_have_attribute("data-health", "down")
    await expect_text(page, "#live", "portal acme unreachable")
    await expect_text(page, "#health", "Portal acme (acme.bitrix24.com) cannot be reached: never answered")
    await expect_text(page, "#health", "check its address (rest_url)")
