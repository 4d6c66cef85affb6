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
    rules: Path = Field(default=Path("rules.yaml"), validation_alias=_env("B24_RULES"))
    host: str = Field(default="127.0.0.1", validation_alias=_env("B24_HOST"))
    port: int = Field(default=8080, ge=0, le=65535, validation_alias=_env("B24_PORT"))
    api_token: SecretStr | None = Field(default=None, validation_alias=_env("B24_API_TOKEN"))
    log_level: LogLevel = Field(default="INFO", validation_alias=_env("LOG_LEVEL"))
    data_dir: Path = Field(default=Path("var"), validation_alias=_env("B24_DATA_DIR"))
    job_retention_days: float = Field(default=14, gt=0, validation_alias=_env("B24_JOB_RETENTION_DAYS"))
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
    reconcile_interval: float = Field(
        default=900, ge=0, validation_alias=_env("B24_RECONCILE_INTERVAL"),
        description="Seconds between the worker's reconciliation sweeps; 0 turns them off.",
    )

    @field_validator("redis_url", "api_token", "spool_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `.env.example` lists these empty; copied as is, they mean "not set", not an empty token.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("allowed_sources", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip().startswith("["):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
