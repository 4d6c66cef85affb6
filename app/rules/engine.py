"""The rules engine: facts in, BindingPlan out. Pure: no I/O, no clock, no randomness."""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

from app.rules.facts import Activity, Binding, Client, Comment, Facts, Lead
from app.rules.model import (
    KINDS,
    EntityType,
    FixedTarget,
    Rule,
    RuleSet,
    Target,
    When,
    entity_label,
    target_type,
)
from app.rules.plan import ActivityPlan, BindingPlan, CommentPlan

MAX_BINDINGS = 100  # per activity (crm.activity.binding overview)


@dataclass(frozen=True)
class Verdict:
    """Whether a rule applies to an activity, and why not when it does not."""

    activity_id: int
    rule: str
    matched: bool
    reason: str


def plan(rules: RuleSet, facts: Facts) -> BindingPlan:
    activities = tuple(_plan_activity(rules, facts, activity) for activity in facts.activities)
    comments = tuple(_plan_comment(rules, facts, comment) for comment in facts.comments)
    matched = tuple(dict.fromkeys(name for item in (*activities, *comments) for name in item.rules))
    return BindingPlan(activities=activities, comments=comments, matched_rules=matched)


def explain(rules: RuleSet, facts: Facts) -> list[Verdict]:
    """For each activity, each rule: matched, or the first condition that failed."""
    verdicts = []
    for activity in facts.activities:
        for rule in rules.rules:
            reason = _why_not(rule, facts, activity)
            verdicts.append(Verdict(activity.id, rule.name, reason is None, reason or "all conditions hold"))
    return verdicts


def _plan_activity(rules: RuleSet, facts: Facts, activity: Activity) -> ActivityPlan:
    wanted = list(activity.bindings)
    moves: list[tuple[Binding, Binding]] = []
    matched: list[str] = []
    notes: list[str] = []
    dry_run = rules.mode == "dry_run"
    for rule in rules.rules:
        if _why_not(rule, facts, activity) is not None:
            continue
        matched.append(rule.name)
        dry_run = dry_run or rule.mode == "dry_run"
        sources = _Sources(facts, activity, _leads_in_scope(rule.when, facts, activity))
        found = {str(t): sources.resolve(t) for t in rule.bind_targets()}
        _add(wanted, [b for bindings in found.values() for b in bindings])
        if found and not any(found.values()):
            notes.append(_nothing_to_bind(rule.name, list(found)))
        unbind = rule.unbind_types()
        wanted = [b for b in wanted if b.entity_type not in unbind or b not in activity.bindings]
        for move in rule.moves():
            _plan_move(move.from_, sources.resolve(move.to), activity, wanted, moves, notes)
        if rule.stop:
            break
    return ActivityPlan(activity_id=activity.id, **_safe(activity.bindings, wanted, moves, notes),
                        rules=tuple(matched), dry_run=dry_run, bindings_read=activity.bindings_read)


def _plan_move(source_type: str, targets: list[Binding], activity: Activity, wanted: list[Binding],
               moves: list[tuple[Binding, Binding]], notes: list[str]) -> None:
    sources = [b for b in wanted if entity_label(b.entity_type) == source_type and b in activity.bindings]
    targets = [t for t in targets if t not in wanted]
    if len(sources) != 1 or len(targets) != 1:
        if sources and targets:
            notes.append(f"move skipped: {len(sources)} {source_type} bindings and {len(targets)} targets; "
                         "a move needs exactly one of each")
        return
    wanted[wanted.index(sources[0])] = targets[0]
    moves.append((sources[0], targets[0]))


def _plan_comment(rules: RuleSet, facts: Facts, comment: Comment) -> CommentPlan:
    wanted = list(comment.bindings)
    matched: list[str] = []
    dry_run = rules.mode == "dry_run"
    for rule in rules.rules:
        if not rule.enabled or not rule.comments_follow() or facts.event not in rule.on:
            continue
        leads = [facts.leads[b.entity_id] for b in comment.bindings
                 if b.entity_type == EntityType.LEAD and b.entity_id in facts.leads]
        if rule.when.lead_status is not None:
            leads = [lead for lead in leads if any(lead.has_status(s) for s in rule.when.lead_status)]
        if not leads:
            continue
        matched.append(rule.name)
        dry_run = dry_run or rule.mode == "dry_run"
        sources = _Sources(facts, None, leads)
        _add(wanted, [b for t in rule.bind_targets() if _lead_based(t) for b in sources.resolve(t)])
        unbind = rule.unbind_types()
        wanted = [b for b in wanted if b.entity_type not in unbind or b not in comment.bindings]
    return CommentPlan(comment_id=comment.id, **_safe(comment.bindings, wanted, [], []),
                       rules=tuple(matched), dry_run=dry_run)


# Why a target can come out empty, by where it is looked up.
_EMPTY_BECAUSE = {"matched": "no client has the activity's e-mail or phone", "contact": "the contact has no company",
                  "deal": "the deal names no such client"}


def _nothing_to_bind(rule: str, targets: list[str]) -> str:
    made = [t.split(".")[1] for t in targets if t.startswith("lead.")]
    reasons = ([f"the lead's conversion made no {' or '.join(made)}"] if made else []) + \
        list(dict.fromkeys(_EMPTY_BECAUSE[t.split(".")[0]] for t in targets if t.split(".")[0] in _EMPTY_BECAUSE))
    return (f"rule {rule!r} has nothing to bind: {', '.join(targets)} {'is' if len(targets) == 1 else 'are'} empty"
            + (f" ({'; '.join(reasons)})" if reasons else ""))


def _why_not(rule: Rule, facts: Facts, activity: Activity) -> str | None:
    if not rule.enabled:
        return "the rule is paused (enabled: false)"
    if facts.event not in rule.on:
        return f"it listens to {', '.join(rule.on)}, not {facts.event}"
    return _condition_fails(rule.when, facts, activity)


def _condition_fails(when: When, facts: Facts, activity: Activity) -> str | None:
    """The first condition of `when` that does not hold, in words; None when all hold."""
    # The words are made only for a condition that fails: most hold, for every rule and activity.
    if when.portal is not None and facts.portal not in when.portal:
        return f"the portal is {facts.portal}"
    if when.bound_to is not None and not activity.bound_to(EntityType[str(when.bound_to).upper()]):
        return f"the activity is not bound to a {when.bound_to}"
    if when.kind is not None and not any(_is_kind(activity, k) for k in when.kind):
        return f"the activity is a {_kind_of(activity)}, not {', '.join(when.kind)}"
    if when.direction is not None and _direction(activity) != when.direction:
        return f"the activity is {_direction(activity) or 'without direction'}, not {when.direction}"
    if when.responsible is not None and activity.responsible_id not in when.responsible:
        return f"the responsible user is {activity.responsible_id}"
    if when.subject_contains is not None and str(when.subject_contains).lower() not in activity.subject.lower():
        return f"the subject does not contain {when.subject_contains!r}"
    if when.subject_matches is not None and re.search(str(when.subject_matches), activity.subject) is None:
        return f"the subject does not match {when.subject_matches!r}"
    if when.lead_status is not None and not _leads_in_scope(when, facts, activity):
        return f"its lead's status is {_lead_statuses(facts, activity)}, not {', '.join(when.lead_status)}"
    if when.any is not None:
        reasons = [_condition_fails(option, facts, activity) for option in when.any]
        if all(reasons):
            return "none of 'any' holds: " + "; ".join(r for r in reasons if r)
    if when.not_ is not None and _condition_fails(when.not_, facts, activity) is None:
        return "its 'not' condition holds"
    return None


def _leads_in_scope(when: When, facts: Facts, activity: Activity) -> list[Lead]:
    leads = [facts.leads[i] for i in activity.bound_to(EntityType.LEAD) if i in facts.leads]
    if when.lead_status is not None:
        leads = [lead for lead in leads if any(lead.has_status(s) for s in when.lead_status)]
    return leads


def _lead_statuses(facts: Facts, activity: Activity) -> str:
    leads = [facts.leads[i] for i in activity.bound_to(EntityType.LEAD) if i in facts.leads]
    return ", ".join(lead.status_id or "unknown" for lead in leads) or "unknown (no lead)"


def _is_kind(activity: Activity, kind: str) -> bool:
    if kind.lower() in KINDS:
        type_id, provider = KINDS[kind.lower()]
        return activity.type_id == type_id and (provider is None or activity.provider_id.upper() == provider)
    return activity.provider_id.upper() == kind.upper()


def _kind_of(activity: Activity) -> str:
    names = [name for name in KINDS if _is_kind(activity, name)]
    return names[0] if names else activity.provider_id or f"type {activity.type_id}"


def _direction(activity: Activity) -> str:
    return {"1": "incoming", "2": "outgoing"}.get(activity.direction, "")


class _Sources:
    """Resolves targets (`lead.contact`, `deal.company`, `matched.contact`...) against the facts."""

    def __init__(self, facts: Facts, activity: Activity | None, leads: list[Lead]) -> None:
        self.facts, self.activity, self.leads = facts, activity, leads

    def resolve(self, target: Target) -> list[Binding]:
        entity = target_type(target)
        if isinstance(target, FixedTarget):
            found = [Binding(entity_type=entity, entity_id=target.id)]
        else:
            source, _ = target.split(".")
            ids = [i for client in self._clients(source) for i in _ids_of(client, entity)]
            found = [Binding(entity_type=entity, entity_id=i) for i in dict.fromkeys(ids)]
        return [b for b in found if b not in self.facts.missing]

    def _clients(self, source: str) -> Sequence[Lead | Client]:
        if source == "lead":
            return self.leads
        if self.activity is None:
            return []
        if source == "matched":
            match = self.facts.matches.get(self.activity.id)
            return [match] if match else []
        table = self.facts.contacts if source == "contact" else self.facts.deals
        kind = EntityType.CONTACT if source == "contact" else EntityType.DEAL
        return [table[i] for i in self.activity.bound_to(kind) if i in table]


def _ids_of(client: object, entity: EntityType) -> tuple[int, ...]:
    field = {EntityType.CONTACT: "contact_ids", EntityType.COMPANY: "company_ids", EntityType.DEAL: "deal_ids"}
    return tuple(getattr(client, field.get(entity, ""), ()) or ())


def _lead_based(target: Target) -> bool:
    return isinstance(target, FixedTarget) or target.startswith("lead.")


def _add(wanted: list[Binding], new: list[Binding]) -> None:
    wanted.extend(b for b in dict.fromkeys(new) if b not in wanted)


class _Change(TypedDict):
    before: tuple[Binding, ...]
    after: tuple[Binding, ...]
    moves: tuple[tuple[Binding, Binding], ...]
    notes: tuple[str, ...]


def _safe(before: tuple[Binding, ...], wanted: list[Binding], moves: list[tuple[Binding, Binding]],
          notes: list[str]) -> _Change:
    """Refuse what the portal forbids: nothing without bindings, nothing over 100."""
    if not wanted:
        notes = [*notes, "kept as is: the rules would remove its last binding and bind nothing in its place"]
        wanted, moves = list(before), []
    if len(wanted) > MAX_BINDINGS:
        notes = [*notes, f"kept as is: the rules would give it {len(wanted)} bindings, over the limit of "
                         f"{MAX_BINDINGS}"]
        wanted, moves = list(before), []
    return _Change(before=before, after=tuple(wanted), moves=tuple(moves), notes=tuple(notes))
