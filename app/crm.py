"""The CRM's values every layer speaks: entity types (as crm.enum.ownertype numbers them) and bindings.

Below the store and the rules alike: job records and the audit log keep bindings, the rules engine
reads and plans them, the executor sends them. (`app.rules.model` and `app.rules.facts` re-export
these names, where they were first written.)
"""
from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EntityType(IntEnum):
    """CRM entity type ids (crm.enum.ownertype)."""

    LEAD = 1
    DEAL = 2
    CONTACT = 3
    COMPANY = 4

    @property
    def label(self) -> str:
        return self.name.lower()


def entity_label(entity_type: int) -> str:
    """`contact`, `deal`...; a type the rules cannot name (a quote, a smart process) as `type128`."""
    try:
        return EntityType(entity_type).label
    except ValueError:
        return f"type{int(entity_type)}"


def entity_type_of(label: str) -> EntityType | int:
    """The inverse of `entity_label`."""
    label = label.strip().lower()
    if label.startswith("type") and label[4:].isdigit():
        return int(label[4:])
    return EntityType[label.upper()]


class Binding(BaseModel):
    model_config = ConfigDict(frozen=True)

    # An activity may be bound to any CRM type (quotes, smart invoices, smart processes 128+ and 1030+):
    # the rules name only the four main ones, but every binding counts in the guards and is kept.
    entity_type: Annotated[EntityType | int, Field(union_mode="left_to_right")]
    entity_id: int

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        # Job records and audit entries written before bindings were values hold them as text, and
        # records live for days: read that too.
        return _fields_of(value) if isinstance(value, str) else value

    @classmethod
    def parse(cls, text: str) -> Binding:
        """The one reader of a binding's text, `contact 42` or `type128 7` (as `str` writes it)."""
        return cls.model_validate(_fields_of(text))

    @classmethod
    def read(cls, value: Any) -> Binding:
        """A binding as JSON keeps it (see `as_json`), or as text (records written before it was a value)."""
        return value if isinstance(value, Binding) else cls.model_validate(value)

    def as_json(self) -> dict[str, int]:
        """The shape job records, the audit log and the API keep a binding in: `{"entity_type": 3, "entity_id": 42}`
        (the type as crm.enum.ownertype numbers it, as the portal's binding methods take it)."""
        return {"entity_type": int(self.entity_type), "entity_id": self.entity_id}

    def __str__(self) -> str:
        return f"{entity_label(self.entity_type)} {self.entity_id}"


def _fields_of(text: str) -> dict[str, Any]:
    label, _, number = text.strip().partition(" ")
    try:
        return {"entity_type": entity_type_of(label), "entity_id": int(number)}
    except (KeyError, ValueError):
        raise ValueError(f"{text!r} is not a binding: write a type and an id, such as `contact 42` "
                         "(lead, deal, contact, company, or typeN for another CRM type)") from None


def read_bindings(values: Iterable[Any]) -> list[Binding]:
    return [Binding.read(value) for value in values]


def bindings_json(bindings: Iterable[Binding]) -> list[dict[str, int]]:
    return [b.as_json() for b in bindings]


def bindings_text(bindings: Iterable[Any]) -> str:
    """Bindings for people, `lead 7, contact 42`: from values, their JSON or old text alike."""
    return ", ".join(str(Binding.read(b)) for b in bindings)
