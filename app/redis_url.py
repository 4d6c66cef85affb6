"""REDIS_URL's forms, read in one place: the settings check them once at load, and the store builds
its connection from what they say (app/store/redis_target.py).

- `redis://…`, `rediss://…`, `unix://…`: one Redis server, as redis-py reads the URL;
- `redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/service_name[/db]`: the primary that
  these Sentinels name `service_name` (port 26379 when left out; an IPv6 address in brackets).

Every malformed value is a ValueError whose one-line message says what is wrong and what to write,
worded to follow the setting's name ("setting REDIS_URL: names no service …"). A message never
repeats the URL, which may carry a password.
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379  # Sentinel's own default port
SENTINEL_FORM = "redis+sentinel://[:password@]host:port[,host:port…]/service_name[/db]"
SCHEMES = ("redis", "rediss", "unix", SENTINEL_SCHEME)


@dataclass(frozen=True)
class SentinelUrl:
    """What a `redis+sentinel://` URL says: where the Sentinels are, and which primary of theirs to use."""

    sentinels: list[tuple[str, int]]
    service: str
    database: int = 0
    username: str | None = None
    password: str | None = None  # the primary's (and its replicas'); the Sentinels are asked without one


def check_redis_url(url: str) -> str:
    """The URL as given, when it has one of the forms the service connects with."""
    scheme, has_scheme, _ = url.partition("://")
    if not has_scheme or scheme.lower() not in SCHEMES:
        raise ValueError("is not a Redis URL" + (f" (it starts with {scheme}://)" if has_scheme else
                                                 " (it has no scheme, like redis://)"))
    if scheme.lower() == SENTINEL_SCHEME:
        parse_sentinel_url(url)
        return url
    parts = urlsplit(url)
    if scheme.lower() == "unix":
        if not parts.path:
            raise ValueError("has no socket path after unix:// (as in unix:///run/redis/redis.sock)")
        return url
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked for it
    except ValueError:
        raise ValueError("has a port that is not a number from 1 to 65535") from None
    if parts.path.strip("/") and not parts.path.strip("/").isdigit():
        raise ValueError("names a database that is not a number (the path after the host is the database: /0)")
    return url


def parse_sentinel_url(url: str) -> SentinelUrl:
    """`redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/service_name[/db]`."""
    rest = url.split("://", 1)[1]
    credentials, at, hosts_and_path = rest.rpartition("@")
    if not at:
        credentials, hosts_and_path = "", rest
    hosts_text, slash, path = hosts_and_path.partition("/")
    sentinels = [host_port(part.strip()) for part in hosts_text.split(",") if part.strip()]
    if not sentinels:
        raise ValueError(f"names no Sentinel: write {SENTINEL_FORM}")
    parts = [unquote(part) for part in path.split("/")] if slash else []
    if parts and parts[-1] == "":
        parts.pop()  # a trailing slash
    if not parts or not parts[0]:
        raise ValueError(f"names no service (the name in the Sentinels' `sentinel monitor` line): write {SENTINEL_FORM}")
    if len(parts) > 2 or "?" in path or "#" in path:
        raise ValueError(f"has more after the service name than a database number: write {SENTINEL_FORM}")
    if len(parts) == 2 and not parts[1].isdigit():
        raise ValueError(f"names a database that is not a number ({parts[1]!r}): write {SENTINEL_FORM}")
    username, _, password = credentials.partition(":")
    return SentinelUrl(sentinels, parts[0], int(parts[1]) if len(parts) == 2 else 0,
                       unquote(username) or None, unquote(password) or None)


def host_port(text: str) -> tuple[str, int]:
    """host:port, or [IPv6 address]:port; without a port, Sentinel's own 26379 (a Sentinel's address in
    REDIS_URL or in REDIS_SENTINELS)."""
    if text.startswith("["):
        host, closed, port = text[1:].partition("]")
        if not closed or (port and not port.startswith(":")):
            raise ValueError(f"has an entry that is not [IPv6 address]:port ({text!r})")
        port = port.removeprefix(":")
    else:
        host, _, port = text.partition(":")
    if not host or any(char.isspace() or char in "/@" for char in host):
        raise ValueError(f"has an entry that is not host:port ({text!r})")
    if not (port or str(SENTINEL_PORT)).isdigit() or not 0 < int(port or SENTINEL_PORT) < 65536:
        raise ValueError(f"has an entry whose port is not a number from 1 to 65535 ({text!r})")
    return host, int(port or SENTINEL_PORT)
