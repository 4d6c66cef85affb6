"""b24rebind keeps Bitrix24 CRM activities bound to the right client: it receives a portal's events and
re-binds e-mails, calls, meetings and to-dos by rules written in YAML.

Start with `b24rebind demo` (a demo portal and a conversion played out on it), then `b24rebind rules
check` on your rules file. Exit status: 0 done, 1 refused (invalid rules, failing rule tests, undo
refused), 2 bad arguments or settings, 3 Redis unreachable, 4 portal unreachable, 5 portal refused our
access, 6 not found, 130 interrupted.
"""
from __future__ import annotations

import argparse
from typing import Any
import asyncio
import dataclasses
import logging
import os
import sys
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from app import demo, loop, service
from app.cli import commands
from app.cli import jobs as jobs_cli
from app.cli.exits import Exit, Failure, NotFound, at_the_edge
from app.live_rules import DEFAULT_RULES, load_service_rules, variables
from app.rules.loader import load_rules
from app.settings import Settings, SettingsError, load_settings
from app.store import namespace
from app.store.queue import use_shards
from app.words import plural

ROLES = {
    "serve": service.Roles(web=True, worker=False),
    "worker": service.Roles(web=False, worker=True),
    "run": service.Roles(demo_portal=True),
    "demo": service.Roles(demo_portal=True, demo_story=True),
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        for line in exc.lines:
            print(f"b24rebind: {line}", file=sys.stderr)
        return Exit.USAGE
    if args.command == "demo":
        # The demo's jobs and its bundled Redis live apart from a real installation's.
        settings = settings.model_copy(update={"data_dir": settings.data_dir / "demo",
                                               "key_prefix": settings.key_prefix + "demo:"})
        if "LOG_LEVEL" not in os.environ:  # the story reads better without the service's routine lines
            settings = settings.model_copy(update={"log_level": "WARNING"})
    elif args.command not in ROLES:
        settings = _playground(settings)
    namespace.use_prefix(settings.key_prefix)  # before any command touches Redis
    use_shards(settings.worker_shards)  # every command that queues a job puts it on its portal's shard
    return at_the_edge(lambda: _command(args, settings), settings)


def _playground(settings: Settings) -> Settings:
    """A tool run where no rules file is written reaches the kept demo, if one runs, and says so."""
    if settings.rules != DEFAULT_RULES or settings.rules.exists():  # a rules file of one's own, named or written
        return settings
    kept = demo.find_playground(demo.playground_dir(settings))
    if kept is None:
        return settings
    print(f"b24rebind: {kept.notice}", file=sys.stderr, flush=True)
    return kept.settings_for(settings)


def _command(args: argparse.Namespace, settings: Settings) -> int:
    if args.command not in ROLES:
        # A tool says in one line why it cannot reach Redis; arq's retry notices would only add noise.
        logging.getLogger("arq.connections").setLevel(logging.ERROR)
    if args.command in jobs_cli.COMMANDS:
        return jobs_cli.run_command(args, settings)
    if args.command == "rules" and args.rules_command == "check":
        code = check_rules(Path(args.file) if args.file else None, settings)
        if code == 0 and args.portal:
            from app.cli.doctor import check_crm_mode
            return asyncio.run(check_crm_mode(Path(args.file) if args.file else None, settings, args.portal))
        return code
    try:
        if args.command == "demo" and args.demo_command == "convert":
            return asyncio.run(demo.convert_command(args.activities, args.late, args.repeat, settings))
        if args.command == "demo" and args.demo_command == "stop":
            return demo.stop_command(settings)
        if args.command in ROLES:
            roles = ROLES[args.command]
            if args.command == "demo" and args.keep:
                roles = dataclasses.replace(roles, keep=True)
            if args.command == "worker":
                settings = service.with_worker_shard(settings, args.shard)
            loop.run(service.run(settings, roles))
            return 0
    except demo.DemoError as exc:
        raise Failure(str(exc), Exit.PORTAL_DOWN if exc.portal_down else Exit.USAGE) from None
    except service.ShardError as exc:
        raise Failure(str(exc), Exit.USAGE) from None
    return _tool(args, settings)


def _tool(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "backfill":
        return asyncio.run(commands.backfill_command(settings, args.since, args.rule, args.dry_run, args.portal,
                                                     wait=not args.no_wait))
    if args.command == "doctor":
        from app.cli.doctor import doctor
        return asyncio.run(doctor(settings, args.portal))
    if args.command == "reconcile":
        return asyncio.run(service.reconcile_command(settings, args.portal))
    if args.rules_command == "explain":
        return asyncio.run(commands.explain_command(settings, args.activity, args.lead, args.portal, args.event))
    return commands.test_command(Path(args.file or "rules.tests.yaml"), settings)


def check_rules(path: Path | None, settings: Settings) -> int:
    if path is None and not settings.rules.exists() and settings.rules != DEFAULT_RULES:
        raise NotFound(f"{settings.rules}: missing; B24_RULES names it: fix B24_RULES, or write the file")
    if path is None and not settings.rules.exists():
        raise NotFound(f"{settings.rules}: missing. Without it the service runs the built-in rules on the demo "
                       "portal; to write your own: cp rules.example.yaml rules.yaml (or set B24_RULES to its path); "
                       "to play first: b24rebind demo --keep")
    rules = load_rules(path, variables()) if path else load_service_rules(settings)
    paused = [rule.name for rule in rules.rules if not rule.enabled]
    print(f"{path or settings.rules}: OK, {plural(len(rules.rules), 'rule')}, {plural(len(rules.portals), 'portal')} "
          f"({', '.join(rules.portals) or 'none: the demo portal will be used'})"
          + (f"; paused: {', '.join(paused)}" if paused else ""))
    return 0


Commands = Any  # the parser's subcommands: argparse names their class only privately


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="b24rebind", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands_ = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In the order `--help` lists them: watching jobs first, then running, trying, writing rules, fixing.
    for add_commands in (jobs_cli.add_commands, _service_commands, _demo_commands, _rules_commands,
                         _portal_commands):
        add_commands(commands_)
    return parser


def _service_commands(commands_: Commands) -> None:
    """The processes: the web process, a worker, or both."""
    commands_.add_parser("serve", help="the web process: receives portal events and queues them")
    worker_ = commands_.add_parser("worker", help="a worker: applies the rules to queued events")
    worker_.add_argument("--shard", type=int, metavar="K", help="the shard of portals it serves, from 0 "
                         "(B24_WORKER_SHARD; needed when B24_WORKER_SHARDS is above 1)")
    commands_.add_parser("run", help="web and worker together (bundled Redis when REDIS_URL is unset)")


def _demo_commands(commands_: Commands) -> None:
    """The demo, kept or not, and what a kept one plays."""
    demo_ = commands_.add_parser("demo", help="the real sequence on a built-in demo portal: the portal's "
                                              "conversion, then what b24rebind adds")
    demo_.add_argument("--keep", action="store_true",
                       help="stay up, the demo portal on B24_DEMO_PORT (8099), for `demo convert`")
    demo_commands = demo_.add_subparsers(dest="demo_command")
    convert = demo_commands.add_parser("convert", help="play another conversion on a `demo --keep` running")
    convert.add_argument("--activities", type=int, default=3, help="activities on the lead (default 3)")
    convert.add_argument("--late", type=int, default=0, help="e-mails arriving after the conversion (default 0)")
    convert.add_argument("--repeat", action="store_true", help="then a repeat lead of the same client")
    demo_commands.add_parser("stop", help="stop the demo that `demo --keep` keeps running")


def _rules_commands(commands_: Commands) -> None:
    """The rules file: checked, explained against the portal, its test cases run."""
    rules = commands_.add_parser("rules", help="work with the rules file")
    rules_commands = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_commands.add_parser("check", help="validate a rules file (default: B24_RULES)")
    check.add_argument("file", nargs="?", help="the rules file (default: B24_RULES, or rules.yaml)")
    check.add_argument("--portal", help="also ask this portal (its name in the rules file) whether the rules "
                                        "can fire there: a portal in simple CRM mode has no leads")
    explain = rules_commands.add_parser("explain", help="read the portal, show which rules match and the plan")
    target = explain.add_mutually_exclusive_group(required=True)
    target.add_argument("--activity", type=int, help="an activity id")
    target.add_argument("--lead", type=int, help="a lead id: all its activities")
    explain.add_argument("--event", help="the event to assume (default: ONCRMACTIVITYADD or ONCRMLEADUPDATE)")
    explain.add_argument("--portal", help="the portal's name in the rules file, when it has several")
    test = rules_commands.add_parser("test", help="run rule test cases (default: rules.tests.yaml)")
    test.add_argument("file", nargs="?", help="the test cases (default: rules.tests.yaml)")


def _portal_commands(commands_: Commands) -> None:
    """Work on a portal's past: backfill, doctor, reconcile."""
    backfill = commands_.add_parser("backfill", help="apply the rules to leads converted since a date")
    backfill.add_argument("--since", required=True, type=_date,
                          help="the first day, YYYY-MM-DD: leads converted (modified) since then")
    backfill.add_argument("--rule", help="apply this rule only")
    backfill.add_argument("--dry-run", action="store_true", help="record the plans, write nothing")
    backfill.add_argument("--portal", help="the portal's name in the rules file, when it has several")
    backfill.add_argument("--no-wait", action="store_true", help="only queue; running workers do the work")
    doctor = commands_.add_parser("doctor", help="check the portal's setup against the rules file, reading only")
    doctor.add_argument("--portal", help="the portal's name in the rules file, when it has several")
    reconcile = commands_.add_parser("reconcile", help="queue jobs for converted leads whose events were missed")
    reconcile.add_argument("--portal", help="the portal's name in the rules file (default: every portal)")


def _version() -> str:
    try:
        return version("b24rebind")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def _date(text: str) -> str:
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2026-01-31") from None


if __name__ == "__main__":
    sys.exit(main())
