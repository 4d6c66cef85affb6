"""The rules file as typed models: portals, rules, their conditions, targets and actions."""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.crm import EntityType as EntityType
from app.crm import entity_label as entity_label
from app.crm import entity_type_of as entity_type_of
from app.portal_config import PortalConfig


EntityName = Literal["lead", "deal", "contact", "company"]

EVENTS = (
    "ONCRMACTIVITYADD", "ONCRMACTIVITYUPDATE", "ONCRMLEADADD", "ONCRMLEADUPDATE",
    "ONCRMCONTACTADD", "ONCRMCONTACTUPDATE", "ONCRMCOMPANYADD", "ONCRMCOMPANYUPDATE",
    "ONCRMDEALADD", "ONCRMDEALUPDATE",
)

# Where a target is looked up: `lead.contact` is what a conversion made from the activity's lead;
# `contact.company` the company of the activity's contact; `matched.*` an existing client found by
# the activity's e-mail or phone (crm.duplicate.findbycomm).
TARGETS = ("lead.contact", "lead.company", "lead.deal", "contact.company", "deal.contact", "deal.company",
           "matched.contact", "matched.company")

# Activity kinds by name, as TYPE_ID / PROVIDER_ID of crm.activity.get.
KINDS = {"meeting": ("1", None), "call": ("2", None), "email": ("4", None), "task": ("6", "TASKS"),
         "todo": ("6", "CRM_TODO")}
# PROVIDER_IDs a portal's own activities carry; another is named explicitly: `kind: {provider: MY_APP}`.
PROVIDERS = ("CRM_EMAIL", "VOXIMPLANT_CALL", "CRM_MEETING", "CRM_CALL_LIST", "CRM_TODO", "TASKS", "TASKS_TASK",
             "IMOPENLINES_SESSION", "CRM_WEBFORM", "CRM_SMS", "CRM_REQUEST", "REST_APP", "CRM_DELIVERY",
             "CRM_EXTERNAL_CHANNEL", "CRM_VISIT", "CALENDAR_SHARING", "ZOOM", "CRM_NOTIFICATION")
# A lead's STATUS_IDs as a portal ships them (crm.status.list, ENTITY_ID=STATUS); statuses a portal
# adds are UC_... ids, or are named explicitly: `lead_status: {status: MY_STATUS}`.
LEAD_STATUSES = ("NEW", "IN_PROCESS", "PROCESSED", "CONVERTED", "JUNK")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class FixedTarget(Strict):
    type: EntityName
    id: int = Field(gt=0)


Target = str | FixedTarget


def target_type(target: Target) -> EntityType:
    name = target.type if isinstance(target, FixedTarget) else target.split(".")[1]
    return EntityType[name.upper()]


def _one_or_many(value: object) -> object:
    return value if isinstance(value, list) or value is None else [value]


def _known_values(values: object, field: str, explicit: str, known: list[str], normal: Callable[[str], str],
                  custom: re.Pattern[str] | None = None) -> object:
    """Known names pass (in their usual spelling); `{explicit: X}` passes X as given; a near miss of a
    known name is refused with it, since a misspelt value would make the rule never match."""
    values = _one_or_many(values)
    if not isinstance(values, list):
        return values
    out: list[object] = []
    for value in values:
        if isinstance(value, dict) and set(value) == {explicit} and str(value[explicit]).strip():
            out.append(str(value[explicit]).strip())
            continue
        if not isinstance(value, str):
            out.append(value)  # the type check says what is wrong
            continue
        text = normal(value.strip())
        if text in known or (custom is not None and custom.match(text)):
            out.append(text)
            continue
        near = difflib.get_close_matches(value.strip(), known, n=1, cutoff=0.6) or \
            difflib.get_close_matches(text, known, n=1, cutoff=0.6)
        raise ValueError(f"unknown {field} {value!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                         + f" Known: {', '.join(known[:7])}{', ...' if len(known) > 7 else ''}; to name one "
                           "this service does not know, write "
                           f"{{{explicit}: {value.strip()}}}")
    return out


class When(Strict):
    """Conditions on the activity; all that are given must hold."""

    bound_to: EntityName | None = None
    kind: list[str] | None = Field(default=None, description="email, call, meeting, task, todo or a provider id")
    direction: Literal["incoming", "outgoing"] | None = None
    lead_status: list[str] | None = Field(default=None, description="'converted' or lead STATUS_IDs")
    responsible: list[int] | None = None
    subject_contains: str | None = None
    subject_matches: str | None = None
    portal: list[str] | None = None
    any: list[When] | None = None
    not_: When | None = Field(default=None, alias="not")

    _lists = field_validator("kind", "lead_status", "responsible", "portal", mode="before")(
        classmethod(lambda cls, v: _one_or_many(v)))

    @field_validator("kind", mode="before")
    @classmethod
    def _known_kinds(cls, kinds: object) -> object:
        return _known_values(kinds, "kind", "provider", [*KINDS, *PROVIDERS],
                             lambda text: text.lower() if text.lower() in KINDS else text.upper())

    @field_validator("lead_status", mode="before")
    @classmethod
    def _known_statuses(cls, statuses: object) -> object:
        return _known_values(statuses, "lead_status", "status", ["converted", *LEAD_STATUSES],
                             lambda text: "converted" if text == "converted" else text.upper(),
                             custom=re.compile(r"^UC_[A-Z0-9]+$", re.IGNORECASE))

    @field_validator("subject_matches")
    @classmethod
    def _a_regex(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return pattern

    def mentions_lead_status(self) -> bool:
        return self.lead_status is not None


class Move(Strict):
    """Move a binding within one entity type (crm.activity.binding.move)."""

    from_: EntityName = Field(alias="from")
    to: Target

    @model_validator(mode="after")
    def _same_type(self) -> Move:
        if target_type(self.to).label != self.from_:
            raise ValueError(f"a move stays within one type: from {self.from_} cannot go to "
                             f"{target_type(self.to).label}; use bind and unbind instead")
        return self


class Action(Strict):
    """One step of a rule; exactly one of its keys is set."""

    bind: list[Target] | None = None
    unbind: EntityName | list[EntityName] | None = None
    move: Move | None = None
    timeline_comments: Literal["follow"] | None = None

    @field_validator("bind")
    @classmethod
    def _known_targets(cls, targets: list[Target] | None) -> list[Target] | None:
        for target in targets or []:
            if isinstance(target, str) and target not in TARGETS:
                raise ValueError(f"unknown target {target!r}; allowed: {', '.join(TARGETS)} "
                                 "or {type: company, id: 42}")
        return targets

    @model_validator(mode="after")
    def _exactly_one(self) -> Action:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("each step has exactly one of: " + ", ".join(type(self).model_fields))
        return self

    @property
    def unbind_types(self) -> list[EntityType]:
        names = [self.unbind] if isinstance(self.unbind, str) else (self.unbind or [])
        return [EntityType[name.upper()] for name in names]


class Rule(Strict):
    name: str = Field(min_length=1)
    on: list[str] = Field(min_length=1)
    when: When = When()
    do: list[Action] = Field(min_length=1)
    stop: bool = False
    mode: Literal["apply", "dry_run"] | None = None
    enabled: bool = Field(default=True, description="false pauses the rule: it matches nothing until set back")

    @field_validator("on", mode="before")
    @classmethod
    def _known_events(cls, events: object) -> object:
        events = _one_or_many(events)
        if not isinstance(events, list):
            return events
        upper = [str(event).upper() for event in events]
        for event in upper:
            if event not in EVENTS:
                near = difflib.get_close_matches(event, EVENTS, n=1, cutoff=0.6)
                raise ValueError(f"unknown event {event!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                                 + f" Allowed: {', '.join(EVENTS)}")
        return upper

    @model_validator(mode="after")
    def _no_conflict(self) -> Rule:
        for entity in self.unbind_types():
            if entity in self.bound_types():
                raise ValueError(f"rule binds and unbinds a {entity.label}; keep one of the two")
        return self

    def bind_targets(self) -> list[Target]:
        return [target for action in self.do for target in action.bind or []]

    def bound_types(self) -> set[EntityType]:
        return {target_type(t) for t in self.bind_targets()}

    def unbind_types(self) -> list[EntityType]:
        return [entity for action in self.do for entity in action.unbind_types]

    def moves(self) -> list[Move]:
        return [action.move for action in self.do if action.move is not None]

    def comments_follow(self) -> bool:
        return any(action.timeline_comments == "follow" for action in self.do)

    def targets(self) -> list[Target]:
        return self.bind_targets() + [move.to for move in self.moves()]

    def needs_leads(self) -> str | None:
        """Why this rule can never fire on a portal without leads (simple CRM mode), or None."""
        if all(event.startswith("ONCRMLEAD") for event in self.on):
            return "it listens only to lead events"
        if self.when.bound_to == "lead":
            return "it applies to activities bound to a lead"
        if self.when.lead_status is not None:
            return "it asks for a lead status"
        targets = self.targets()
        if targets and all(isinstance(t, str) and t.startswith("lead.") for t in targets) \
                and not self.unbind_types():
            return "it binds only to what a lead became"
        return None


SIMPLE_CRM = 2  # crm.settings.mode.get: 1 classic, 2 simple (no leads: a new lead is a deal at once)


class RuleSet(Strict):
    """The whole rules file."""

    portals: dict[str, PortalConfig] = {}
    mode: Literal["apply", "dry_run"] = "apply"
    rules: list[Rule] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> RuleSet:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"two rules are named {rule.name!r}; names must be unique")
            seen.add(rule.name)
        _no_flip_flops(self.rules)
        for name, portal in self.portals.items():
            portal.name = name
        return self

    def events(self) -> set[str]:
        return {event for rule in self.rules for event in rule.on}

    def lead_rules(self) -> dict[str, str]:
        """Rules that can never fire on a portal in simple CRM mode, each with the reason."""
        return {rule.name: reason for rule in self.rules if (reason := rule.needs_leads())}

    def portal_for_domain(self, domain: str) -> PortalConfig | None:
        domain = domain.strip().lower()
        return next((p for p in self.portals.values() if p.domain == domain), None)

    def needs(self) -> set[str]:
        """The target sources the rules read (`lead`, `contact`, `deal`, `matched`), and `comments`."""
        sources = {t.split(".")[0] for rule in self.rules for t in rule.targets() if isinstance(t, str)}
        if any(rule.comments_follow() for rule in self.rules):
            sources.add("comments")
        return sources


def _no_flip_flops(rules: list[Rule]) -> None:
    """Two rules on one event that bind and unbind one type, or move one type two ways, would undo
    each other on every echo of their own change; refuse them when the file is loaded."""
    for i, first in enumerate(rules):
        for second in rules[i + 1:]:
            if not set(first.on) & set(second.on):
                continue
            for a, b in ((first, second), (second, first)):
                clash = a.bound_types() & set(b.unbind_types())
                if clash:
                    raise ValueError(f"rules {a.name!r} and {b.name!r} bind and unbind a "
                                     f"{next(iter(clash)).label} on the same event; they would undo each other")
            moves = {(m.from_, str(m.to)) for m in first.moves()} | {(m.from_, str(m.to)) for m in second.moves()}
            sources = [m[0] for m in moves]
            if len(sources) != len(set(sources)):
                raise ValueError(f"rules {first.name!r} and {second.name!r} move a "
                                 f"{sources[0]} to two different places; they would undo each other")
