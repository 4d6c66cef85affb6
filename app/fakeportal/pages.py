"""The fake portal's record pages, at the paths a real portal uses (``/crm/lead/details/42/``), so that
the dashboard's links to the demo portal open something real: the record, what it was made from or
became, and its timeline (the activities and comments bound to it, with their bindings).

Plain HTML, read-only, with every value escaped; the demo's records are the only thing shown.
"""
from __future__ import annotations

from html import escape
from typing import Any

from aiohttp import web

from app.fakeportal.records import COMPANY, CONTACT, DEAL, LEAD, TYPE_NAMES, Binding, type_label
from app.fakeportal.state import CrmState

TYPES = {name: type_id for type_id, name in TYPE_NAMES.items()}
ACTIVITY_KINDS = {"1": "meeting", "2": "call", "3": "task", "4": "e-mail", "6": "to-do"}
SHOWN_FIELDS = ("TITLE", "NAME", "STATUS_ID", "STAGE_ID", "IS_RETURN_CUSTOMER", "DATE_CREATE", "DATE_MODIFY")
LINKED_FIELDS = {"LEAD_ID": LEAD, "CONTACT_ID": CONTACT, "COMPANY_ID": COMPANY}
STYLE = """body{font-family:system-ui,sans-serif;margin:0;color:#202124;background:#f8f9fa}
header{background:#fff;border-bottom:1px solid #dadce0;padding:.8em 1.2em}header p{margin:.2em 0 0;color:#5f6368}
main{padding:0 1.2em 2em;max-width:60em}h1{font-size:1.3em;margin:0}h2{font-size:1.1em;margin:1.4em 0 .5em}
table{border-collapse:collapse;background:#fff;width:100%}th,td{text-align:left;padding:.35em .6em;
border-bottom:1px solid #dadce0;vertical-align:top}th{color:#5f6368;font-weight:500}
.empty{color:#5f6368}a{color:#1a73e8}"""


def add_record_pages(router: web.UrlDispatcher, state: CrmState) -> None:
    """Serve `state`'s records at the real portal's paths; an activity at /crm/activity/details/<id>/."""
    async def record(request: web.Request) -> web.Response:
        kind, raw_id = request.match_info["kind"], request.match_info["id"]
        record_id = int(raw_id) if raw_id.isdigit() else 0
        if kind == "activity" and record_id in state.activities:
            return _page(*activity_page(state, record_id))
        if kind in TYPES and record_id in state.table(TYPES[kind]):
            return _page(*record_page(state, TYPES[kind], record_id))
        return _page(f"No {kind} {raw_id[:20]}",
                     "<p class=empty>The demo portal has no such record (it keeps its records in memory: "
                     "a restarted demo starts empty).</p>", status=404)

    router.add_get(r"/crm/{kind:lead|contact|company|deal|activity}/details/{id}/", record)
    router.add_get(r"/crm/{kind:lead|contact|company|deal|activity}/details/{id}", record)


def record_page(state: CrmState, type_id: int, record_id: int) -> tuple[str, str]:
    """A lead, contact, company or deal: its fields, the records made from it, and its timeline."""
    row = state.table(type_id)[record_id]
    name = type_label(type_id)
    title = f"{name.capitalize()} {record_id}: {row.get('TITLE') or row.get('NAME') or ''}"
    facts = [(key, escape(_text(row[key]))) for key in SHOWN_FIELDS if row.get(key)]
    facts += [(key, _link((linked, int(row[key])))) for key, linked in LINKED_FIELDS.items()
              if row.get(key) and str(row[key]).isdigit() and int(row[key]) and linked != type_id]
    facts += [(key, escape(", ".join(item["VALUE"] for item in row[key])))
              for key in ("EMAIL", "PHONE") if isinstance(row.get(key), list) and row[key]]
    body = _facts(facts)
    if type_id == LEAD:
        made = [(t, i) for t in (CONTACT, COMPANY, DEAL) for i, r in state.table(t).items()
                if str(r.get("LEAD_ID") or "") == str(record_id)]
        body += "<h2>Made from this lead</h2>" + (
            "<p>" + ", ".join(_link(b) for b in made) + "</p>" if made else "<p class=empty>Nothing yet.</p>")
    body += "<h2>Timeline</h2>" + _timeline(state, (type_id, record_id))
    moved = sorted(i for i, steps in state.binding_history.items()
                   if any((type_id, record_id) in step for step in steps)
                   and (type_id, record_id) not in state.activity_bindings.get(i, set()))
    if moved:  # what b24rebind (or a person) took off this record: where each is now
        body += "<h2>Bound here before, moved since</h2><ul>" + "".join(
            f"<li data-moved={i}>{_link(('activity', i))}: now {_links(state.bindings(i))}</li>"
            for i in moved if i in state.activities) + "</ul>"
    return title, body


def activity_page(state: CrmState, activity_id: int) -> tuple[str, str]:
    """An activity: what it is, its owner, its bindings now and every set of bindings it had."""
    row = state.activities[activity_id]
    title = f"Activity {activity_id}: {row.get('SUBJECT', '')}"
    facts = [("Kind", escape(ACTIVITY_KINDS.get(str(row.get("TYPE_ID")), str(row.get("TYPE_ID"))))),
             ("Completed", "yes" if row.get("COMPLETED") == "Y" else "no"),
             ("Created", escape(str(row.get("CREATED", "")))),
             ("Owner", _link((int(row["OWNER_TYPE_ID"]), int(row["OWNER_ID"]))) if row.get("OWNER_ID") else "none"),
             ("Bound to", _links(state.bindings(activity_id)))]
    history = state.binding_history.get(activity_id, [])
    steps = "".join(f"<li>{_links(list(step))}</li>" for step in history)
    return title, _facts(facts) + f"<h2>Its bindings, oldest first</h2><ol>{steps}</ol>"


def _timeline(state: CrmState, binding: Binding) -> str:
    name = TYPE_NAMES[binding[0]]
    activities = sorted((i for i, bound in state.activity_bindings.items() if binding in bound), reverse=True)
    comments = sorted((i for i, bound in state.comment_binding_sets.items() if (name, binding[1]) in bound),
                      reverse=True)
    if not activities and not comments:
        return "<p class=empty>Nothing is bound to this record.</p>"
    rows = []
    for activity_id in activities:
        row = state.activities[activity_id]
        kind = ACTIVITY_KINDS.get(str(row.get("TYPE_ID")), "activity")
        rows.append(f"<tr data-activity={activity_id}><td>{escape(str(row.get('CREATED', '')))}</td>"
                    f"<td>{_link(('activity', activity_id))} {escape(kind)}: {escape(str(row.get('SUBJECT', '')))}"
                    f"</td><td>{_links(state.bindings(activity_id))}</td></tr>")
    for comment_id in comments:
        comment = state.comments[comment_id]
        bound = ", ".join(_link((TYPES[t], i)) if t in TYPES else escape(f"{t} {i}")
                          for t, i in state.comment_bindings(comment_id))
        rows.append(f"<tr data-comment={comment_id}><td>{escape(str(comment.get('CREATED', '')))}</td>"
                    f"<td>comment {comment_id}: {escape(str(comment.get('COMMENT', '')))}</td><td>{bound}</td></tr>")
    return ("<table><thead><tr><th>When</th><th>What</th><th>Bound to</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _link(target: tuple[int | str, int]) -> str:
    kind, target_id = target
    name = kind if isinstance(kind, str) else TYPE_NAMES.get(kind)
    if name is None:
        return escape(f"{type_label(int(kind))} {target_id}")
    return f'<a href="/crm/{name}/details/{int(target_id)}/">{name} {int(target_id)}</a>'


def _links(bindings: list[Binding]) -> str:
    return ", ".join(_link(b) for b in bindings) or "nothing"


def _facts(facts: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in facts) + "</table>"


def _text(value: Any) -> str:
    return ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)


def _page(title: str, body: str, status: int = 200) -> web.Response:
    html = (f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport "
            f"content='width=device-width, initial-scale=1'><title>{escape(title)}</title><style>{STYLE}</style>"
            f"</head><body><header><h1>{escape(title)}</h1><p>The demo portal: a Bitrix24 portal of "
            f"b24rebind's own, in memory</p></header><main>{body}</main></body></html>")
    return web.Response(text=html, content_type="text/html", status=status)
