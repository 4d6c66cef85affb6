"""Application mode on the web side: ONAPPINSTALL brings the tokens, later events carry its token."""
from __future__ import annotations

import hmac
import logging
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.bitrix.oauth import TokenStore
from app.portal_config import PortalConfig
from app.logs import Throttled
from app.rules.model import RuleSet

log = logging.getLogger(__name__)
throttled = Throttled(log)  # anyone can post an ONAPPINSTALL: refusals are one line every 10 s

INSTALL_EVENT = "ONAPPINSTALL"
_last_read: dict[tuple[str, str], str] = {}  # (portal, domain) -> the application token last read from Redis


async def expected_token(redis: Redis, portal: PortalConfig) -> str | None:
    """The application token an event must carry: from the rules file, or the one ONAPPINSTALL brought."""
    if portal.application_token is not None:
        return portal.application_token.get_secret_value()
    try:
        tokens = await TokenStore(redis).load(portal.name)
    except (RedisError, OSError):
        # While Redis is away, the token last read still checks events: they are spooled, not refused.
        if (portal.name, portal.domain) in _last_read:
            return _last_read[portal.name, portal.domain]
        raise
    token = tokens.application_token if tokens else None
    if token:
        _last_read[portal.name, portal.domain] = token
    return token


async def accept_install(redis: Redis, rules: RuleSet, data: dict[str, Any]) -> tuple[int, dict[str, str]]:
    """Store an application's tokens. Only a portal of the rules file in `auth: oauth` mode may install;
    a reinstall must come from the same member, and with the application token already known."""
    auth = data.get("auth")
    if not isinstance(auth, dict):
        auth = {}
    portal = rules.portal_for_domain(str(auth.get("domain", "")))
    needed = ("access_token", "refresh_token", "application_token", "member_id")
    if portal is None or portal.auth != "oauth" or not all(auth.get(key) for key in needed):
        throttled.warning("install", "refused ONAPPINSTALL for %s: not a portal in application mode",
                          str(auth.get("domain"))[:100])
        return 401, {"error": "unknown portal, or not configured with auth: oauth in the rules file"}
    if portal.member_id and portal.member_id != auth["member_id"]:
        return 401, {"error": "member_id does not match the rules file"}
    store = TokenStore(redis)
    known = await store.load(portal.name)
    if known and not hmac.compare_digest(known.application_token.encode(), str(auth["application_token"]).encode()):
        # Trust on first install only: a second install must prove it is the same application.
        throttled.warning("reinstall", "refused a second ONAPPINSTALL for %s with another application token",
                          portal.name)
        return 401, {"error": "the application is installed already; uninstall it first"}
    await store.save(portal.name, TokenStore.from_install(auth))
    log.info("application installed on portal %s", portal.name)
    return 200, {"installed": portal.name}
