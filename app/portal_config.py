"""A portal as the rules file describes it: where to call it and how to recognise its events."""
from __future__ import annotations

import ipaddress
import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

# Plan presets of the portal's request limit (b24restdocs: settings/performance/limits.md).
PLAN_LIMITS = {"standard": (2.0, 50), "enterprise": (5.0, 250)}


class RateLimit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    per_second: float = Field(default=2.0, gt=0)
    burst: int = Field(default=50, ge=1)


class PortalConfig(BaseModel):
    """One Bitrix24 portal, reached through an inbound webhook (`rest_url`, the default) or as an
    installed application (`auth: oauth`, whose tokens and application token arrive with ONAPPINSTALL)."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    domain: str
    auth: Literal["webhook", "oauth"] = "webhook"
    rest_url: SecretStr | None = None
    application_token: SecretStr | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    oauth_url: str = "https://oauth.bitrix.info/oauth/token/"
    member_id: str | None = None
    offline_events: bool = Field(default=False, description="application mode: events bound with "
                                 "event_type=offline are read with event.offline.get by the reconciler")
    rate_limit: RateLimit = RateLimit()
    operating_budget: float = Field(default=480.0, gt=0, description="server seconds per method per 10 minutes")

    @field_validator("domain")
    @classmethod
    def _lower_domain(cls, value: str) -> str:
        # Events name their portal by host alone (auth[domain]); a URL here would match none of them.
        domain = value.strip().lower()
        host = urlsplit(domain if "//" in domain else "//" + domain).hostname or ""
        if not domain or "/" in domain or host != domain.split(":")[0] or " " in domain:
            raise ValueError(f"domain is the portal's host name alone, as events name it: write "
                             f"{host or 'example.bitrix24.com'!r}, with no https:// and no path")
        return domain

    @model_validator(mode="after")
    def _complete(self) -> PortalConfig:
        if self.auth == "webhook" and (self.rest_url is None or self.application_token is None):
            raise ValueError("a webhook portal needs rest_url (the inbound webhook) and application_token "
                             "(the outbound webhook's token)")
        if self.auth == "oauth" and (not self.client_id or self.client_secret is None):
            raise ValueError("an application (auth: oauth) needs client_id and client_secret from its settings")
        if self.auth == "webhook" and self.rest_url is not None:
            _webhook_shape(self.rest_url.get_secret_value())
        if self.offline_events and self.auth != "oauth":
            raise ValueError("offline events need the application mode (auth: oauth); webhooks cannot read them")
        return self

    @field_validator("oauth_url")
    @classmethod
    def _oauth_https(cls, value: str) -> str:
        return _checked_url(value, "oauth_url")

    @field_validator("rest_url")
    @classmethod
    def _https_unless_loopback(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        url = value.get_secret_value().strip()
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("rest_url must be the inbound webhook URL, https://<portal>/rest/<user>/<code>/")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError("rest_url must use https:// (plain http:// is allowed only on loopback)")
        return SecretStr(url if url.endswith("/") else url + "/")

    def secrets(self) -> list[str]:
        """Values that must never reach a log, a job record or an error message."""
        url = self.rest_url.get_secret_value() if self.rest_url else ""
        values = (url, urlsplit(url).path.strip("/"),
                  self.application_token.get_secret_value() if self.application_token else "",
                  self.client_secret.get_secret_value() if self.client_secret else "")
        return [value for value in values if value]


_WEBHOOK_PATH = re.compile(r"/rest/\d+/[^/]+/$")
_METHOD = re.compile(r"/([a-z0-9_]+(?:\.[a-z0-9_]+)+?)(?:\.json|\.xml)?/?$", re.IGNORECASE)


def _webhook_shape(url: str) -> None:
    """An inbound webhook is https://<portal>/rest/<user id>/<code>/; the usual slip is to paste the
    example call the portal shows, which ends with a method."""
    path = urlsplit(url).path
    if _WEBHOOK_PATH.search(path):
        return
    method = _METHOD.search(path)
    if method and "/rest/" in path:
        raise ValueError(f"rest_url ends with a method ({method.group(1)}): give the webhook's base URL only, "
                         "https://<portal>/rest/<user id>/<code>/, without the method")
    raise ValueError("rest_url is not an inbound webhook URL: it looks like https://<portal>/rest/<user id>/<code>/ "
                     "(Developer resources, Other, Inbound webhook)")


def _checked_url(url: str, name: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{name} must be an https:// URL")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError(f"{name} must use https:// (plain http:// is allowed only on loopback)")
    return url.strip()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
