"""Finding and loading the rules file the settings point at."""
from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path

from dotenv import dotenv_values

from app.rules.loader import load_rules, parse_rules
from app.rules.model import RuleSet
from app.settings import Settings

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
