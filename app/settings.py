"""Service settings: read once from the environment and `.env`, then passed down explicitly."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, IPvAnyNetwork, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from app.redis_url import check_redis_url, host_port

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


def _env(name: str) -> AliasChoices:
    return AliasChoices(name, name.lower())


class Settings(BaseSettings):
    """Everything the web process and the workers need to know that is not in the rules file."""

    # A variable set empty is unset (its default): .env.example ships the optional ones that way.
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True, env_ignore_empty=True)

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
    job_retention_days: float = Field(default=14, gt=0, le=3650, allow_inf_nan=False, validation_alias=_env("B24_JOB_RETENTION_DAYS"))
    max_job_records: int = Field(
        default=200_000, ge=1000, le=100_000_000, validation_alias=_env("B24_MAX_JOB_RECORDS"),
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
        default=300, ge=1, le=1000, validation_alias=_env("B24_WORKER_JOBS"),
        description="Jobs one worker process runs at once, of every portal; they mostly wait for the portal, "
                    "so a few hundred cost little.",
    )
    portal_jobs: int = Field(
        default=100, ge=1, le=1000, validation_alias=_env("B24_PORTAL_JOBS"),
        description="Jobs of one portal one worker process runs at once, its share; past it, the portal's "
                    "jobs take only slots the other portals leave free, all but a share, and its other jobs "
                    "wait in the queue without a slot, so a busy portal leaves the rest to the others. "
                    "Concurrent jobs of a portal share its calls (the more, the fuller each batch).",
    )
    worker_shards: int = Field(
        default=1, ge=1, le=256, validation_alias=_env("B24_WORKER_SHARDS"),
        description="Worker processes the portals are split between: each portal's jobs go to one shard's "
                    "queues (a stable hash of its name), served by one worker process, so its commands pack "
                    "into full batches. The same on the web process, the workers and the commands.",
    )
    worker_shard: int | None = Field(
        default=None, ge=0, le=255, validation_alias=_env("B24_WORKER_SHARD"),
        description="The shard a `worker` serves, from 0 (`b24rebind worker --shard K` says it too); "
                    "needed when B24_WORKER_SHARDS is above 1.",
    )
    reconcile_interval: float = Field(
        default=900, ge=0, le=7 * 86400, allow_inf_nan=False, validation_alias=_env("B24_RECONCILE_INTERVAL"),
        description="Seconds between the worker's reconciliation sweeps; 0 turns them off.",
    )
    alert_webhook: SecretStr | None = Field(
        default=None, validation_alias=_env("B24_ALERT_WEBHOOK"),
        description="A URL that gets a JSON post (with `text`, as chat webhooks take) when a portal stops "
                    "answering and when it answers again, at most one per portal every 5 minutes.",
    )

    @field_validator("redis_url", "api_token", "spool_dir", "worker_shard", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `.env.example` lists these empty; copied as is, they mean "not set", not an empty token.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("alert_webhook", mode="before")
    @classmethod
    def _http_url(cls, value: object) -> object:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(text, str) or not text.strip():
            return None
        parts = urlsplit(text.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("B24_ALERT_WEBHOOK must be an http(s):// URL, such as a chat's incoming webhook")
        return text.strip()

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _host_port_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [host_port(part.strip()) for part in value.split(",") if part.strip()]
        return value

    @field_validator("key_prefix")
    @classmethod
    def _ends_with_colon(cls, value: str) -> str:
        # "blue" and "blue:" both mean keys like "blue:b24:job:...", as Redis names are usually spelled;
        # no glob characters, so that `SCAN MATCH blue:*` finds this installation's keys and no others.
        value = value.strip()
        if any(char.isspace() or char in "*?[]" for char in value):
            raise ValueError("takes no spaces and no glob characters (* ? [ ])")
        return value if not value or value.endswith(":") else value + ":"

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        return None if value is None else check_redis_url(value.strip())

    @field_validator("log_level", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("host", "redis_sentinel_master")
    @classmethod
    def _one_word(cls, value: str) -> str:
        value = value.strip()
        if not value or any(char.isspace() or char in "/@?#" or not char.isprintable() for char in value):
            raise ValueError("must be one name or address, with no spaces, no scheme and no path")
        return value

    @field_validator("api_token")
    @classmethod
    def _printable(cls, value: SecretStr | None) -> SecretStr | None:
        token = value.get_secret_value() if value is not None else ""
        if any(char.isspace() or not char.isprintable() for char in token):
            raise ValueError("takes no spaces and no control characters")
        return value

    @field_validator("rules", "data_dir", "spool_dir", mode="before")
    @classmethod
    def _a_path(cls, value: object) -> object:
        if isinstance(value, str) and (not value.strip() or not value.isprintable()):
            raise ValueError("is not a path" if value.strip() else "is empty")
        return value

    @field_validator("rules")
    @classmethod
    def _not_a_directory(cls, value: Path) -> Path:
        if _stat(value) == "directory":
            raise ValueError("is a directory, not a file")
        return value

    @field_validator("data_dir", "spool_dir")
    @classmethod
    def _not_a_file(cls, value: Path | None) -> Path | None:
        if value is not None and _stat(value) == "file":
            raise ValueError("is a file, not a directory")
        return value

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


def _stat(path: Path) -> str:
    """"directory", "file" or "missing"; a path the system refuses to look at (too long, say) is refused."""
    try:
        return "directory" if path.is_dir() else "file" if path.exists() else "missing"
    except OSError as exc:
        raise ValueError(f"cannot be used ({exc.strerror})") from None


# What to write, per setting, after what is wrong: `setting NAME: what is wrong; what to write`.
WHAT_TO_WRITE = {
    "redis_url": "write redis://HOST:6379/0, rediss:// for TLS, unix:///path/to/redis.sock, or "
                 "redis+sentinel://HOST:26379[,HOST:26379]/SERVICE[/DB]; leave it empty for the bundled Redis",
    "redis_sentinels": "write host:port pairs, comma-separated: sentinel-a:26379,sentinel-b:26379",
    "redis_sentinel_master": "write the name the sentinels give the primary, e.g. mymaster",
    "key_prefix": "write a short name such as shop1 (letters, digits, : - _)",
    "rules": "write the rules file's path, e.g. rules.yaml",
    "host": "write the address to listen on: 127.0.0.1, or 0.0.0.0 for every interface",
    "port": "write a port number from 1 to 65535 (0: any free port), e.g. 8080",
    "demo_port": "write a port number from 1 to 65535, e.g. 8099",
    "api_token": "write a long random string: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'",
    "log_level": "write DEBUG, INFO, WARNING or ERROR",
    "data_dir": "write a directory's path, e.g. var",
    "job_retention_days": "write a number of days above 0, e.g. 14",
    "max_job_records": "write a whole number from 1000 up, e.g. 200000",
    "spool_dir": "write a directory's path, e.g. var/spool, or leave it empty",
    "allowed_sources": "write addresses or networks, comma-separated: 10.0.0.0/8,192.0.2.7",
    "worker_jobs": "write a whole number from 1 to 1000, e.g. 300",
    "portal_jobs": "write a whole number from 1 to 1000, e.g. 100 (at most B24_WORKER_JOBS)",
    "reconcile_interval": "write seconds between sweeps (0 turns them off), e.g. 900",
    "worker_shards": "write how many worker processes share the portals, from 1 to 256, e.g. 4",
    "worker_shard": "write this worker's shard, from 0 to B24_WORKER_SHARDS - 1, e.g. 0",
}


class SettingsError(Exception):
    """Settings that cannot be used: one line per setting, `setting NAME: what is wrong; what to write`."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("\n".join(lines))


def load_settings() -> Settings:
    """The settings from the environment and `.env`, validated once; every problem in words."""
    try:
        return Settings()
    except ValidationError as exc:
        lines: dict[str, str] = {}
        for error in exc.errors():
            field = _field_of(str(error["loc"][0]) if error["loc"] else "")
            lines.setdefault(field, f"setting {variable_name(field)}: {_what_is_wrong(error)}; "
                                    f"{WHAT_TO_WRITE.get(field) or _fallback_hint(field)}")
        raise SettingsError(list(lines.values())) from None
    except PydanticSettingsError as exc:  # a value the settings source could not even decode
        field = next((name for name in Settings.model_fields if f'"{name}"' in str(exc)), "")
        raise SettingsError([f"setting {variable_name(field)}: cannot be read; "
                             f"{WHAT_TO_WRITE.get(field) or _fallback_hint(field)}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError([f"setting file .env: cannot be read ({getattr(exc, 'strerror', None) or exc}); "
                             "write NAME=value lines in UTF-8, as .env.example does"]) from None


def _field_of(name: str) -> str:
    """The settings field an error's location names: the field itself, or one of its environment names."""
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        if name == field or (isinstance(alias, AliasChoices) and name in alias.choices):
            return field
    return name


def variable_name(field: str) -> str:
    """The environment variable behind a setting, as .env names it (B24_PORT, not port)."""
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info else None
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return field.upper() or ".env"


def _what_is_wrong(error: Any) -> str:
    kind, context = error["type"], error.get("ctx") or {}
    shown = error.get("input")
    given = f"{shown!r}" if isinstance(shown, str) and len(shown) <= 40 else "the value given"
    if error["loc"] and _field_of(str(error["loc"][0])) in ("redis_url", "api_token"):
        given = "the value given"  # may carry a password
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return f"{given} is not a whole number"
    if kind in ("float_parsing", "float_type", "finite_number"):
        return f"{given} is not a number"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bound = next(iter(context.values()), "")
        words = {"greater_than": "above", "greater_than_equal": "at least", "less_than": "below",
                 "less_than_equal": "at most"}[kind]
        return f"{given} is out of range (it must be {words} {bound})"
    if kind == "literal_error":
        return f"{given} is not one of {context.get('expected', 'the allowed values')}"
    if kind in ("ip_any_network", "ip_any_address", "ip_v4_network", "ip_v6_network"):
        return f"{given} is not an address or network"
    if kind == "value_error":
        return f"{given} {str(error['msg']).removeprefix('Value error, ')}"
    return f"{given} is not valid ({error['msg']})"


def _fallback_hint(field: str) -> str:
    info = Settings.model_fields.get(field)
    described = f"{info.description.rstrip('.')}; " if info is not None and info.description else ""
    return f"{described}see docs/settings.md for what it takes".lstrip()
