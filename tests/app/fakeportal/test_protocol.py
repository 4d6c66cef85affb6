"""The protocol's shapes: PHP-style params, pages of 50 and the fields `select` names."""

from __future__ import annotations

import aiohttp

from app.fakeportal import LEAD, FakePortal, parse_php_query
from tests.app.fakeportal.conftest import call


def test_parse_php_query() -> None:
    pairs = [
        ("filter[>ID]", "5"),
        ("select[]", "ID"),
        ("select[]", "TITLE"),
        ("cmd[a]", "x?y=1"),
        ("plain", "v"),
    ]
    assert parse_php_query(pairs) == {
        "filter": {">ID": "5"},
        "select": ["ID", "TITLE"],
        "cmd": {"a": "x?y=1"},
        "plain": "v",
    }


async def test_list_paging_and_fast_form(portal: FakePortal, session: aiohttp.ClientSession) -> None:
    lead = portal.add_lead()
    for _ in range(120):
        portal.add_activity([(LEAD, lead)])
    status, body = await call(session, portal, "crm.activity.list", {"order": {"ID": "ASC"}})
    assert (len(body["result"]), body["total"], body["next"]) == (50, 120, 50)
    status, body = await call(session, portal, "crm.activity.list", {"start": 100})
    assert (len(body["result"]), body["total"], "next" in body) == (20, 120, False)
    status, body = await call(
        session, portal, "crm.activity.list", {"filter": {">ID": "100"}, "order": {"ID": "ASC"}, "start": -1}
    )
    assert [row["ID"] for row in body["result"]] == [str(i) for i in range(101, 121)]
    assert body["total"] == 0 and "next" not in body  # no COUNT: the total a portal may send is 0
    status, body = await call(session, portal, "crm.activity.list", {"order": {"ID": "DESC"}, "start": -1})
    assert body["result"][0]["ID"] == "120"


async def test_lists_return_the_selected_fields_and_multiple_ones_only_when_named(
        portal: FakePortal, session: aiohttp.ClientSession) -> None:
    portal.add_contact("Ann", email="ann@example.com")
    status, body = await call(session, portal, "crm.contact.list", {"select": ["NAME"]})
    assert body["result"] == [{"ID": "1", "NAME": "Ann"}]
    status, body = await call(session, portal, "crm.contact.list", {"select": ["*"]})
    assert "EMAIL" not in body["result"][0] and body["result"][0]["NAME"] == "Ann"
    status, body = await call(session, portal, "crm.contact.list", {"select": ["*", "EMAIL"]})
    assert body["result"][0]["EMAIL"][0]["VALUE"] == "ann@example.com"
