"""The error table: every code the portal may answer becomes the error class its policy asks for."""
from __future__ import annotations

import pytest

from app.bitrix.errors import (
    DESCRIPTION_CODES,
    POLICIES,
    B24Error,
    ConfigError,
    MethodBlocked,
    PermanentError,
    Policy,
    RateLimited,
    TokenExpired,
    TransientError,
    error_for,
    normalise_code,
    policy_for,
)

CLASS_FOR_POLICY = {
    Policy.RETRY: TransientError,
    Policy.FIX_CONFIG: ConfigError,
    Policy.GIVE_UP: PermanentError,
    Policy.DONE: PermanentError,
    Policy.REFRESH: TokenExpired,
}
RATE_CODES = {"QUERY_LIMIT_EXCEEDED"}


@pytest.mark.parametrize("code", sorted(POLICIES))
def test_every_known_code_gets_the_class_its_policy_names(code: str) -> None:
    rule = POLICIES[code]
    error = error_for("crm.activity.binding.add", code, "some text", 400)

    wanted = (RateLimited if code in RATE_CODES else MethodBlocked if code == "OPERATION_TIME_LIMIT"
              else CLASS_FOR_POLICY[rule.policy])
    assert type(error) is wanted
    assert error.code == code
    assert error.hint == rule.hint
    assert error.status == 400


@pytest.mark.parametrize("code", sorted(POLICIES))
def test_codes_are_compared_case_insensitively(code: str) -> None:
    lower = error_for("crm.lead.get", code.lower(), "text", 401)
    upper = error_for("crm.lead.get", code.upper(), "text", 401)

    assert type(lower) is type(upper)
    assert lower.code == upper.code == code
    assert policy_for(code.lower()) == POLICIES[code]


def test_expired_token_in_lower_case_is_a_config_error() -> None:
    error = error_for("crm.activity.list", "expired_token", "The access token provided has expired", 401)

    assert isinstance(error, ConfigError)
    assert error.code == "EXPIRED_TOKEN"
    assert "renew" in error.hint


@pytest.mark.parametrize("code", sorted(RATE_CODES))
def test_rate_limit_codes_are_transient_rate_limited_errors(code: str) -> None:
    error = error_for("batch", code, "Too many requests", 503)

    assert isinstance(error, RateLimited)
    assert isinstance(error, TransientError)  # generic retry handlers catch it too
    assert POLICIES[code].policy is Policy.RETRY


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
def test_unknown_code_with_a_server_status_is_retried(status: int) -> None:
    error = error_for("crm.lead.get", "SOMETHING_NEW", "whatever", status)

    assert type(error) is TransientError
    assert policy_for("SOMETHING_NEW", status).policy is Policy.RETRY


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, None])
def test_unknown_code_with_a_client_status_or_none_gives_up(status: int | None) -> None:
    error = error_for("crm.lead.get", "SOMETHING_NEW", "whatever", status)

    assert type(error) is PermanentError
    assert policy_for("SOMETHING_NEW", status).policy is Policy.GIVE_UP


def test_a_known_code_wins_over_the_http_status() -> None:
    # Portals and SDKs disagree on statuses (PORTAL_DELETED is 500 in the docs, 410 in PYSDK):
    # the code decides, not the status.
    assert type(error_for("m", "PORTAL_DELETED", "Portal was deleted", 500)) is ConfigError
    assert type(error_for("m", "PORTAL_DELETED", "Portal was deleted", 410)) is ConfigError
    assert type(error_for("m", "NOT_FOUND", "Not found", 503)) is PermanentError


@pytest.mark.parametrize("error", [100, "100", " 100 "])
def test_numeric_error_code_100_gives_up(error: object) -> None:
    exc = error_for("crm.activity.binding.add", error, "Could not find value for parameter {activityId}", 400)

    assert type(exc) is PermanentError
    assert exc.code == "100"
    assert exc.hint == POLICIES["100"].hint


def test_error_zero_without_a_known_description_stays_zero() -> None:
    exc = error_for("crm.timeline.bindings.fields", 0, "error", 400)

    assert type(exc) is PermanentError
    assert exc.code == "0"


@pytest.mark.parametrize("description, code", sorted(DESCRIPTION_CODES.items()))
def test_empty_code_is_taken_from_the_description(description: str, code: str) -> None:
    for error in ("", None, 0):
        assert normalise_code(error, description) == code
    # Case and surrounding blanks do not matter.
    assert normalise_code("", f"  {description.upper()} ") == code
    exc = error_for("crm.activity.binding.move", "", description, 400)
    assert exc.code == code
    assert type(exc) is CLASS_FOR_POLICY[POLICIES[code].policy]


def test_move_between_types_without_a_code_is_the_types_error() -> None:
    exc = error_for("crm.activity.binding.move", "", "Source and target entity types are not equal", 400)

    assert exc.code == "SOURCE_AND_TARGET_ENTITY_TYPES_ARE_NOT_EQUAL_ERROR"
    assert type(exc) is PermanentError
    assert policy_for(exc.code).policy is Policy.GIVE_UP


def test_move_to_the_same_id_without_a_code_counts_as_done() -> None:
    exc = error_for("crm.activity.binding.move", "", "Source and target entity ID cannot be equal", 400)

    assert exc.code == "SOURCE_AND_TARGET_ENTITY_ID_ARE_EQUAL_ERROR"
    assert policy_for(exc.code).policy is Policy.DONE


def test_a_real_code_is_not_replaced_by_the_description() -> None:
    assert normalise_code("NOT_FOUND", "Not found.") == "NOT_FOUND"
    assert normalise_code("ACCESS_DENIED", "Not found.") == "ACCESS_DENIED"


def test_empty_code_with_an_unknown_description_keeps_an_empty_code() -> None:
    exc = error_for("crm.timeline.bindings.bind", "", "OWNER_ID is not defined or invalid.", 400)

    assert exc.code == ""
    assert type(exc) is PermanentError
    assert "crm.timeline.bindings.bind" in str(exc)
    assert "OWNER_ID is not defined or invalid." in str(exc)


def test_every_description_maps_to_a_code_with_a_policy() -> None:
    for code in DESCRIPTION_CODES.values():
        assert code in POLICIES


def test_policy_keys_are_upper_case_so_lookups_can_match() -> None:
    for code in POLICIES:
        assert code == code.upper()


@pytest.mark.parametrize("code", sorted(POLICIES))
def test_every_policy_has_a_hint(code: str) -> None:
    assert POLICIES[code].hint.strip()


@pytest.mark.parametrize("code, status", [("UNKNOWN", 500), ("UNKNOWN", 400), ("", None)])
def test_fallback_policies_have_a_hint(code: str, status: int | None) -> None:
    assert policy_for(code, status).hint.strip()
    assert error_for("m", code, "d", status).hint.strip()


@pytest.mark.parametrize("code", ["ACCESS_DENIED", "QUERY_LIMIT_EXCEEDED", "NO_AUTH_FOUND", "SOMETHING_NEW"])
def test_message_and_record_carry_method_code_and_description(code: str) -> None:
    exc = error_for("crm.activity.binding.delete", code, "Some description", 403)
    message = str(exc)

    assert "crm.activity.binding.delete" in message
    assert code in message
    assert "Some description" in message
    assert exc.hint in message
    record = exc.as_record()
    assert record["method"] == "crm.activity.binding.delete"
    assert record["code"] == code
    assert record["description"] == "Some description"
    assert record["status"] == 403
    assert record["what_to_do"] == exc.hint
    assert record["kind"] == type(exc).__name__


def test_error_classes_form_the_documented_tree() -> None:
    assert issubclass(RateLimited, TransientError)
    for cls in (TransientError, PermanentError, ConfigError):
        assert issubclass(cls, B24Error)
    assert not issubclass(PermanentError, TransientError)
    assert not issubclass(ConfigError, TransientError)


def test_a_method_out_of_its_time_budget_is_transient_but_not_a_rate_limit() -> None:
    error = error_for("crm.activity.list", "OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit.",
                      429)

    assert isinstance(error, MethodBlocked) and isinstance(error, TransientError)
    assert not isinstance(error, RateLimited), "one method's budget must not slow the whole portal"


def test_the_documented_policy_table_is_the_one_in_code() -> None:
    from pathlib import Path

    from app.bitrix.errors import policy_table
    documented = (Path(__file__).resolve().parents[3] / "docs" / "errors.md").read_text()

    assert documented == policy_table(), "regenerate: .venv/bin/python -m app.bitrix.errors > docs/errors.md"
