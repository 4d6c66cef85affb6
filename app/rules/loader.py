"""Load the rules file, naming the file, line and column of anything wrong in it.

YAML is composed into nodes (which remember where they stand), `${VAR}` is replaced from the
environment, and pydantic validates the result; each validation error is mapped back to its node.
"""
from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from app.rules.model import RuleSet

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
Loc = tuple[str | int, ...]


class RulesError(Exception):
    """The rules file cannot be used; the message says where and how to fix it."""

    def __init__(self, messages: list[str]) -> None:
        self.messages = messages
        super().__init__("\n".join(messages))


@dataclass(frozen=True)
class Position:
    line: int
    column: int


def load_rules(path: Path, environ: Mapping[str, str] | None = None) -> RuleSet:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError([f"cannot read rules file {path}: {exc.strerror}; set B24_RULES to its path"]) from None
    return parse_rules(text, str(path), os.environ if environ is None else environ)


def parse_rules(text: str, filename: str, environ: Mapping[str, str]) -> RuleSet:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        raise RulesError([f"{where}: not valid YAML: {exc.problem or exc.context}"]) from None
    if root is None:
        raise RulesError([f"{filename}:1:1: the rules file is empty; see rules.example.yaml"])
    converter = _Converter(filename, environ)
    data = converter.convert(root, ())
    if converter.problems:
        raise RulesError(converter.problems)
    if not isinstance(data, dict):
        raise RulesError([f"{filename}:1:1: the rules file must be a mapping with 'portals' and 'rules'"])
    try:
        return RuleSet.model_validate(data)
    except ValidationError as exc:
        raise RulesError(_describe_all(exc, data, converter.positions, filename)) from None


class _Converter:
    """Turns YAML nodes into plain data, remembering where each value and key stood."""

    def __init__(self, filename: str, environ: Mapping[str, str]) -> None:
        self.filename, self.environ = filename, environ
        self.positions: dict[Loc, Position] = {}
        self.problems: list[str] = []
        self._scalars = yaml.SafeLoader("")  # types scalars (int, bool, null...) exactly as safe_load does

    def convert(self, node: yaml.Node, loc: Loc) -> Any:
        self.positions[loc] = _position(node)
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = key_node.value
                self.positions[(*loc, key, "__key__")] = _position(key_node)
                out[key] = self.convert(value_node, (*loc, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, (*loc, i)) for i, item in enumerate(node.value)]
        value = self._scalars.construct_object(node, deep=True)
        if isinstance(value, str) and "${" in value:
            return _VAR.sub(lambda match: self._variable(match.group(1), self.positions[loc]), value)
        return value

    def _variable(self, name: str, where: Position) -> str:
        if self.environ.get(name, "").strip():
            return self.environ[name]
        if name in self.environ:  # `.env.example` lists them empty: say so, rather than "malformed"
            self.problems.append(f"{self.filename}:{where.line}:{where.column}: ${{{name}}} is empty; "
                                 f"give {name} a value in .env or in the environment")
            return ""
        self.problems.append(f"{self.filename}:{where.line}:{where.column}: ${{{name}}} is not set; "
                             f"set {name} in .env or in the environment")
        return ""


def _position(node: yaml.Node) -> Position:
    return Position(node.start_mark.line + 1, node.start_mark.column + 1)


def _describe_all(exc: ValidationError, data: Any, positions: dict[Loc, Position], filename: str) -> list[str]:
    """One line per wrong place in the file; union members that did not apply add nothing."""
    messages: dict[Loc, str] = {}
    errors = [(err, _data_loc(tuple(err["loc"]), data, missing=err["type"] == "missing")) for err in exc.errors()]
    # A key that is missing next to an unknown key is the same typo: report the unknown key only.
    misspelt = {loc[:-1] for err, loc in errors if err["type"] == "extra_forbidden"}
    for err, loc in errors:
        if err["type"] == "string_type" and isinstance(err.get("input"), dict):
            continue  # a mapping was meant for the other member of a `str | Model` union
        if err["type"] == "missing" and loc[:-1] in misspelt:
            continue
        if loc not in messages:
            messages[loc] = _describe(err, loc, data, positions, filename)
    return list(messages.values())


def _describe(err: Any, loc: Loc, data: Any, positions: dict[Loc, Position], filename: str) -> str:
    rule = _rule_name(loc, data)
    in_rule = f" in rule {rule!r}" if rule else ""
    if err["type"] == "extra_forbidden":
        key = loc[-1]
        where = positions.get((*loc, "__key__")) or _nearest(loc, positions)
        allowed = _allowed_keys(loc[:-1], data)
        near = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; allowed: {', '.join(allowed)}"
        return f"unknown key {key!r}{in_rule} at {filename}:{where.line}:{where.column}{hint}"
    where = _nearest(loc, positions)
    message = err["msg"].removeprefix("Value error, ")
    if loc and isinstance(loc[-1], str):
        subject = f"'{loc[-1]}'{in_rule}"
    else:
        subject = f"rule {rule!r}" if rule else "the file"
    return f"{filename}:{where.line}:{where.column}: {subject}: {message}"


def _data_loc(loc: Loc, data: Any, *, missing: bool) -> Loc:
    """Keep the parts of pydantic's location that are keys in the file; drop union member tags."""
    out: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif i < len(loc) - 1 or not missing:
            continue  # a union member's name, not a key in the file
        out.append(part)
    return tuple(out)


def _nearest(loc: Loc, positions: dict[Loc, Position]) -> Position:
    for end in range(len(loc), -1, -1):
        if loc[:end] in positions:
            return positions[loc[:end]]
    return Position(1, 1)


def _rule_name(loc: Loc, data: Any) -> str | None:
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        try:
            name = data["rules"][loc[1]].get("name")
            return str(name) if name else f"#{loc[1] + 1}"
        except (KeyError, IndexError, AttributeError, TypeError):
            return None
    return None


def _allowed_keys(loc: Loc, data: Any) -> list[str]:
    from app.portal_config import PortalConfig, RateLimit
    from app.rules.model import Action, FixedTarget, Move, Rule, When

    # Where each model sits in the file; `int` and `str` stand for any list index and any mapping key.
    shapes: list[tuple[tuple[str | type[int] | type[str], ...], type[BaseModel]]] = [
        (("rules", int, "when"), When), (("rules", int, "do", int, "bind", int), FixedTarget),
        (("rules", int, "do", int, "move"), Move), (("rules", int, "do", int), Action), (("rules", int), Rule),
        (("portals", str, "rate_limit"), RateLimit), (("portals", str), PortalConfig), ((), RuleSet),
    ]
    if "when" in loc and (loc[-1] in ("when", "not") or (len(loc) > 1 and loc[-2] == "any")):
        loc = ("rules", 0, "when")  # conditions nest inside `any` and `not`
    for pattern, model in shapes:
        if len(pattern) == len(loc) and all(p == part or (isinstance(p, type) and isinstance(part, p))
                                            for p, part in zip(pattern, loc)):
            return [field.alias or name for name, field in model.model_fields.items()
                    if name != "name" or model is not PortalConfig]
    return []
