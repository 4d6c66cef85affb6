"""The rules engine is pure: facts in, plan out. Scenarios first, then properties for any facts."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from app.rules.engine import MAX_BINDINGS, plan
from app.rules.facts import Activity, Binding, Facts, Lead
from app.rules.loader import parse_rules
from app.rules.model import EntityType, RuleSet
from app.rules.plan import BindingPlan

FOLLOW_CLIENT_TEXT = """
rules:
  - name: follow-client
    on: [ONCRMACTIVITYADD, ONCRMLEADUPDATE]
    when: {bound_to: lead, lead_status: converted}
    do:
      - bind: [lead.contact, lead.company]
      - unbind: lead
"""
FOLLOW_CLIENT = parse_rules(FOLLOW_CLIENT_TEXT, "rules.yaml", {})

LEAD, CONTACT, COMPANY, DEAL = EntityType.LEAD, EntityType.CONTACT, EntityType.COMPANY, EntityType.DEAL


def b(entity_type: EntityType, entity_id: int) -> Binding:
    return Binding(entity_type=entity_type, entity_id=entity_id)


def converted(lead_id: int = 1, contacts: tuple[int, ...] = (10,), companies: tuple[int, ...] = (20,)) -> Lead:
    return Lead(id=lead_id, status_id="CONVERTED", status_semantic="S", contact_ids=contacts, company_ids=companies)


def facts(*activities: Activity, leads: tuple[Lead, ...] = (converted(),), event: str = "ONCRMACTIVITYADD") -> Facts:
    return Facts(portal="acme", event=event, activities=activities, leads={lead.id: lead for lead in leads})


def test_a_converted_leads_activity_moves_to_its_contact_and_company() -> None:
    result = plan(FOLLOW_CLIENT, facts(Activity(id=5, bindings=(b(LEAD, 1),))))

    (activity,) = result.activities
    assert activity.after == (b(CONTACT, 10), b(COMPANY, 20))
    assert activity.add == [b(CONTACT, 10), b(COMPANY, 20)]
    assert activity.remove == [b(LEAD, 1)]
    assert result.matched_rules == ("follow-client",)


def test_a_lead_in_progress_changes_nothing() -> None:
    lead = Lead(id=1, status_id="IN_PROCESS", status_semantic="P")

    result = plan(FOLLOW_CLIENT, facts(Activity(id=5, bindings=(b(LEAD, 1),)), leads=(lead,)))

    assert result.empty
    assert result.matched_rules == ()


def test_a_conversion_into_a_deal_only_keeps_the_lead_rather_than_leave_nothing() -> None:
    lead = converted(contacts=(), companies=())

    result = plan(FOLLOW_CLIENT, facts(Activity(id=5, bindings=(b(LEAD, 1),)), leads=(lead,)))

    assert result.empty
    assert "lead.contact, lead.company are empty (the lead's conversion made no contact or company)" in \
        result.activities[0].notes[0]
    assert "last binding" in result.activities[0].notes[1]


def test_an_activity_that_would_pass_100_bindings_is_reported_not_changed() -> None:
    crowded = (b(LEAD, 1), *(b(DEAL, i) for i in range(1, 100)))

    result = plan(FOLLOW_CLIENT, facts(Activity(id=5, bindings=crowded)))

    assert result.empty
    assert "over the limit of 100" in result.activities[0].notes[0]


def test_other_events_do_not_trigger_the_rule() -> None:
    result = plan(FOLLOW_CLIENT, facts(Activity(id=5, bindings=(b(LEAD, 1),)), event="ONCRMDEALADD"))

    assert result.empty


def test_a_paused_rule_matches_nothing_and_says_why() -> None:
    from app.rules.engine import explain
    paused = parse_rules(FOLLOW_CLIENT_TEXT.replace("    do:", "    enabled: false\n    do:"), "rules.yaml", {})
    activity = Activity(id=5, bindings=(b(LEAD, 1),))

    assert plan(paused, facts(activity)).empty
    assert explain(paused, facts(activity))[0].reason == "the rule is paused (enabled: false)"


def test_dry_run_mode_marks_the_plan_and_keeps_it() -> None:
    dry = FOLLOW_CLIENT.model_copy(update={"mode": "dry_run"})

    (activity,) = plan(dry, facts(Activity(id=5, bindings=(b(LEAD, 1),)))).activities

    assert activity.dry_run and activity.changes


def test_a_fixed_target_and_stop() -> None:
    rules = parse_rules("""
rules:
  - name: vip
    on: [ONCRMACTIVITYADD]
    do: [{bind: [{type: company, id: 42}]}]
    stop: true
  - name: never-reached
    on: [ONCRMACTIVITYADD]
    do: [{bind: [{type: company, id: 43}]}]
""", "rules.yaml", {})

    result = plan(rules, facts(Activity(id=5, bindings=(b(DEAL, 3),))))

    assert result.activities[0].after == (b(DEAL, 3), b(COMPANY, 42))
    assert result.matched_rules == ("vip",)


# Properties: for any bindings and any conversion, the plan is safe and applying it settles.
entity_ids = st.integers(min_value=1, max_value=6)
bindings = st.builds(b, st.sampled_from([LEAD, DEAL, CONTACT, COMPANY]), entity_ids)
leads = st.builds(Lead, id=entity_ids, status_id=st.sampled_from(["CONVERTED", "NEW", "JUNK"]),
                  status_semantic=st.sampled_from(["S", "P", "F", ""]),
                  contact_ids=st.lists(entity_ids, max_size=3, unique=True).map(tuple),
                  company_ids=st.lists(entity_ids, max_size=2, unique=True).map(tuple),
                  deal_ids=st.lists(entity_ids, max_size=2, unique=True).map(tuple))
activities = st.builds(Activity, id=st.integers(1, 1000),
                       bindings=st.lists(bindings, min_size=1, max_size=8, unique=True).map(tuple))
targets = st.lists(st.sampled_from(["lead.contact", "lead.company", "lead.deal"]), min_size=1, unique=True)


@st.composite
def rule_sets(draw: st.DrawFn) -> RuleSet:
    bind = draw(targets)
    bound_types = {t.split(".")[1] for t in bind}
    unbind = draw(st.lists(st.sampled_from([t for t in ("lead", "deal", "contact", "company")
                                            if t not in bound_types]), unique=True))
    when = draw(st.sampled_from(["{bound_to: lead, lead_status: converted}", "{bound_to: lead}", "{}"]))
    steps = f"[{{bind: [{', '.join(bind)}]}}" + (f", {{unbind: [{', '.join(unbind)}]}}]" if unbind else "]")
    return parse_rules(f"rules:\n  - name: r\n    on: [ONCRMACTIVITYADD]\n    when: {when}\n    do: {steps}\n",
                       "rules.yaml", {})


def applied(result: BindingPlan, before: Facts) -> Facts:
    after = {a.activity_id: a.after for a in result.activities}
    return before.model_copy(update={"activities": tuple(
        a.model_copy(update={"bindings": after[a.id]}) for a in before.activities)})


@settings(max_examples=300, deadline=None)
@given(rules=rule_sets(), activity=activities, lead_list=st.lists(leads, max_size=3, unique_by=lambda lead: lead.id))
def test_any_plan_is_safe_and_applying_it_settles(rules: RuleSet, activity: Activity, lead_list: list[Lead]) -> None:
    before = facts(activity, leads=tuple(lead_list))

    result = plan(rules, before)

    for planned in result.activities:
        assert planned.after, "never leaves an activity without bindings"
        assert len(planned.after) <= max(MAX_BINDINGS, len(planned.before)), "never past 100"
        assert len(set(planned.after)) == len(planned.after), "no duplicate binding"
    again = plan(rules, applied(result, before))
    assert again.empty, "planning after applying the plan changes nothing more"


@settings(max_examples=100, deadline=None)
@given(count=st.integers(min_value=90, max_value=110))
def test_never_past_100_bindings(count: int) -> None:
    lead = converted(contacts=tuple(range(1, count)), companies=())
    (planned,) = plan(FOLLOW_CLIENT, facts(Activity(id=1, bindings=(b(LEAD, 1),)), leads=(lead,))).activities

    assert len(planned.after) <= MAX_BINDINGS
