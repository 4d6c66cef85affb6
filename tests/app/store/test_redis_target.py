"""REDIS_URL's forms, the Sentinel one included, and a one-line error for each malformed one."""
from __future__ import annotations

import re

import pytest

from app.settings import Settings
from app.store.queue import redis_settings
from app.store.redis_target import parse_redis_url


def test_a_sentinel_url_names_every_sentinel_the_service_and_the_database() -> None:
    target = parse_redis_url("redis+sentinel://:pa%40ss@s1:26380,s2,[fd00::7]:26381/mymaster/3")

    assert target.sentinel is True
    assert target.host == [("s1", 26380), ("s2", 26379), ("fd00::7", 26381)]
    assert (target.sentinel_master, target.database, target.password, target.username) == ("mymaster", 3, "pa@ss", None)


def test_a_sentinel_url_without_a_database_uses_0_and_may_name_a_user() -> None:
    target = parse_redis_url("redis+sentinel://app:secret@10.0.0.1:26379/orders")
    assert (target.sentinel_master, target.database, target.username, target.password) == ("orders", 0, "app", "secret")
    assert parse_redis_url("redis+sentinel://10.0.0.1:26379/orders/").database == 0


def test_the_plain_forms_are_one_server() -> None:
    assert parse_redis_url("rediss://:pw@cache:6380/2").sentinel is False
    assert parse_redis_url("unix:///run/redis.sock").unix_socket_path == "/run/redis.sock"


@pytest.mark.parametrize(("url", "says"), [
    ("redis+sentinel:///mymaster", "names no Sentinel"),
    ("redis+sentinel://s1:26379", "names no service"),
    ("redis+sentinel://s1:26379/", "names no service"),
    ("redis+sentinel://s1:26379/mymaster/zero", "names a database that is not a number"),
    ("redis+sentinel://s1:26379/mymaster/0/extra", "more after the service name"),
    ("redis+sentinel://s1:263790/mymaster", "port is not a number from 1 to 65535"),
    ("redis+sentinel://:secret@s1:port/mymaster", "port is not a number from 1 to 65535"),
    ("redis+sentinel://[fd00::7/mymaster", "not [IPv6 address]:port"),
    ("http://cache:6379", "is not a Redis URL (it starts with http://)"),
    ("redis://cache:port/0", "has a port that is not a number"),
])
def test_a_malformed_url_is_one_line_that_says_what_to_write(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)) as raised:
        parse_redis_url(url)
    message = str(raised.value)
    assert "\n" not in message and "secret" not in message


def test_sentinels_in_both_redis_url_and_redis_sentinels_is_an_error() -> None:
    settings = Settings(_env_file=None, redis_url="redis+sentinel://s1:26379/mymaster",
                        redis_sentinels="s2:26379")
    with pytest.raises(ValueError, match="keep one of them"):
        redis_settings(settings)


def test_a_sentinel_url_is_a_redis_of_ones_own() -> None:
    settings = Settings(_env_file=None, redis_url="redis+sentinel://s1:26379/mymaster/1")
    assert settings.redis_given
    target = redis_settings(settings)
    assert (target.sentinel, target.host, target.database) == (True, [("s1", 26379)], 1)
