"""What every `b24rebind` command does with an expected failure: one line saying what is wrong and
what to do, and an exit status that tells the kinds apart (README, "Exit status").

The command's own code raises; only `at_the_edge` turns exceptions into words, so no command can
forget one and no traceback reaches a user.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from enum import IntEnum

from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.bitrix.errors import B24Error, ConfigError, TransientError
from app.settings import Settings
from app.store.bundled_redis import BundledRedisFailed
from app.store.jobs import UnknownJob


class Exit(IntEnum):
    OK = 0
    REFUSED = 1  # a check failed or an action was refused: invalid rules, failing rule tests, undo refused
    USAGE = 2  # a bad argument or setting, or a port taken
    REDIS_DOWN = 3  # Redis cannot be reached: start it, or fix REDIS_URL
    PORTAL_DOWN = 4  # the portal did not answer, or asked us to slow down: try again later
    PORTAL_ACCESS = 5  # the portal refused our access (webhook code, scope, plan): fix the configuration
    NOT_FOUND = 6  # no such activity, lead or job
    INTERRUPTED = 130  # Ctrl-C


class Failure(Exception):
    """An expected failure, already in words, with its exit status."""

    def __init__(self, message: str, status: Exit) -> None:
        super().__init__(message)
        self.status = status


class NotFound(Failure):
    def __init__(self, message: str) -> None:
        super().__init__(message, Exit.NOT_FOUND)


def at_the_edge(run: Callable[[], int], settings: Settings | None) -> int:
    """Run a command; an expected failure becomes one line on stderr and its exit status."""
    try:
        return run()
    except KeyboardInterrupt:
        print("b24rebind: interrupted (Ctrl-C); nothing queued is lost, and running the command again "
              "continues where it stopped", file=sys.stderr)
        return Exit.INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - sorted below; anything unknown is re-raised
        message, status = describe(exc, settings)
        if status is None:
            raise
        print(f"b24rebind: {message}", file=sys.stderr)
        return status


Words = tuple[str, Exit]  # what to tell the user, and the exit status


def describe(exc: BaseException, settings: Settings | None) -> tuple[str, Exit | None]:
    """The words and exit status for an expected failure; (str, None) for one that is a bug."""
    for kind in (_ours, _the_portals, _redis_s, _a_path_s):
        words = kind(exc, settings)
        if words is not None:
            return words
    return str(exc), None


def _ours(exc: BaseException, settings: Settings | None) -> Words | None:
    """Failures b24rebind words itself: a command's, the rules file's, the service's."""
    from app.api.endpoints import BadRequest
    from app.rules.loader import RulesError
    from app.service import CannotListen, WorkerStopped
    from app.rebind.undo import UndoRefused

    if isinstance(exc, Failure):
        return str(exc), exc.status
    if isinstance(exc, UnknownJob):
        return str(exc), Exit.NOT_FOUND
    if isinstance(exc, RulesError):
        # One mistake is one line (it names its file:line:col); several go under a line that counts them.
        return (str(exc) if len(exc.messages) == 1 else f"the rules file has {len(exc.messages)} mistakes:\n{exc}",
                Exit.REFUSED)
    if isinstance(exc, (UndoRefused, WorkerStopped)):
        return str(exc), Exit.REFUSED
    if isinstance(exc, (BadRequest, CannotListen)):
        return str(exc), Exit.USAGE
    return None


def _the_portals(exc: BaseException, settings: Settings | None) -> Words | None:
    """The portal's answers, by the error table's kinds: fix our access, try again later, or refused."""
    if isinstance(exc, ConfigError):
        return (f"the portal refused our access ({exc.method}: {exc.code}): {exc.hint or exc.description}",
                Exit.PORTAL_ACCESS)
    if isinstance(exc, TransientError):
        what = "could not be reached" if exc.code == "NETWORK_ERROR" else f"answered {exc.code or exc.status}"
        return (f"the portal {what} ({exc.description}): check its address in rest_url and this machine's "
                "network, then try again", Exit.PORTAL_DOWN)
    if isinstance(exc, B24Error):
        return f"the portal refused {exc.method}: {exc.code} ({exc.description}). {exc.hint}".strip(), Exit.REFUSED
    return None


def _redis_s(exc: BaseException, settings: Settings | None) -> Words | None:
    """Redis away, refusing the password or a command, or not a Sentinel where one was named."""
    if isinstance(exc, BundledRedisFailed):
        return str(exc), Exit.REDIS_DOWN
    if isinstance(exc, AuthenticationError):
        return (f"Redis at {redis_address(settings)} refused the password: check the one in REDIS_URL",
                Exit.REDIS_DOWN)
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        return (f"Redis at {redis_address(settings)} is unreachable ({_reason(exc)}): start it, or fix "
                "REDIS_URL (unset, b24rebind starts its bundled Redis)", Exit.REDIS_DOWN)
    if isinstance(exc, RedisResponseError) and "sentinel" in str(exc).lower():
        return (f"{redis_address(settings)} answers, but not as a Sentinel ({str(exc)[:80]}): give REDIS_SENTINELS "
                "the sentinels' addresses (port 26379, usually), not Redis's own", Exit.REDIS_DOWN)
    if isinstance(exc, RedisResponseError):
        return (f"Redis at {redis_address(settings)} refused a command ({str(exc)[:80]}): check that REDIS_URL "
                "names a Redis 6.2 or newer that this user may write to", Exit.REDIS_DOWN)
    return None


def _a_path_s(exc: BaseException, settings: Settings | None) -> Words | None:
    if isinstance(exc, OSError) and exc.filename:  # a path from the settings the system refuses
        return (f"cannot use {exc.filename}: {exc.strerror}; check the path and its permissions "
                "(B24_DATA_DIR, B24_SPOOL_DIR, B24_RULES)", Exit.USAGE)
    return None


def redis_address(settings: Settings | None) -> str:
    """Where Redis was looked for, without its password."""
    from app.store.queue import redis_settings

    if settings is None:
        return "REDIS_URL"
    if not settings.redis_given:
        return f"{settings.data_dir}/redis.sock (the bundled Redis)"
    target = redis_settings(settings)
    if target.unix_socket_path:
        return target.unix_socket_path
    hosts = target.host if isinstance(target.host, list) else [(target.host, target.port)]
    return ", ".join(f"{host}:{port}" for host, port in hosts) + (" (through Sentinel)" if target.sentinel else "")


def _reason(exc: BaseException) -> str:
    text = str(exc).rstrip(".")
    for known in ("Connection refused", "Connect call failed", "No such file or directory", "Timeout"):
        if known.lower() in text.lower():
            return "connection refused" if known == "Connect call failed" else known.lower()
    return type(exc).__name__
