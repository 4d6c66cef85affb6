"""Loading the rules file: valid files load; each broken one gets one line naming file:line:column."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.rules.loader import RulesError, load_rules, parse_rules

ROOT = Path(__file__).resolve().parents[3]
VALID = """\
portals:
  main:
    domain: Example.Bitrix24.com
    rest_url: ${B24_WEBHOOK_URL}
    application_token: ${B24_APPLICATION_TOKEN}
    rate_limit: {per_second: 2, burst: 50}
rules:
  - name: converted-lead-history-follows-client
    on: [ONCRMACTIVITYADD, oncrmleadupdate]
    when: {bound_to: lead, lead_status: converted}
    do:
      - bind: [lead.contact, lead.company, {type: company, id: 42}]
      - unbind: lead
"""
ENV = {"B24_WEBHOOK_URL": "https://example.bitrix24.com/rest/1/abc123", "B24_APPLICATION_TOKEN": "tok"}


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(RulesError) as caught:
        parse_rules(text, "rules.yaml", ENV if env is None else env)
    return caught.value.messages


def test_the_contract_example_loads_with_variables_from_the_environment() -> None:
    rules = parse_rules(VALID, "rules.yaml", ENV)

    portal = rules.portals["main"]
    assert portal.name == "main"
    assert portal.domain == "example.bitrix24.com"
    assert portal.rest_url.get_secret_value() == "https://example.bitrix24.com/rest/1/abc123/"
    assert rules.rules[0].on == ["ONCRMACTIVITYADD", "ONCRMLEADUPDATE"]
    assert "abc123" not in repr(rules)


def test_the_shipped_example_and_default_files_are_valid() -> None:
    for path in (ROOT / "rules.example.yaml", ROOT / "app" / "rules" / "default.yaml"):
        assert load_rules(path, ENV).rules


BROKEN = [
    ("typo in an action key", VALID.replace("- bind:", "- bnid:"),
     "rules.yaml:12:9: unknown key 'bnid' in rule 'converted-lead-history-follows-client'; did you mean 'bind'?"),
    ("typo in a rule key", VALID.replace("    when:", "    wehn:"),
     "rules.yaml:10:5: unknown key 'wehn' in rule 'converted-lead-history-follows-client'; did you mean 'when'?"),
    ("unknown target", VALID.replace("lead.contact,", "lead.contct,"),
     "rules.yaml:12:15: 'bind' in rule 'converted-lead-history-follows-client': unknown target 'lead.contct'"),
    ("unknown event", VALID.replace("oncrmleadupdate", "ONCRMLEADUPDTE"),
     "rules.yaml:9:9: 'on' in rule 'converted-lead-history-follows-client': unknown event 'ONCRMLEADUPDTE'"),
    ("wrong entity in a condition", VALID.replace("bound_to: lead", "bound_to: leed"),
     "rules.yaml:10:22: 'bound_to' in rule 'converted-lead-history-follows-client': 'leed' is not one of lead, "
     "deal, contact, company; did you mean 'lead'?"),
    ("bind and unbind of one type", VALID.replace("unbind: lead", "unbind: company"),
     "rules.yaml:8:5: rule 'converted-lead-history-follows-client': rule binds and unbinds a company"),
    ("bad YAML", VALID.replace("    when:", "   when:"),
     "rules.yaml:10:4: not valid YAML: this line is indented differently from the lines above it; indent it"),
    ("unset variable", VALID, "rules.yaml:4:15: ${B24_WEBHOOK_URL} is not set; set B24_WEBHOOK_URL in .env"),
    ("plain http to a remote portal", VALID.replace("${B24_WEBHOOK_URL}", "http://example.bitrix24.com/rest/1/x/"),
     "rules.yaml:4:15: 'rest_url': rest_url must use https://"),
    ("fixed target without an id", VALID.replace("{type: company, id: 42}", "{type: company}"),
     "rules.yaml:12:44: 'id' in rule 'converted-lead-history-follows-client': missing; add it"),
    ("a step with two actions", VALID.replace("      - unbind: lead", "      - {unbind: lead, bind: [lead.deal]}"),
     "each step has exactly one of"),
    ("a rate limit of zero", VALID.replace("per_second: 2", "per_second: 0"),
     "rules.yaml:6:30: 'per_second': 0 is out of range; write a number above 0"),
    ("a move across types", VALID.replace("      - unbind: lead", "      - move: {from: lead, to: lead.contact}"),
     "rules.yaml:13:15: 'move' in rule 'converted-lead-history-follows-client': a move stays within one "
     "type: from lead cannot go to contact"),
    ("a bad regular expression", VALID.replace("lead_status: converted", "subject_matches: '(unclosed'"),
     "rules.yaml:10:45: 'subject_matches' in rule 'converted-lead-history-follows-client': not a valid regular "
     "expression"),
    ("a typo inside not", VALID.replace("lead_status: converted", "not: {subjct_contains: x}"),
     "rules.yaml:10:34: unknown key 'subjct_contains' in rule 'converted-lead-history-follows-client'; "
     "did you mean 'subject_contains'?"),
    ("a wrong direction", VALID.replace("lead_status: converted", "direction: inbound"),
     "'direction' in rule 'converted-lead-history-follows-client': 'inbound' is not one of incoming, outgoing; "
     "write one of incoming, outgoing"),
    ("a typo in a move", VALID.replace("      - unbind: lead", "      - move: {form: deal, to: lead.deal}"),
     "rules.yaml:13:16: unknown key 'form' in rule 'converted-lead-history-follows-client'; did you mean 'from'?"),
    ("two rules that undo each other", VALID + "  - name: back\n    on: [ONCRMACTIVITYADD]\n    do: [{unbind: contact}]\n",
     "rules.yaml:8:3: 'rules': rules 'converted-lead-history-follows-client' and 'back' bind and unbind "
     "a contact on the same event"),
    ("a portal without a token", VALID.replace("    application_token: ${B24_APPLICATION_TOKEN}\n", ""),
     "rules.yaml:3:5: 'main': a webhook portal needs rest_url (the inbound webhook) and application_token"),
    ("a misspelt kind", VALID.replace("lead_status: converted", "kind: emial"),
     "rules.yaml:10:34: 'kind' in rule 'converted-lead-history-follows-client': unknown kind 'emial'; "
     "did you mean 'email'?"),
    ("a misspelt lead status", VALID.replace("lead_status: converted", "lead_status: convertd"),
     "'lead_status' in rule 'converted-lead-history-follows-client': unknown lead_status 'convertd'; "
     "did you mean 'converted'?"),
    ("a misspelt event gets its near miss", VALID.replace("oncrmleadupdate", "ONCRMLEADUPDTE"),
     "unknown event 'ONCRMLEADUPDTE'; did you mean 'ONCRMLEADUPDATE'?"),
    ("a domain given as a URL", VALID.replace("domain: Example.Bitrix24.com", "domain: https://example.bitrix24.com/"),
     "rules.yaml:3:13: 'domain': domain is the portal's host name alone, as events name it: write "
     "'example.bitrix24.com', with no https:// and no path"),
    ("an empty variable", VALID, "rules.yaml:4:15: ${B24_WEBHOOK_URL} is empty; give B24_WEBHOOK_URL a value"),
    ("a webhook URL ending with a method", VALID.replace("${B24_WEBHOOK_URL}",
                                                         "https://example.bitrix24.com/rest/1/abc/crm.lead.list.json"),
     "rules.yaml:4:15: 'rest_url': rest_url ends with a method (crm.lead.list): give the webhook's base URL only"),
    ("a URL that is no webhook", VALID.replace("${B24_WEBHOOK_URL}", "https://example.bitrix24.com/"),
     "rules.yaml:4:15: 'rest_url': rest_url is not an inbound webhook URL"),
    ("no rules at all", "portals: {}\n", "rules.yaml:1:1: 'rules': missing; add it"),
    ("an empty file", "", "rules.yaml:1:1: the rules file is empty"),
    ("an enum typo: leads for lead", VALID.replace("bound_to: lead", "bound_to: leads"),
     "rules.yaml:10:22: 'bound_to' in rule 'converted-lead-history-follows-client': 'leads' is not one of lead, "
     "deal, contact, company; did you mean 'lead'?"),
    ("a word where a number goes", VALID.replace("burst: 50", "burst: lots"),
     "rules.yaml:6:40: 'burst': 'lots' is not a whole number; write a whole number"),
    ("a tab in the indentation", VALID.replace("    when:", "\twhen:"),
     "rules.yaml:10:1: not valid YAML: a character that cannot start a value here (a tab?); indent with spaces"),
    ("an unclosed list", VALID.replace("oncrmleadupdate]", "oncrmleadupdate"),
     "rules.yaml:9:9: not valid YAML: a list in [ ] is not closed; add the ']'"),
    ("a colon inside a value", VALID.replace("- unbind: lead", "- unbind: lead: now"),
     "rules.yaml:13:21: not valid YAML: a ':' where a value was expected; put quotes around a value"),
]


@pytest.mark.parametrize("text,expected", [(text, expected) for _, text, expected in BROKEN],
                         ids=[name for name, _, _ in BROKEN])
def test_a_broken_file_gets_one_line_naming_where(text: str, expected: str) -> None:
    env = {"B24_APPLICATION_TOKEN": "tok"} if "is not set" in expected else ENV
    if "is empty" in expected:
        env = {**ENV, "B24_WEBHOOK_URL": ""}  # as .env.example ships it
    messages = errors_of(text, env)

    assert len(messages) == 1, messages
    assert "\n" not in messages[0]
    assert expected in messages[0], messages[0]
    # One dialect: file:line:col first, never pydantic's or PyYAML's own words.
    assert re.match(r"rules\.yaml:\d+:\d+: ", messages[0]), messages[0]
    assert not any(words in messages[0] for words in ("Input should be", "Field required", "expected <block end>",
                                                       "mapping values are not allowed", "Value error"))


def test_two_rules_with_one_name_are_refused() -> None:
    text = VALID + VALID[VALID.index("  - name"):]

    assert "two rules are named" in errors_of(text)[0]


def test_a_missing_file_says_which_setting_to_change(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="set B24_RULES"):
        load_rules(tmp_path / "nope.yaml", {})


def test_names_a_portal_does_not_know_are_given_explicitly() -> None:
    text = VALID.replace("lead_status: converted", "kind: [email, VOXIMPLANT_CALL, {provider: MY_APP}], "
                                                   "lead_status: [converted, in_process, UC_7X2K, {status: HOT}]")
    when = parse_rules(text, "rules.yaml", ENV).rules[0].when

    assert when.kind == ["email", "VOXIMPLANT_CALL", "MY_APP"]
    assert when.lead_status == ["converted", "IN_PROCESS", "UC_7X2K", "HOT"]
    assert "{provider: emial}" in errors_of(VALID.replace("lead_status: converted", "kind: emial"))[0]
