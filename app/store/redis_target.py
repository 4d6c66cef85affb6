"""Where this installation's Redis is, as arq's `RedisSettings`: from REDIS_URL in any of its forms
(read by app/redis_url.py), or REDIS_SENTINELS with REDIS_SENTINEL_MASTER, the older spelling of a
Sentinel URL: then a REDIS_URL gives only the primary's user, password, database and TLS.
"""
from __future__ import annotations

from arq.connections import RedisSettings

from app.redis_url import SENTINEL_SCHEME, check_redis_url, parse_sentinel_url


def parse_redis_url(url: str) -> RedisSettings:
    """The Redis a REDIS_URL names: one server, or the primary a set of Sentinels names. A malformed
    one is a ValueError of one line that says what to write."""
    try:
        check_redis_url(url)
        if url.lower().startswith(SENTINEL_SCHEME + "://"):
            sentinel = parse_sentinel_url(url)
            return RedisSettings(host=sentinel.sentinels, sentinel=True, sentinel_master=sentinel.service,
                                 database=sentinel.database, username=sentinel.username, password=sentinel.password)
    except ValueError as exc:  # the settings check the URL at load; this is for a caller that did not
        raise ValueError(f"REDIS_URL {exc}") from None
    try:
        return RedisSettings.from_dsn(url)
    except ValueError as exc:  # what redis-py refuses beyond the shapes checked: its words, first line only
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"REDIS_URL is not a valid Redis URL ({reason}); e.g. redis://:password@host:6379/0") from None


def redis_target(redis_url: str | None, sentinels: list[tuple[str, int]], sentinel_master: str) -> RedisSettings:
    """The Redis the settings name: REDIS_URL, or the primary REDIS_SENTINELS name (REDIS_URL then gives
    the primary's user, password, database and TLS; its host and port are not used)."""
    target = parse_redis_url(redis_url or "redis://")
    if sentinels:
        if target.sentinel:
            raise ValueError(f"REDIS_SENTINELS is set and REDIS_URL is a {SENTINEL_SCHEME}:// URL: keep one of them")
        target.sentinel, target.host, target.sentinel_master = True, list(sentinels), sentinel_master
    return target
