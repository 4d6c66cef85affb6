"""The rules in force for the service: the rules file (or the built-in rules), its `${VAR}`s, reloads."""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from dotenv import dotenv_values

from app.rules.loader import RulesError, load_rules, parse_rules
from app.rules.model import RuleSet
from app.settings import Settings
from app.words import plural

log = logging.getLogger(__name__)

DEFAULT_RULES = Path("rules.yaml")


def variables() -> dict[str, str]:
    """What `${VAR}` in the rules file may name: `.env`, overridden by the environment."""
    from_file = {k: v for k, v in dotenv_values(".env").items() if v is not None} if Path(".env").exists() else {}
    return {**from_file, **os.environ}


def load_service_rules(settings: Settings) -> RuleSet:
    """The configured rules file, or the built-in rules when the default file does not exist."""
    if settings.rules.exists() or settings.rules != DEFAULT_RULES:
        return load_rules(settings.rules, variables())
    log.info("no %s here; using the built-in rules (see rules.example.yaml to write your own)", DEFAULT_RULES)
    text = resources.files("app.rules").joinpath("default.yaml").read_text(encoding="utf-8")
    return parse_rules(text, "built-in default rules", variables())


class LiveRules:
    """The rules in force, reloaded on SIGHUP or when the file changes; a broken file keeps the old ones."""

    def __init__(self, rules: RuleSet, settings: Settings | None = None,
                 adapt: Callable[[RuleSet], RuleSet] = lambda rules: rules) -> None:
        self.current = rules
        self.error: str | None = None
        self._settings = settings
        self._adapt = adapt  # e.g. adds the demo portal to every version of the file
        self._stamp = self._file_stamp()

    def reload(self) -> bool:
        if self._settings is None:
            return False
        self._stamp = self._file_stamp()
        try:
            self.current = self._adapt(load_service_rules(self._settings))
        except RulesError as exc:
            self.error = f"{exc}; the previous rules stay in force"
            log.error("rules not reloaded: %s", self.error)
            return False
        self.error = None
        log.info("rules reloaded: %s, %s", plural(len(self.current.rules), "rule"),
                 plural(len(self.current.portals), "portal"))
        return True

    async def watch(self, interval: float = 2.0) -> None:
        """Reload whenever the rules file's modification time or size changes."""
        while True:
            await asyncio.sleep(interval)
            if self._file_stamp() != self._stamp:
                self.reload()

    def _file_stamp(self) -> tuple[float, int] | None:
        try:
            stat = self._settings.rules.stat() if self._settings else None
        except OSError:
            return None
        return (stat.st_mtime, stat.st_size) if stat else None
