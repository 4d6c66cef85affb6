"""What the worker learned from the portal, in the shape the rules engine reads."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from app.crm import Binding as Binding
from app.crm import EntityType
from app.crm import bindings_json as bindings_json
from app.crm import bindings_text as bindings_text
from app.crm import read_bindings as read_bindings


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


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
