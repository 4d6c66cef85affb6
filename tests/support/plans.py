"""Plans written by hand, for the executor's and the batcher's tests."""
from __future__ import annotations

from app.rules.facts import Binding
from app.rules.model import EntityType
from app.rules.plan import ActivityPlan


def rebind(activity: int, lead: int, contact: int, company: int | None = None) -> ActivityPlan:
    """Move an activity from its lead to a contact (and a company)."""
    after = (Binding(entity_type=EntityType.CONTACT, entity_id=contact),
             *([Binding(entity_type=EntityType.COMPANY, entity_id=company)] if company else []))
    return ActivityPlan(activity_id=activity, before=(Binding(entity_type=EntityType.LEAD, entity_id=lead),),
                        after=after)
