"""A portal as the rules file describes it: where to call it and how to recognise its events."""
from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

# Plan presets of the portal's request limit (../shared/bitrix24-protocol.md §6).
PLAN_LIMITS = {"standard": (2.0, 50), "enterprise": (5.0, 250)}


class RateLimit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    per_second: float = Field(default=2.0, gt=0)
    burst: int = Field(default=50, ge=1)


class PortalConfig(BaseModel):
    """One Bitrix24 portal: its inbound webhook (`rest_url`) and its outbound webhook's token."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    domain: str
    rest_url: SecretStr
    application_token: SecretStr
    member_id: str | None = None
    rate_limit: RateLimit = RateLimit()

    @field_validator("domain")
    @classmethod
    def _lower_domain(cls, value: str) -> str:
        return value.strip().lower()

    @field_validator("rest_url")
    @classmethod
    def _https_unless_loopback(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value().strip()
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("rest_url must be the inbound webhook URL, https://<portal>/rest/<user>/<code>/")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError("rest_url must use https:// (plain http:// is allowed only on loopback)")
        return SecretStr(url if url.endswith("/") else url + "/")

    def secrets(self) -> list[str]:
        """Values that must never reach a log, a job record or an error message."""
        url = self.rest_url.get_secret_value()
        return [s for s in (url, urlsplit(url).path.strip("/"), self.application_token.get_secret_value()) if s]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
