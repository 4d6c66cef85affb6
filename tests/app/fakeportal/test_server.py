"""FakePortal over real HTTP: authentication, unknown methods, form and JSON params, and `batch`."""

from __future__ import annotations

import aiohttp

from app.fakeportal import LEAD, FakePortal
from tests.app.fakeportal.conftest import call


async def test_wrong_webhook_code_is_401(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    url = f"{portal.base_url}/rest/1/wrong/crm.lead.get.json"
    async with session.post(url, json={"id": 1}) as response:
        assert response.status == 401
        assert await response.json() == {
            "error": "NO_AUTH_FOUND",
            "error_description": "Wrong authorization data",
        }
    assert portal.request_count == 0


async def test_unknown_method_is_404(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    status, body = await call(session, portal, "crm.nothing.here")
    assert (status, body["error"]) == (404, "ERROR_METHOD_NOT_FOUND")


async def test_form_encoded_php_params(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead = portal.add_lead()
    contact = portal.add_contact("Ann")
    activity = portal.add_activity([(LEAD, lead)])
    form = {"activityId": str(activity), "entityTypeId": "3", "entityId": str(contact)}
    async with session.post(portal.rest_url + "crm.activity.binding.add", data=form) as response:
        assert (await response.json())["result"] is True
    query = (
        "filter[>ID]=0&filter[BINDINGS][0][OWNER_TYPE_ID]=3"
        f"&filter[BINDINGS][0][OWNER_ID]={contact}&select[]=ID"
    )
    async with session.get(portal.rest_url + "crm.activity.list.json?" + query) as response:
        assert [row["ID"] for row in (await response.json())["result"]] == [str(activity)]
    form = {"halt": "0", "cmd[one]": f"crm.activity.binding.list?activityId={activity}"}
    async with session.post(portal.rest_url + "batch", data=form) as response:
        assert len((await response.json())["result"]["result"]["one"]) == 2


async def test_batch_results_errors_and_one_request(
    portal: FakePortal, session: aiohttp.ClientSession
) -> None:
    lead = portal.add_lead()
    contact = portal.add_contact("Ann", lead_id=lead)
    activity = portal.add_activity([(LEAD, lead)])
    cmd = {
        "add": f"crm.activity.binding.add?activityId={activity}&entityTypeId=3&entityId={contact}",
        "again": f"crm.activity.binding.add?activityId={activity}&entityTypeId=3&entityId={contact}",
        "list": "crm.activity.list?filter[BINDINGS][0][OWNER_TYPE_ID]=1"
        f"&filter[BINDINGS][0][OWNER_ID]={lead}",
        "nested": "batch?cmd[x]=crm.lead.get%3Fid%3D1",
    }
    portal.reset_counters()
    status, body = await call(session, portal, "batch", {"halt": 0, "cmd": cmd})
    assert status == 200
    result = body["result"]
    assert list(result["result"]) == ["add", "list"]
    assert result["result"]["add"] is True
    assert [row["ID"] for row in result["result"]["list"]] == [str(activity)]
    assert result["result_total"] == {"list": 1}
    assert result["result_next"] == []
    assert result["result_error"]["again"]["error"] == "ACTIVITY_IS_ALREADY_BOUND"
    assert result["result_error"]["nested"]["error"] == "ERROR_BATCH_METHOD_NOT_ALLOWED"
    assert portal.requests == [("batch", 4)]

    status, body = await call(session, portal, "batch", {"cmd": {"a": f"crm.lead.get?id={lead}"}})
    assert body["result"]["result_error"] == [] and body["result"]["result_total"] == []


async def test_batch_halt_and_length_limit(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead = portal.add_lead()
    cmd = {"bad": "crm.lead.get?id=999", "good": f"crm.lead.get?id={lead}"}
    status, body = await call(session, portal, "batch", {"halt": 1, "cmd": cmd})
    assert list(body["result"]["result_error"]) == ["bad"] and body["result"]["result"] == []

    too_many = {f"c{i}": f"crm.lead.get?id={lead}" for i in range(53)}
    status, body = await call(session, portal, "batch", {"cmd": too_many})
    # The first 50 run; each one past them is refused, the call itself answers 200.
    assert status == 200
    assert list(body["result"]["result"]) == [f"c{i}" for i in range(50)]
    assert {key: error["error"] for key, error in body["result"]["result_error"].items()} == {
        "c50": "ERROR_BATCH_LENGTH_EXCEEDED", "c51": "ERROR_BATCH_LENGTH_EXCEEDED", "c52": "ERROR_BATCH_LENGTH_EXCEEDED"}
