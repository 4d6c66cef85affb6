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


# What an unset `${VARIABLE}` reads as where nothing reaches the portal (`rules test`), by the key it fills.
STAND_INS = {"rest_url": "https://example.bitrix24.com/rest/1/stand-in/"}


def load_rules(path: Path, environ: Mapping[str, str] | None = None, stand_ins: bool = False) -> RuleSet:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError([f"cannot read rules file {path}: {exc.strerror}; set B24_RULES to its path"]) from None
    return parse_rules(text, str(path), os.environ if environ is None else environ, stand_ins)


def parse_rules(text: str, filename: str, environ: Mapping[str, str], stand_ins: bool = False) -> RuleSet:
    """The rules in `text`; with `stand_ins`, an unset `${VARIABLE}` is given a stand-in instead of refused
    (rule tests run the engine alone: the webhook's URL and token are never used)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        # An unclosed [ ] or { } or quote is found where the next thing starts: point at its opening instead.
        unclosed = any(words in str(exc.problem) for words in ("expected ',' or", "unexpected end of stream"))
        mark = (exc.context_mark if unclosed else None) or exc.problem_mark or exc.context_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else f"{filename}:1:1"
        raise RulesError([f"{where}: not valid YAML: {_yaml_words(exc)}"]) from None
    except yaml.YAMLError as exc:  # no position: a character YAML cannot read at all
        raise RulesError([f"{filename}:1:1: not valid YAML: {exc}; save the file as UTF-8 text"]) from None
    if root is None:
        raise RulesError([f"{filename}:1:1: the rules file is empty; see rules.example.yaml"])
    converter = _Converter(filename, environ, stand_ins)
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

    def __init__(self, filename: str, environ: Mapping[str, str], stand_ins: bool = False) -> None:
        self.filename, self.environ, self.stand_ins = filename, environ, stand_ins
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
            return _VAR.sub(lambda match: self._variable(match.group(1), loc), value)
        return value

    def _variable(self, name: str, loc: Loc) -> str:
        where = self.positions[loc]
        if self.environ.get(name, "").strip():
            return self.environ[name]
        if self.stand_ins:
            return STAND_INS.get(str(loc[-1]) if loc else "", "stand-in")
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
        return f"{filename}:{where.line}:{where.column}: unknown key {key!r}{in_rule}{hint}"
    message = _words(err)
    loc = _named_key(loc, message, data)  # a portal's rule about its rest_url points at rest_url's line
    where = _nearest(loc, positions)
    if loc and isinstance(loc[-1], str):
        subject = f"'{loc[-1]}'{in_rule}"
    else:
        subject = f"rule {rule!r}" if rule else "the file"
    return f"{filename}:{where.line}:{where.column}: {subject}: {message}"


def _words(err: Any) -> str:
    """pydantic's message in the file's terms: what is wrong, then what to write or the near miss."""
    kind, context, given = err["type"], err.get("ctx") or {}, err.get("input")
    shown = repr(given) if isinstance(given, (str, int, float)) and len(str(given)) <= 60 else "the value"
    if kind in ("literal_error", "enum"):
        allowed = re.findall(r"'([^']*)'", str(context.get("expected", "")))
        near = difflib.get_close_matches(str(given), allowed, n=1) if isinstance(given, str) else []
        hint = f"did you mean {near[0]!r}?" if near else f"write one of {', '.join(allowed)}"
        return f"{shown} is not one of {', '.join(allowed)}; {hint}"
    if kind == "missing":
        return "missing; add it"
    bounds = {"greater_than": "above", "greater_than_equal": "at least", "less_than": "below",
              "less_than_equal": "at most"}
    if kind in bounds:
        limit = next(iter(context.values()), "")
        return f"{shown} is out of range; write a number {bounds[kind]} {limit}"
    kinds = {"int_parsing": "a whole number", "int_type": "a whole number", "int_from_float": "a whole number",
             "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
             "bool_type": "true or false", "string_type": "text", "list_type": "a list ([a, b] or - lines)",
             "dict_type": "a mapping (key: value lines)", "model_type": "a mapping (key: value lines)",
             "model_attributes_type": "a mapping (key: value lines)"}
    if kind in kinds:
        return f"{shown} is not {kinds[kind]}; write {kinds[kind]}"
    return str(err["msg"]).removeprefix("Value error, ")


def _named_key(loc: Loc, message: str, data: Any) -> Loc:
    """A check on a whole mapping whose message is about one of its keys points at that key."""
    node = data
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return loc
    if isinstance(node, dict):
        for key in node:
            if isinstance(key, str) and message.startswith(f"{key} "):
                return (*loc, key)
    return loc


# PyYAML's problems, in the words of a person editing the file: (what PyYAML says, what to say).
YAML_PROBLEMS = [
    ("expected <block end>", "this line is indented differently from the lines above it; indent it as its "
                             "neighbours (spaces only)"),
    ("mapping values are not allowed", "a ':' where a value was expected; put quotes around a value that "
                                       "holds ': ', or the key on a line of its own"),
    ("cannot start any token", "a character that cannot start a value here (a tab?); indent with spaces, and "
                               "quote values that start with @ or `"),
    ("could not find expected ':'", "a key without its ':'; write key: value"),
    ("expected ',' or ']'", "a list in [ ] is not closed; add the ']' or a ',' between items"),
    ("expected ',' or '}'", "a mapping in { } is not closed; add the '}' or a ',' between items"),
    ("found unexpected end of stream", "the file ends inside a quoted value; close the quote"),
    ("found undefined alias", "an alias (*name) names no anchor (&name); define the anchor first"),
    ("expected <block sequence start>", "a list item ('- ') is not where a list was expected; line it up with "
                                        "the other items"),
    ("block sequence entries are not allowed", "a list item ('- ') where a value was expected; start the list "
                                               "on its own line"),
    ("found duplicate anchor", "two anchors share a name; rename one"),
]


def _yaml_words(exc: yaml.MarkedYAMLError) -> str:
    said = f"{exc.context or ''} {exc.problem or ''}"
    for problem, words in YAML_PROBLEMS:
        if problem in said:
            return words
    return f"{exc.problem or exc.context}; compare the line with rules.example.yaml"


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
