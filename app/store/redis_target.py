"""Where this installation's Redis is, as arq's `RedisSettings`: from REDIS_URL in any of its forms.

- `redis://…`, `rediss://…`, `unix://…`: one Redis server, as redis-py reads the URL;
- `redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/service_name[/db]`: the primary that
  these Sentinels name `service_name` (port 26379 when left out; an IPv6 address in brackets). The
  password is the primary's (and its replicas'); the Sentinels are asked without one;
- REDIS_SENTINELS (host:port list) with REDIS_SENTINEL_MASTER, the older spelling of the same: then a
  REDIS_URL gives only the primary's user, password, database and TLS.

Every malformed value is a ValueError with a one-line message that says what to write instead, so
settings validation can call `parse_redis_url` as it is.
"""
from __future__ import annotations

from urllib.parse import unquote, urlsplit

from arq.connections import RedisSettings

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379  # Sentinel's own default port
SENTINEL_FORM = "redis+sentinel://[:password@]host:port[,host:port…]/service_name[/db]"


def parse_redis_url(url: str) -> RedisSettings:
    """The Redis a REDIS_URL names: one server, or the primary a set of Sentinels names."""
    if url.startswith(SENTINEL_SCHEME + "://"):
        return parse_sentinel_url(url)
    if url.partition("://")[0] not in ("redis", "rediss", "unix"):
        raise ValueError(f"REDIS_URL must start with redis://, rediss://, unix:// or {SENTINEL_SCHEME}://")
    try:
        return RedisSettings.from_dsn(url)
    except ValueError as exc:  # a port that is not a number, a database that is not one
        raise ValueError(f"REDIS_URL is not a valid Redis URL ({_first_line(exc)}); "
                         "e.g. redis://:password@host:6379/0") from None


def parse_sentinel_url(url: str) -> RedisSettings:
    """`redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/service_name[/db]`."""
    rest = url.removeprefix(SENTINEL_SCHEME + "://")
    credentials, at, hosts_and_path = rest.rpartition("@")
    if not at:
        credentials, hosts_and_path = "", rest
    hosts_text, slash, path = hosts_and_path.partition("/")
    hosts = [sentinel_address(part.strip()) for part in hosts_text.split(",") if part.strip()]
    if not hosts:
        raise ValueError(f"REDIS_URL names no Sentinel: write {SENTINEL_FORM}")
    parts = [unquote(part) for part in path.split("/")] if slash else []
    if parts and parts[-1] == "":
        parts.pop()  # a trailing slash
    if not parts or not parts[0]:
        raise ValueError(f"REDIS_URL names no service (the name in the Sentinels' `sentinel monitor` line): "
                         f"write {SENTINEL_FORM}")
    if len(parts) > 2 or "?" in path or "#" in path:
        raise ValueError(f"REDIS_URL has more after the service name than a database number: write {SENTINEL_FORM}")
    database = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise ValueError(f"REDIS_URL's database must be a number, not {parts[1]!r}: write {SENTINEL_FORM}")
        database = int(parts[1])
    username, _, password = credentials.partition(":")
    return RedisSettings(host=hosts, sentinel=True, sentinel_master=parts[0], database=database,
                         username=unquote(username) or None, password=unquote(password) or None)


def sentinel_address(text: str) -> tuple[str, int]:
    """host:port, or [IPv6 address]:port; without a port, Sentinel's own 26379."""
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError(f"Sentinel address {text!r} is not [IPv6 address]:port")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.partition(":")
    if not host:
        raise ValueError(f"Sentinel address {text!r} has no host: write host:port")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"Sentinel address {text!r} has no valid port (1-65535): write host:port")
    return host, int(port or SENTINEL_PORT)


def redis_target(redis_url: str | None, sentinels: list[tuple[str, int]], sentinel_master: str) -> RedisSettings:
    """The Redis the settings name: REDIS_URL, or the primary REDIS_SENTINELS name (REDIS_URL then gives
    the primary's user, password, database and TLS; its host and port are not used)."""
    target = parse_redis_url(redis_url or "redis://")
    if sentinels:
        if target.sentinel:
            raise ValueError(f"REDIS_SENTINELS is set and REDIS_URL is a {SENTINEL_SCHEME}:// URL: keep one of them")
        target.sentinel, target.host, target.sentinel_master = True, list(sentinels), sentinel_master
    return target


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
