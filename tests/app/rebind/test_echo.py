"""The change log's records in a real Redis: the echo fingerprint, and the hour's window of changes."""
from __future__ import annotations

from typing import Any

from app.rebind.echo import CHANGE_WINDOW_SECONDS, ECHO_SECONDS, MAX_CHANGES_PER_WINDOW, ChangeLog
from app.rules.facts import Activity, Binding
from app.rules.model import EntityType
from tests.conftest import record_changes

CONTACT = Binding(entity_type=EntityType.CONTACT, entity_id=2)


async def test_a_recorded_change_is_recognised_when_it_echoes_back(redis: Any) -> None:
    changes = ChangeLog(redis, "acme")
    await record_changes(redis, changes, 11, (CONTACT,))

    assert await changes.is_echo(Activity(id=11, bindings=(CONTACT,)))
    assert not await changes.is_echo(Activity(id=11, bindings=()))
    assert 0 < await redis.ttl("b24:applied:acme:11") <= ECHO_SECONDS


async def test_the_hours_window_starts_at_the_first_change_and_is_not_stretched(redis: Any) -> None:
    changes = ChangeLog(redis, "acme")
    await record_changes(redis, changes, 12)
    assert 0 < await redis.ttl("b24:changes:acme:12") <= CHANGE_WINDOW_SECONDS
    await redis.expire("b24:changes:acme:12", 100)  # the window, some time later

    await record_changes(redis, changes, 12, times=MAX_CHANGES_PER_WINDOW - 1)

    assert await redis.ttl("b24:changes:acme:12") <= 100
    assert await changes.looping([12]) == {12}
