"""The rules file as typed models: portals, rules, their conditions, targets and actions."""
from __future__ import annotations

from enum import IntEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.bitrix.portal import PortalConfig


class EntityType(IntEnum):
    """CRM entity type ids (crm.enum.ownertype)."""

    LEAD = 1
    DEAL = 2
    CONTACT = 3
    COMPANY = 4

    @property
    def label(self) -> str:
        return self.name.lower()


EntityName = Literal["lead", "deal", "contact", "company"]

EVENTS = (
    "ONCRMACTIVITYADD", "ONCRMACTIVITYUPDATE", "ONCRMLEADADD", "ONCRMLEADUPDATE",
    "ONCRMCONTACTADD", "ONCRMCONTACTUPDATE", "ONCRMCOMPANYADD", "ONCRMCOMPANYUPDATE",
    "ONCRMDEALADD", "ONCRMDEALUPDATE",
)

# What a lead-relative target means: the entities a conversion made from the lead.
TARGETS = ("lead.contact", "lead.company", "lead.deal")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FixedTarget(Strict):
    type: EntityName
    id: int = Field(gt=0)


Target = str | FixedTarget


class When(Strict):
    """Conditions on the activity; all that are given must hold."""

    bound_to: EntityName | None = None
    lead_status: str | None = Field(default=None, description="'converted' or a lead STATUS_ID")


class Action(Strict):
    """One step of a rule; exactly one of its keys is set."""

    bind: list[Target] | None = None
    unbind: EntityName | list[EntityName] | None = None

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

    @field_validator("on")
    @classmethod
    def _known_events(cls, events: list[str]) -> list[str]:
        upper = [event.upper() for event in events]
        for event in upper:
            if event not in EVENTS:
                raise ValueError(f"unknown event {event!r}; allowed: {', '.join(EVENTS)}")
        return upper

    @model_validator(mode="after")
    def _no_conflict(self) -> Rule:
        bound = {_target_type(t) for action in self.do for t in action.bind or []}
        for action in self.do:
            for entity in action.unbind_types:
                if entity in bound:
                    raise ValueError(f"rule binds and unbinds a {entity.label}; keep one of the two")
        return self

    def bind_targets(self) -> list[Target]:
        return [target for action in self.do for target in action.bind or []]

    def unbind_types(self) -> list[EntityType]:
        return [entity for action in self.do for entity in action.unbind_types]


class RuleSet(Strict):
    """The whole rules file."""

    portals: dict[str, PortalConfig] = {}
    mode: Literal["apply", "dry_run"] = "apply"
    rules: list[Rule] = Field(min_length=1)

    @model_validator(mode="after")
    def _names(self) -> RuleSet:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"two rules are named {rule.name!r}; names must be unique")
            seen.add(rule.name)
        for name, portal in self.portals.items():
            object.__setattr__(portal, "name", name)
        return self

    def events(self) -> set[str]:
        return {event for rule in self.rules for event in rule.on}

    def portal_for_domain(self, domain: str) -> PortalConfig | None:
        domain = domain.strip().lower()
        return next((p for p in self.portals.values() if p.domain == domain), None)


def _target_type(target: Target) -> EntityType:
    name = target.type if isinstance(target, FixedTarget) else target.split(".")[1]
    return EntityType[name.upper()]
