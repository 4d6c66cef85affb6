"""The rules engine: facts in, BindingPlan out. Pure: no I/O, no clock, no randomness."""
from __future__ import annotations

from app.rules.facts import Activity, Binding, Facts, Lead
from app.rules.model import EntityType, FixedTarget, Rule, RuleSet, Target, When
from app.rules.plan import ActivityPlan, BindingPlan

MAX_BINDINGS = 100  # per activity (crm.activity.binding overview)


def plan(rules: RuleSet, facts: Facts) -> BindingPlan:
    activities = tuple(_plan_activity(rules, facts, activity) for activity in facts.activities)
    matched = tuple(dict.fromkeys(name for a in activities for name in a.rules))
    return BindingPlan(activities=activities, matched_rules=matched)


def _plan_activity(rules: RuleSet, facts: Facts, activity: Activity) -> ActivityPlan:
    wanted = list(activity.bindings)
    matched: list[str] = []
    dry_run = rules.mode == "dry_run"
    for rule in rules.rules:
        leads = _matching_leads(rule, facts, activity)
        if leads is None:
            continue
        matched.append(rule.name)
        dry_run = dry_run or rule.mode == "dry_run"
        for target in rule.bind_targets():
            for binding in _resolve(target, leads):
                if binding not in wanted:
                    wanted.append(binding)
        unbind = set(rule.unbind_types())
        wanted = [b for b in wanted if b.entity_type not in unbind or b not in activity.bindings]
        if rule.stop:
            break
    return _safe(activity, wanted, tuple(matched), dry_run)


def _matching_leads(rule: Rule, facts: Facts, activity: Activity) -> list[Lead] | None:
    """The leads a rule applies through, or None when the rule does not apply to this activity."""
    if facts.event not in rule.on:
        return None
    leads = [facts.leads[i] for i in activity.bound_to(EntityType.LEAD) if i in facts.leads]
    if not _holds(rule.when, activity):
        return None
    if rule.when.lead_status is not None:
        leads = [lead for lead in leads if _lead_status_is(lead, rule.when.lead_status)]
        if not leads:
            return None
    return leads


def _holds(when: When, activity: Activity) -> bool:
    if when.bound_to is not None and not activity.bound_to(EntityType[when.bound_to.upper()]):
        return False
    return True


def _lead_status_is(lead: Lead, status: str) -> bool:
    return lead.converted if status.lower() == "converted" else lead.status_id == status


def _resolve(target: Target, leads: list[Lead]) -> list[Binding]:
    if isinstance(target, FixedTarget):
        return [Binding(entity_type=EntityType[target.type.upper()], entity_id=target.id)]
    source, kind = target.split(".")
    ids_of = {"contact": "contact_ids", "company": "company_ids", "deal": "deal_ids"}[kind]
    entity = EntityType[kind.upper()]
    return [Binding(entity_type=entity, entity_id=i) for lead in leads for i in getattr(lead, ids_of)]


def _safe(activity: Activity, wanted: list[Binding], matched: tuple[str, ...], dry_run: bool) -> ActivityPlan:
    """Refuse what the portal forbids: no activity without bindings, none over 100."""
    notes: list[str] = []
    if not wanted:
        notes.append("kept as is: the rules would remove its last binding and bind nothing in its place")
        wanted = list(activity.bindings)
    if len(wanted) > MAX_BINDINGS:
        notes.append(f"kept as is: the rules would give it {len(wanted)} bindings, over the limit of "
                     f"{MAX_BINDINGS}")
        wanted = list(activity.bindings)
    return ActivityPlan(activity_id=activity.id, before=activity.bindings, after=tuple(wanted),
                        rules=matched, dry_run=dry_run, notes=tuple(notes))
