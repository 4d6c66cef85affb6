"""The `b24rebind` command."""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from pydantic import ValidationError

from app import service
from app.config import load_service_rules, variables
from app.rules.loader import RulesError, load_rules
from app.settings import Settings

ROLES = {
    "serve": service.Roles(web=True, worker=False),
    "worker": service.Roles(web=False, worker=True),
    "run": service.Roles(demo_portal=True),
    "demo": service.Roles(demo_portal=True, demo_story=True),
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"b24rebind: bad setting in the environment or .env:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "rules":
        return check_rules(Path(args.file) if args.file else None, settings)
    try:
        asyncio.run(service.run(settings, ROLES[args.command]))
    except RulesError as exc:
        print(f"b24rebind: the rules file is invalid, not starting:\n{exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def check_rules(path: Path | None, settings: Settings) -> int:
    try:
        rules = load_rules(path, variables()) if path else load_service_rules(settings)
    except RulesError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{path or settings.rules}: OK, {len(rules.rules)} rules, {len(rules.portals)} portals "
          f"({', '.join(rules.portals) or 'none: the demo portal will be used'})")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="b24rebind", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="the web process: receives portal events and queues them")
    commands.add_parser("worker", help="a worker: applies the rules to queued events")
    commands.add_parser("run", help="web and worker together (bundled Redis when REDIS_URL is unset)")
    commands.add_parser("demo", help="`run` with the demo portal and a few sample events")
    rules = commands.add_parser("rules", help="work with the rules file")
    rules_commands = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_commands.add_parser("check", help="validate a rules file (default: B24_RULES)")
    check.add_argument("file", nargs="?")
    return parser


if __name__ == "__main__":
    sys.exit(main())
