"""Service settings: read once from the environment and `.env`, then passed down explicitly."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, IPvAnyNetwork, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


def _env(name: str) -> AliasChoices:
    return AliasChoices(name, name.lower())


class Settings(BaseSettings):
    """Everything the web process and the workers need to know that is not in the rules file."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    redis_url: str | None = Field(
        default=None,
        validation_alias=_env("REDIS_URL"),
        description="Redis for the job queue; unset starts the bundled Redis under the data directory.",
    )
    redis_sentinels: Annotated[list[tuple[str, int]], NoDecode] = Field(
        default=[],
        validation_alias=_env("REDIS_SENTINELS"),
        description="Sentinels as host:port, comma-separated; set, they name the Redis primary, and "
                    "REDIS_URL gives only its password, database and TLS.",
    )
    redis_sentinel_master: str = Field(default="mymaster", validation_alias=_env("REDIS_SENTINEL_MASTER"))
    redis_min_replicas: int = Field(
        default=0, ge=0, validation_alias=_env("B24_REDIS_MIN_REPLICAS"),
        description="Replicas that must confirm (Redis WAIT) an event's job before the portal gets its 200; "
                    "unconfirmed within a second, the event is spooled until they do. 0: no wait.",
    )
    key_prefix: str = Field(
        default="",
        validation_alias=_env("B24_KEY_PREFIX"),
        description="Put before every name this installation uses in Redis, so several can share a database.",
    )
    rules: Path = Field(default=Path("rules.yaml"), validation_alias=_env("B24_RULES"))
    host: str = Field(default="127.0.0.1", validation_alias=_env("B24_HOST"))
    port: int = Field(default=8080, ge=0, le=65535, validation_alias=_env("B24_PORT"))
    # `demo --keep` serves the demo portal here, and `demo convert` finds it here.
    demo_port: int = Field(default=8099, ge=1, le=65535, validation_alias=_env("B24_DEMO_PORT"))
    api_token: SecretStr | None = Field(default=None, validation_alias=_env("B24_API_TOKEN"))
    log_level: LogLevel = Field(default="INFO", validation_alias=_env("LOG_LEVEL"))
    data_dir: Path = Field(default=Path("var"), validation_alias=_env("B24_DATA_DIR"))
    job_retention_days: float = Field(default=14, gt=0, validation_alias=_env("B24_JOB_RETENTION_DAYS"))
    max_job_records: int = Field(
        default=200_000, ge=1000, validation_alias=_env("B24_MAX_JOB_RECORDS"),
        description="Job records kept at most, whatever their age (the oldest go first): bounds Redis memory.",
    )
    spool_dir: Path | None = Field(
        default=None,
        validation_alias=_env("B24_SPOOL_DIR"),
        description="Where events wait on disk while Redis is unreachable; unset: <data_dir>/spool.",
    )
    allowed_sources: Annotated[list[IPvAnyNetwork], NoDecode] = Field(
        default=[],
        validation_alias=_env("B24_ALLOWED_SOURCES"),
        description="Addresses (or networks) allowed to post events; empty allows any.",
    )
    worker_jobs: int = Field(
        default=100, ge=1, le=500, validation_alias=_env("B24_WORKER_JOBS"),
        description="Jobs one worker process runs at once; they mostly wait for the portal, so a hundred "
                    "cost little, and concurrent jobs share their calls to a portal (the more of them wait "
                    "together, the fuller each batch: fewer requests of the portal's budget).",
    )
    reconcile_interval: float = Field(
        default=900, ge=0, validation_alias=_env("B24_RECONCILE_INTERVAL"),
        description="Seconds between the worker's reconciliation sweeps; 0 turns them off.",
    )

    @field_validator("redis_url", "api_token", "spool_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `.env.example` lists these empty; copied as is, they mean "not set", not an empty token.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _host_port_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [_host_port(part.strip()) for part in value.split(",") if part.strip()]
        return value

    @field_validator("key_prefix")
    @classmethod
    def _ends_with_colon(cls, value: str) -> str:
        # "blue" and "blue:" both mean keys like "blue:b24:job:...", as Redis names are usually spelled;
        # no glob characters, so that `SCAN MATCH blue:*` finds this installation's keys and no others.
        value = value.strip()
        if any(char.isspace() or char in "*?[]" for char in value):
            raise ValueError("a key prefix takes no spaces and no glob characters (* ? [ ])")
        return value if not value or value.endswith(":") else value + ":"

    @property
    def redis_given(self) -> bool:
        """Whether a Redis of one's own is configured; without one the service starts the bundled Redis."""
        return bool(self.redis_url or self.redis_sentinels)

    @field_validator("allowed_sources", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip().startswith("["):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


def _host_port(text: str) -> tuple[str, int]:
    """host:port, or [IPv6 address]:port; without a port, Sentinel's own 26379."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.partition(":")
    return host, int(port or 26379)
