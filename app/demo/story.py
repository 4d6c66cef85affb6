"""The demo's story: the real sequence played on the demo portal, scene by scene. A conversion in the
portal copies the lead's activities to the new company and contact and keeps the lead binding; b24rebind
then removes the lead binding, brings a late e-mail to the client, and gives a repeat lead's history to
the known client."""
from __future__ import annotations

from app.demo.stage import Stage
from app.fakeportal import LEAD
from app.store.jobs import JobRecord

KINDS = [("Re: price list", 4, "CRM_EMAIL"), ("Call about delivery", 2, "VOXIMPLANT_CALL"),
         ("Send the contract", 6, "CRM_TODO")]


async def play(stage: Stage) -> None:
    """The real sequence, scene by scene, each with what the portal did and what b24rebind added."""
    lead = await conversion(stage, activities=3, late=1)
    await repeat_lead(stage, lead)
    stage.say("\nWhat the portal did by itself: it copied the lead's activities to the company and contact it "
              "made,\nand left them bound to the lead. What b24rebind added: it removed the lead binding, "
              "brought the late\ne-mail to the client, and gave the repeat lead's history to the client the "
              "portal already knew.")
    stage.played.set()


async def conversion(stage: Stage, activities: int = 3, late: int = 0, name: str = "Anna Petrova") -> int:
    """A lead with history, converted in the portal (it copies), then the late e-mails."""
    fake = stage.fake
    lead = fake.add_lead(title=f"{name}, 20 chairs", name=name, email=f"{name.split()[0].lower()}@example.com")
    made_activities = {}
    for i in range(activities):
        subject, type_id, provider = KINDS[i % len(KINDS)]
        subject += f" #{i + 1}" if i >= len(KINDS) else ""
        made_activities[fake.add_activity([(LEAD, lead)], subject=subject, type_id=type_id,
                                          provider_id=provider)] = subject
    since = len(fake.events)
    made = fake.convert_lead(lead, contact=True, company=True)
    stage.say(f"\n1. Lead {lead} ({name}) is converted in the portal into contact {made['contact']} and company "
              f"{made['company']}.\n   The portal copies its {activities} activities there and keeps the lead "
              "binding:")
    stage.show(made_activities)
    records = await stage.send_events(since)
    stage.say(what_b24rebind_did(records, "removes the lead binding (the only writes it needs)"))
    stage.show(made_activities)
    if late:
        since = len(fake.events)
        late_ones = {fake.add_activity([(LEAD, lead)], subject=f"Re: delivery date #{i + 1}",
                                       email=f"{name.split()[0].lower()}@example.com"): f"late e-mail #{i + 1}"
                     for i in range(late)}
        stage.say(f"\n2. {late} e-mail{'s arrive' if late > 1 else ' arrives'} after the conversion, bound to the "
                  "converted lead only:")
        stage.show(late_ones)
        records = await stage.send_events(since)
        stage.say(what_b24rebind_did(records, "brings them to the client"))
        stage.show(late_ones)
    return lead


def what_b24rebind_did(records: list[JobRecord | None], does: str) -> str:
    """The story's line for what the jobs did; in a dry run (`mode: dry_run` in the playground's rules)
    they wrote nothing, and the bindings shown after it are the portal's own."""
    if any(record is not None and (record.dry_run or any(item.get("dry_run") for item in record.plan))
           for record in records):
        verb, rest = does.split(" ", 1)
        return f"   b24rebind would {verb[:-1]} {rest} (a dry run: nothing written; `b24rebind jobs show` says what):"
    return f"   b24rebind {does}:"


async def repeat_lead(stage: Stage, first_lead: int) -> None:
    """A known client writes again: the portal makes a repeat lead, and its conversion makes only a deal."""
    fake = stage.fake
    first = fake.leads[first_lead]
    contact, company = int(first["CONTACT_ID"]), int(first["COMPANY_ID"])
    lead = fake.add_lead(title=f"{first.get('NAME') or 'Client'}: 10 more chairs", contact_id=contact,
                         company_id=company)
    activity = fake.add_activity([(LEAD, lead)], subject="New order")
    since = len(fake.events)
    made = fake.convert_lead(lead)
    stage.say(f"\n3. The same client writes again: repeat lead {lead}. Its conversion makes only deal {made['deal']},"
              f"\n   and the portal attaches the activity to the deal alone; contact {contact} and company "
              f"{company} get nothing:")
    stage.show({activity: "New order"})
    records = await stage.send_events(since)
    stage.say(what_b24rebind_did(records, "gives it to the client the portal already knew"))
    stage.show({activity: "New order"})
