"""What can go wrong talking to a portal, and what to do about each kind.

    B24Error                 any failed call; carries the REST method, HTTP status, the portal's code and text
    ├── TransientError       try again later with backoff: 5xx, timeouts, QUERY_LIMIT_EXCEEDED, HTML pages
    │   ├── RateLimited      the portal's request limit was hit: slow down
    │   └── MethodBlocked    one method used its server-time budget: defer the job until it resets
    ├── PermanentError       the portal refused this call for good: give up on it and say why
    └── ConfigError          the service is set up wrong (webhook, scope, plan): a person has to fix it
        └── TokenExpired     an OAuth access token expired: refresh it once and retry

What each kind means for a job (retry later, wait, failed with a code) is the table in workers/outcomes.py.
Messages never hold the webhook URL (its path is the secret) or a request body.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class Policy(str, Enum):
    RETRY = "retry"
    GIVE_UP = "give_up"
    FIX_CONFIG = "fix_config"
    REFRESH = "refresh"  # OAuth: refresh the access token once, then retry
    DONE = "done"  # the portal already is in the state we wanted


@dataclass(frozen=True)
class ErrorPolicy:
    policy: Policy
    hint: str


_RETRY_LATER = "Temporary; the job retries by itself with backoff."

# One table for every code the official docs list (GitHub bitrix24/b24restdocs: error-codes.md,
# settings/performance/limits.md, and the binding methods' pages in api-reference/crm/timeline/).
# Codes are compared case-insensitively because portals and SDKs disagree on case.
POLICIES: dict[str, ErrorPolicy] = {
    "QUERY_LIMIT_EXCEEDED": ErrorPolicy(Policy.RETRY, "The portal's request limit was reached; retrying slower."),
    "OPERATION_TIME_LIMIT": ErrorPolicy(Policy.RETRY, "The method used its server-time budget; the job waits "
                                        "until it resets."),
    "INTERNAL_SERVER_ERROR": ErrorPolicy(Policy.RETRY, _RETRY_LATER),
    "ERROR_UNEXPECTED_ANSWER": ErrorPolicy(Policy.RETRY, _RETRY_LATER),
    "OVERLOAD_LIMIT": ErrorPolicy(Policy.RETRY, "The portal blocked REST for overload; if it lasts, contact Bitrix24 support."),
    "ACTIVITY_IS_ALREADY_BOUND": ErrorPolicy(Policy.DONE, "Already bound."),
    "BINDING_NOT_FOUND": ErrorPolicy(Policy.DONE, "Not bound any more."),
    "NO_AUTH_FOUND": ErrorPolicy(Policy.FIX_CONFIG, "The webhook URL is wrong or was deleted: create an inbound webhook "
                                 "with the crm scope and put its URL in rest_url."),
    "INVALID_CREDENTIALS": ErrorPolicy(Policy.FIX_CONFIG, "The webhook's user lacks permissions: use a webhook made "
                                       "by a user with full CRM rights."),
    "INSUFFICIENT_SCOPE": ErrorPolicy(Policy.FIX_CONFIG, "The webhook lacks the crm scope: tick 'CRM' in its settings."),
    "EXPIRED_TOKEN": ErrorPolicy(Policy.REFRESH, "The access token expired: in application mode it is refreshed and "
                                 "the call retried; a webhook with an expiry date must be renewed in rest_url."),
    "INVALID_TOKEN": ErrorPolicy(Policy.FIX_CONFIG, "The application token is invalid: reinstall the application."),
    "USER_ACCESS_ERROR": ErrorPolicy(Policy.FIX_CONFIG, "The webhook's user has no access to the application."),
    "AUTHORIZATION_ERROR": ErrorPolicy(Policy.FIX_CONFIG, "The webhook's user was fired or deactivated: "
                                       "create the webhook under an active user."),
    "PAYMENT_REQUIRED": ErrorPolicy(Policy.FIX_CONFIG, "The portal's plan must be paid for REST access."),
    "WRONG_AUTH_TYPE": ErrorPolicy(Policy.FIX_CONFIG, "This method needs the OAuth application mode, not a webhook."),
    "PORTAL_DELETED": ErrorPolicy(Policy.FIX_CONFIG, "The portal was deleted: remove it from the rules file."),
    "INVALID_REQUEST": ErrorPolicy(Policy.FIX_CONFIG, "The portal requires HTTPS: use an https:// rest_url."),
    "ERROR_METHOD_NOT_FOUND": ErrorPolicy(Policy.FIX_CONFIG, "The portal does not know this method: "
                                          "check its edition and the webhook's scopes."),
    "ACCESS_DENIED": ErrorPolicy(Policy.GIVE_UP, "The webhook's user may not change this record: give it CRM rights "
                                 "(REST also needs a commercial plan)."),
    "NOT_FOUND": ErrorPolicy(Policy.GIVE_UP, "The record no longer exists in the portal; nothing to do "
                             "(a job about it ends as skipped, with the reason)."),
    "OWNER_NOT_FOUND": ErrorPolicy(Policy.GIVE_UP, "The entity to bind to no longer exists in the portal."),
    "LAST_BINDING_CANNOT_BE_DELETED": ErrorPolicy(Policy.GIVE_UP, "An activity keeps at least one binding; "
                                                  "the service never removes the last one."),
    # What the portal does without a word (docs/errors.md, "What the portal does silently"): the
    # service's own codes for what it found when it checked.
    "WRITE_NOT_CONFIRMED": ErrorPolicy(Policy.GIVE_UP, "The portal answered the write without `true` and without "
                                       "an error (crm.timeline.bindings.* do so when the webhook's user may not "
                                       "change the record, or the save failed): nothing after it was sent. Give the "
                                       "user CRM rights on the record, then retry the job."),
    "BINDINGS_FULL": ErrorPolicy(Policy.GIVE_UP, "Left as found: the plan would take the activity past 100 bindings, "
                                 "and the portal would silently drop the one with the lowest owner id."),
    "BINDING_DROPPED": ErrorPolicy(Policy.GIVE_UP, "A binding went missing from a crowded activity while the job "
                                   "wrote to it (a save past 100 bindings drops one without a word): the job stopped "
                                   "before unbinding anything. Bind the missing record again by hand."),
    "LIST_NOT_FILTERED": ErrorPolicy(Policy.GIVE_UP, "A list answered rows its filter excludes (the portal drops a "
                                     "filter on a field it does not know and answers the whole table): nothing was "
                                     "written. A bug in b24rebind or a field the portal's version lacks: report it."),
    "ERROR_BATCH_LENGTH_EXCEEDED": ErrorPolicy(Policy.GIVE_UP, "A batch holds 50 commands at most (a bug: report it)."),
    "ERROR_BATCH_METHOD_NOT_ALLOWED": ErrorPolicy(Policy.GIVE_UP, "This method cannot run inside a batch (a bug)."),
    "100": ErrorPolicy(Policy.GIVE_UP, "A required parameter was missing (a bug: report it)."),
    "INVALID_ARG_VALUE": ErrorPolicy(Policy.GIVE_UP, "A parameter had a wrong value (a bug: report it)."),
}

# Some methods answer with an empty code; only the description tells the errors apart. Descriptions
# are compared lowercased and without a final period ("Not found" and "Not found." alike).
DESCRIPTION_CODES: dict[str, str] = {
    "source and target entity id cannot be equal": "SOURCE_AND_TARGET_ENTITY_ID_ARE_EQUAL_ERROR",
    "source and target entity types are not equal": "SOURCE_AND_TARGET_ENTITY_TYPES_ARE_NOT_EQUAL_ERROR",
    "not found": "NOT_FOUND",  # crm.lead|contact|company|deal.get of a record that is gone
    "activity is not found": "NOT_FOUND",  # crm.activity.get
    "access denied": "ACCESS_DENIED",
}
# The same words mean something else from one method: crm.timeline.bindings.unbind answers "Not found."
# when the comment is not bound there, which is what an unbind wants.
METHOD_DESCRIPTION_CODES: dict[tuple[str, str], str] = {
    ("crm.timeline.bindings.unbind", "not found"): "BINDING_NOT_FOUND",
}
POLICIES["SOURCE_AND_TARGET_ENTITY_ID_ARE_EQUAL_ERROR"] = ErrorPolicy(Policy.DONE, "Already where it should be.")
POLICIES["SOURCE_AND_TARGET_ENTITY_TYPES_ARE_NOT_EQUAL_ERROR"] = ErrorPolicy(
    Policy.GIVE_UP, "A move works within one entity type only; use bind and unbind instead.")


class B24Error(Exception):
    """A call to the portal failed."""

    def __init__(self, method: str, code: str, description: str, *, status: int | None = None,
                 hint: str = "") -> None:
        self.method, self.code, self.description, self.status, self.hint = method, code, description, status, hint
        super().__init__(f"{method}: {code or 'error'} ({description})" + (f"; {hint}" if hint else ""))

    def as_record(self) -> dict[str, Any]:
        return {"method": self.method, "code": self.code, "description": self.description,
                "status": self.status, "what_to_do": self.hint, "kind": type(self).__name__}


class TransientError(B24Error):
    """The portal or the network failed for now; the same call may work later."""


class RateLimited(TransientError):
    """The portal answered QUERY_LIMIT_EXCEEDED or OPERATION_TIME_LIMIT."""


class MethodBlocked(TransientError):
    """A method is (nearly) out of its server-time budget until `retry_at`; other methods still work."""

    def __init__(self, method: str, code: str, description: str, *, retry_at: float | None = None,
                 status: int | None = 429) -> None:
        super().__init__(method, code, description, status=status, hint=POLICIES["OPERATION_TIME_LIMIT"].hint)
        self.retry_at = retry_at


class PermanentError(B24Error):
    """The portal refused this call for good."""


class ConfigError(B24Error):
    """The service's access to the portal is set up wrong; retrying will not help."""


class TokenExpired(ConfigError):
    """expired_token: an application refreshes its token and retries; for a webhook it needs renewing."""


def normalise_code(error: Any, description: str, method: str = "") -> str:
    """The portal's `error` may be a string, an empty string or a number; an empty one is read from the
    description (see docs/errors.md, "Errors without a code")."""
    code = str(error).strip() if error is not None else ""
    if code in ("", "0"):
        words = description.strip().lower().removesuffix(".").strip()
        return METHOD_DESCRIPTION_CODES.get((method.lower(), words)) or DESCRIPTION_CODES.get(words, code)
    return code.upper() if not code.isdigit() else code


def policy_for(code: str, status: int | None = None) -> ErrorPolicy:
    known = POLICIES.get(code.upper())
    if known:
        return known
    if status is not None and (status >= 500 or status in (408, 429)):
        return ErrorPolicy(Policy.RETRY, _RETRY_LATER)
    return ErrorPolicy(Policy.GIVE_UP, "The portal refused the call; see its description.")


def error_for(method: str, error: Any, description: Any, status: int | None = None) -> B24Error:
    """Build the typed error for one failed call from what the portal answered."""
    description = str(description or "")
    code = normalise_code(error, description, method)
    rule = policy_for(code, status)
    cls: type[B24Error]
    if code.upper() == "OPERATION_TIME_LIMIT":
        return MethodBlocked(method, code, description, status=status)
    if code.upper() == "QUERY_LIMIT_EXCEEDED":
        cls = RateLimited
    else:
        cls = {Policy.RETRY: TransientError, Policy.FIX_CONFIG: ConfigError,
               Policy.REFRESH: TokenExpired}.get(rule.policy, PermanentError)
    return cls(method, code, description, status=status, hint=rule.hint)


def policy_table() -> str:
    """The policy table as docs/errors.md shows it."""
    lines = ["# What b24rebind does with each error a portal can answer", "",
             "One table in code (`app/bitrix/errors.py`, `POLICIES`) decides; this page is generated from it",
             "(`.venv/bin/python -m app.bitrix.errors > docs/errors.md`) and a test checks that they agree.",
             "Codes are compared case-insensitively; an empty code is told apart by its description.",
             "An unknown code is retried when the HTTP status is 5xx, 408 or 429, and gives up otherwise.", "",
             "| code | policy | what the job says to do |", "|---|---|---|"]
    lines += [f"| `{code}` | {rule.policy.value} | {rule.hint} |" for code, rule in POLICIES.items()]
    lines += ["", "## Errors without a code", "",
              "Some methods answer `\"error\": \"\"` (or `0`) and only the description says what happened "
              "(the CRM module's REST service raises them without a code). They are read case-insensitively, "
              "with or without a final period, as the code in the right column:", "",
              "| description | method | read as |", "|---|---|---|"]
    lines += [f"| {words} | {method} | `{code}` |" for (method, words), code in METHOD_DESCRIPTION_CODES.items()]
    lines += [f"| {words} | any other | `{code}` |" for words, code in DESCRIPTION_CODES.items()]
    lines += ["", "A `NOT_FOUND` while reading the record an event is about (the lead, the activity, the contact "
              "a conversion made) means it was deleted: the job ends as skipped with that reason, never as failed. "
              "A target of the plan that is gone (`crm.contact.get` answers \"Not found\" at the head of the write "
              "batch, before anything is written) is left out of the plan and the job's outcome names it."]
    lines += ["", "## What the portal does silently, and how the service guards against it", "",
              "Read in the CRM module's source (December 2026); the official docs (GitHub bitrix24/b24restdocs, "
              "paths below) say less. Each row is an answer that looks like success, or no answer at all:", "",
              "| the portal | the service |", "|---|---|"]
    lines += [f"| {portal} | {service} |" for portal, service in SILENT]
    return "\n".join(lines) + "\n"


# What the portal does without an error, and what the service does about each (docs/errors.md).
SILENT: tuple[tuple[str, str], ...] = (
    ("A save past 100 bindings (since crm 25.1150.0; before, no cap) keeps the 100 with the highest owner id "
     "and answers `true`: the binding dropped may be any, even the one just added "
     "(api-reference/crm/timeline/activities/binding/index.md names the limit, not what happens past it).",
     "Bindings assumed from a lead's sample are read (with the targets' checks) before any add. An item whose "
     "plan ends past 100, or that has 100 and must add, is left as found (`kept`, `BINDINGS_FULL`). One that "
     "adding everything first would take to 100 is written add, unbind, add, and read after each add: a "
     "binding missing stops it before any unbind (`BINDING_DROPPED`)."),
    ("`crm.timeline.bindings.bind` / `unbind` answer `result: false` with no error when the user may not "
     "change the record, the comment is missing or the save fails; neither checks that the target exists "
     "(api-reference/crm/timeline/bindings/crm-timeline-bindings-bind.md documents `true` only).",
     "A write is done only when it answers `true`: anything else stops its group (`WRITE_NOT_CONFIRMED`), and a "
     "comment's unbinds go in a call of their own after its binds answered `true` (`false` does not halt a "
     "batch). Targets are read before any write."),
    ("`crm.activity.binding.add` and `move` never check that the target exists.",
     "Every target is read first, at the head of the write batch or just before it."),
    ("A list filter on a field the entity does not know is dropped: the list answers the whole table "
     "(api-reference/crm/contacts/crm-contact-list.md lists the fields a filter takes).",
     "Every row of a merged list, of a lead's contact/company/deal list and of an activity read by ID must "
     "carry a number it asked for; otherwise the job stops before any write (`LIST_NOT_FILTERED`)."),
    ("A page past the end (`start` beyond the total) answers page 1 again.",
     "Pages are asked by the count the first page gave, rows kept once by ID; long lists page by `>ID`."),
    ("Every `crm.activity.binding.add/delete/move` fires `ONCRMACTIVITYUPDATE` to subscribed handlers (about "
     "two events per activity re-bound; api-reference/crm/timeline/activities/events/on-crm-activity-update.md).",
     "An update while the service writes the activity, or within 10 s after, is its echo: no read; later, "
     "one finding the activity as the service left it costs one read; nothing is written (app/rebind/echo.py)."),
    ("`event.offline.*` are global-scope methods: `method.get` says available on every portal; only a call "
     "answers `WRONG_AUTH_TYPE` (a webhook) or `ACCESS_DENIED` (a user who is no administrator; "
     "api-reference/events/event-offline-list.md: \"works only in the context of application authorization\").",
     "`doctor` calls the read-only `event.offline.list` and reports the code the portal answers."),
)


if __name__ == "__main__":
    print(policy_table(), end="")
