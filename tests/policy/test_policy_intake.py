"""pipeline.policy.intake: validation, expiry, dedup keys and the dedup window, on requests as serde decodes them."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.domain import MAX_ID_LENGTH, MAX_USER_ID_LENGTH, NOTIFICATION_TYPES
from pipeline.kafka.serde import NOTIFICATION_REQUEST, AvroSerde
from pipeline.policy.intake import (
    DeviceToken,
    IntakeDecision,
    decide,
    dedup_key,
    is_duplicate,
    is_expired,
    problems,
    usable_device_tokens,
)

CREATED = datetime(2025, 3, 4, 5, 6, 7, 890_000, tzinfo=UTC)
TOKEN = {"platform": "android", "token": "fcm-registration-token-1"}


def decoded(value: dict[str, Any]) -> dict[str, Any]:
    """`value` as the intake stage sees it: through Avro and back."""
    avro = AvroSerde()
    return avro.decode(avro.encode(NOTIFICATION_REQUEST, value), expected=NOTIFICATION_REQUEST).value


VALID = decoded({
    "notification_id": uuid.UUID("0b5e8f0c-8d43-4a8e-9a51-2f1d3c4b5a69"), "idempotency_key": "debit-8841",
    "user_id": "user-42", "type": "transaction", "channels": ["sms", "email", "push"],
    "recipient": {"phone": "+2348012345678", "email": "ada@example.com", "device_tokens": [TOKEN]},
    "template_id": "debit_alert", "template_params": {"amount": "NGN 5,000.00"}, "content": None, "locale": "en-NG",
    "created_at": CREATED, "expires_at": CREATED + timedelta(minutes=5), "source_service": "core-banking",
    "correlation_id": None,
})


def request(**changes: Any) -> dict[str, Any]:
    return {**VALID, **changes}


def recipient(**changes: Any) -> dict[str, Any]:
    return {**VALID["recipient"], **changes}


# --- problems -------------------------------------------------------------------------------------------------------


def test_a_complete_request_as_serde_decodes_it_has_no_problems() -> None:
    assert isinstance(VALID["notification_id"], uuid.UUID) and VALID["created_at"].tzinfo is not None
    assert problems(VALID) == []


def test_auto_channels_need_no_recipient_because_preferences_resolve_contacts() -> None:
    no_addresses: dict[str, Any] = {"phone": None, "email": None, "device_tokens": []}
    assert problems(request(channels=[], recipient=no_addresses)) == []


@pytest.mark.parametrize("kind", NOTIFICATION_TYPES)
def test_every_known_type_is_valid(kind: str) -> None:
    assert problems(request(type=kind)) == []


@pytest.mark.parametrize("kind", ["sms_blast", "", None, "OTP"])
def test_an_unknown_type_is_a_problem(kind: object) -> None:
    assert any("unknown type" in problem for problem in problems(request(type=kind)))


@pytest.mark.parametrize("field", ["user_id", "idempotency_key"])
@pytest.mark.parametrize("value", ["", "   ", None])
def test_an_empty_identifier_is_a_problem(field: str, value: object) -> None:
    assert problems(request(**{field: value})) == [f"{field} is empty"]


@pytest.mark.parametrize(("field", "limit"), [("user_id", MAX_USER_ID_LENGTH),
                                             ("idempotency_key", MAX_ID_LENGTH)])
def test_an_identifier_is_bounded_in_length(field: str, limit: int) -> None:
    assert problems(request(**{field: "k" * limit})) == []
    assert problems(request(**{field: "k" * (limit + 1)})) == [f"{field} is longer than {limit} characters"]


def test_a_notification_id_that_is_not_a_uuid_is_a_problem() -> None:
    assert problems(request(notification_id="0b5e8f0c")) == ["notification_id is not a UUID"]


@pytest.mark.parametrize(
    ("channel", "changed", "expected"),
    [
        ("sms", {"phone": None}, []),
        ("sms", {"phone": ""}, []),
        ("email", {"email": None}, []),
        ("push", {"device_tokens": []}, []),
        ("push", {"device_tokens": [{"platform": "ios", "token": " "}]}, []),
    ],
)
def test_a_missing_address_is_left_to_preferences_which_resolves_it_from_the_users_contacts(
    channel: str, changed: dict[str, Any], expected: list[str]
) -> None:
    assert problems(request(channels=[channel], recipient=recipient(**changed))) == expected
    assert problems(request(channels=[channel], recipient=None)) == expected


def test_a_channel_not_requested_needs_no_address() -> None:
    assert problems(request(channels=["push"], recipient=recipient(phone=None, email=None))) == []


def test_one_usable_device_token_is_enough_for_push() -> None:
    tokens = [{"platform": "web", "token": ""}, TOKEN]
    assert problems(request(channels=["push"], recipient=recipient(device_tokens=tokens))) == []
    assert usable_device_tokens({"device_tokens": tokens}) == (DeviceToken("android", "fcm-registration-token-1"),)


@pytest.mark.parametrize("phone", ["08012345678", "+0123456789", "+234 801 234 5678", "+1234"])
def test_a_phone_that_is_not_e164_is_a_problem_even_with_auto_channels(phone: str) -> None:
    for channels in (["sms"], [], ["email"]):
        assert "recipient.phone is not an E.164 number" in problems(request(channels=channels,
                                                                            recipient=recipient(phone=phone)))


@pytest.mark.parametrize("email", ["ada", "ada@example", "ada@@example.com", "ada lovelace@example.com"])
def test_a_malformed_email_is_a_problem(email: str) -> None:
    assert problems(request(recipient=recipient(email=email))) == ["recipient.email is not a valid email address"]


def test_an_unknown_channel_is_a_problem() -> None:
    assert problems(request(channels=["sms", "fax"])) == ["unknown channel 'fax'; known: sms, email, push"]


def test_content_instead_of_a_template_is_valid() -> None:
    assert problems(request(template_id=None, content={"subject": None, "body": "Your code is 123456"})) == []


@pytest.mark.parametrize(
    ("template_id", "content", "expected"),
    [
        (None, None, "neither template_id nor content given"),
        ("", None, "neither template_id nor content given"),
        ("debit_alert", {"subject": None, "body": "hi"}, "both template_id and content given; give one"),
        (None, {"subject": "s", "body": " "}, "content.body is empty"),
    ],
)
def test_content_needs_exactly_one_of_template_and_body(
    template_id: str | None, content: object, expected: str
) -> None:
    assert problems(request(template_id=template_id, content=content)) == [expected]


def test_expiry_before_creation_is_a_problem_and_equal_is_not() -> None:
    assert problems(request(expires_at=CREATED - timedelta(milliseconds=1))) == ["expires_at is before created_at"]
    assert problems(request(expires_at=CREATED)) == []
    assert problems(request(expires_at=None)) == []


def test_naive_timestamps_are_problems_rather_than_crashes() -> None:
    naive = datetime(2025, 1, 1)
    assert problems(request(created_at=naive)) == ["created_at is not a timezone-aware datetime"]
    assert problems(request(expires_at=naive)) == ["expires_at is not a timezone-aware datetime"]


def test_every_problem_is_reported_at_once() -> None:
    broken = request(user_id="", type="fax", channels=["sms"], recipient=recipient(phone="0801"), template_id=None)
    assert len(problems(broken)) == 4


def test_values_of_the_wrong_shape_give_problems_not_exceptions() -> None:
    assert problems({}) != []
    assert "channels is not a list" in problems(request(channels="sms"))
    assert "recipient is not a record" in problems(request(recipient="+2348012345678"))
    assert "content is not a record" in problems(request(template_id=None, content="hello"))


# --- expiry and decide ----------------------------------------------------------------------------------------------


def test_a_request_expires_at_its_expiry_instant_not_before() -> None:
    expires = VALID["expires_at"]
    assert not is_expired(VALID, expires - timedelta(milliseconds=1))
    assert is_expired(VALID, expires)
    assert is_expired(VALID, expires + timedelta(days=1))


def test_a_request_without_expiry_never_expires() -> None:
    assert not is_expired(request(expires_at=None), datetime.max.replace(tzinfo=UTC))


def test_decide_accepts_a_valid_fresh_request() -> None:
    assert decide(VALID, CREATED) == IntakeDecision("accept")


def test_decide_expires_a_stale_valid_request() -> None:
    assert decide(VALID, CREATED + timedelta(minutes=5)) == IntakeDecision("expired")


def test_decide_reports_invalid_with_reasons_even_when_also_expired() -> None:
    decision = decide(request(user_id=""), CREATED + timedelta(days=1))
    assert decision == IntakeDecision("invalid", ("user_id is empty",))


# --- dedup ----------------------------------------------------------------------------------------------------------


def test_the_dedup_key_format_is_stable() -> None:
    # Stored in the dedup table: a format change would forget every key seen so far, so it must be deliberate.
    assert dedup_key(VALID) == '["user-42","transaction","debit-8841"]'


def test_the_dedup_key_ignores_everything_but_user_type_and_idempotency_key() -> None:
    other = request(notification_id=uuid.uuid4(), channels=[], created_at=CREATED + timedelta(hours=1))
    assert dedup_key(other) == dedup_key(VALID)
    assert dedup_key(request(type="otp")) != dedup_key(VALID)


SEPARATOR_HEAVY = st.text(alphabet=st.sampled_from(['a', '|', ':', ',', '"', '\\', '[', ']', ' ', '\x00', 'é']))


@given(st.tuples(SEPARATOR_HEAVY, st.sampled_from(NOTIFICATION_TYPES), SEPARATOR_HEAVY),
       st.tuples(SEPARATOR_HEAVY, st.sampled_from(NOTIFICATION_TYPES), SEPARATOR_HEAVY))
def test_different_parts_never_share_a_dedup_key(first: tuple[str, str, str], second: tuple[str, str, str]) -> None:
    def key(parts: tuple[str, str, str]) -> str:
        return dedup_key({"user_id": parts[0], "type": parts[1], "idempotency_key": parts[2]})

    assert (key(first) == key(second)) == (first == second)
    assert tuple(json.loads(key(first))) == first  # the key decodes back to its parts


def test_a_dedup_entry_counts_for_exactly_the_window() -> None:
    seen, window = CREATED, timedelta(hours=24)
    assert is_duplicate(seen, seen, window)
    assert is_duplicate(seen, seen + window - timedelta(microseconds=1), window)
    assert not is_duplicate(seen, seen + window, window)


def test_no_dedup_entry_is_not_a_duplicate() -> None:
    assert not is_duplicate(None, CREATED, timedelta(hours=1))


def test_a_dedup_entry_from_a_clock_ahead_of_ours_still_counts() -> None:
    assert is_duplicate(CREATED + timedelta(seconds=5), CREATED, timedelta(hours=1))


def test_a_dedup_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        is_duplicate(CREATED, CREATED, timedelta(0))


def test_a_nul_character_anywhere_is_a_problem_that_names_the_field() -> None:
    nul = request(source_service="svc\x00", template_params={"code": "12\x003456", "ok": "fine"},
                  recipient=recipient(email="ada\x00@example.com"))
    found = problems(nul)
    assert "source_service contains a NUL character" in found
    assert "template_params.code contains a NUL character" in found
    assert "recipient.email contains a NUL character" in found
    assert not any("template_params.ok" in problem for problem in found)
    assert decide(nul, CREATED).outcome == "invalid"
    assert problems(VALID) == []
