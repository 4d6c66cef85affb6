"""What the worker learned from the portal, in the shape the rules engine reads."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.rules.model import EntityType, entity_label, entity_type_of


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class Binding(Frozen):
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


class Activity(Frozen):
    id: int
    bindings: tuple[Binding, ...]
    subject: str = ""
    type_id: str = ""
    provider_id: str = ""
    direction: str = ""  # "1" incoming, "2" outgoing
    responsible_id: int = 0
    emails: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()
    # False when `bindings` were assumed (a lead's sample said "lead only"), not read: the executor then
    # reads them before adding, since a save past 100 bindings drops one without a word.
    bindings_read: bool = True

    def bound_to(self, entity_type: EntityType) -> list[int]:
        return [b.entity_id for b in self.bindings if b.entity_type == entity_type]


class Lead(Frozen):
    """A lead and what its conversion made (contacts, companies and deals whose LEAD_ID is this lead)."""

    id: int
    status_id: str = ""
    status_semantic: str = ""
    contact_ids: tuple[int, ...] = ()
    company_ids: tuple[int, ...] = ()
    deal_ids: tuple[int, ...] = ()
    modified: str = ""  # its DATE_MODIFY as read: which version of the lead the facts are

    @property
    def converted(self) -> bool:
        return self.status_semantic == "S" or self.status_id == "CONVERTED"

    def has_status(self, status: str) -> bool:
        return self.converted if status.lower() == "converted" else self.status_id == status


class Client(Frozen):
    """A contact or deal bound to an activity, with the client records it points at."""

    id: int
    contact_ids: tuple[int, ...] = ()
    company_ids: tuple[int, ...] = ()


class Comment(Frozen):
    """A timeline comment on a lead, with its bindings."""

    id: int
    bindings: tuple[Binding, ...]


class Facts(Frozen):
    """Everything one job's plan may depend on."""

    portal: str
    event: str
    activities: tuple[Activity, ...] = ()
    leads: dict[int, Lead] = {}
    contacts: dict[int, Client] = {}
    deals: dict[int, Client] = {}
    matches: dict[int, Client] = {}  # by activity id: existing clients with the activity's e-mail or phone
    comments: tuple[Comment, ...] = ()
    # Records found deleted since they were read: never a target (a binding to them would dangle).
    missing: frozenset[Binding] = frozenset()
