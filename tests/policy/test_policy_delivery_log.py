"""The delivery log's decisions without a broker or database: query parameters, cursors, redaction, the timeline;
the key scope rules; the console's sessions, CSRF tokens and figures."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

import pytest

from pipeline.api.keys import ApiKeyError, allows, may_read, normalise_scopes
from pipeline.console import figures, session
from pipeline.policy.delivery_log import (
    REDACTED,
    Cursor,
    InvalidQuery,
    ListQuery,
    decode_cursor,
    encode_cursor,
    parse_list_query,
    request_view,
    timeline,
)
from pipeline.policy.push import fingerprint

T0 = datetime.datetime(2026, 12, 3, 9, 0, 0, 123456, tzinfo=datetime.UTC)


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


# --- scopes ----------------------------------------------------------------------------------------------------

def test_admin_may_do_everything_and_other_scopes_only_their_own() -> None:
    assert allows(("admin",), "ingest") and allows(("admin",), "read") and allows(("admin",), "admin")
    assert allows(("ingest",), "ingest") and not allows(("ingest",), "read") and not allows(("read",), "admin")


def test_a_read_key_reads_only_its_own_services_notifications_and_admin_reads_all() -> None:
    assert may_read(("read",), "billing", "billing") and not may_read(("read",), "billing", "auth")
    assert not may_read(("ingest",), "billing", "billing")
    assert may_read(("admin",), "ops", "auth")


def test_scopes_are_normalised_and_unknown_or_no_scopes_are_refused() -> None:
    assert normalise_scopes(["admin", "read", "read"]) == ("read", "admin")
    with pytest.raises(ApiKeyError, match="unknown scope"):
        normalise_scopes(["write"])
    with pytest.raises(ApiKeyError, match="at least one"):
        normalise_scopes([])


# --- query parameters and cursors ------------------------------------------------------------------------------

def test_no_parameters_is_the_first_page_of_everything() -> None:
    assert parse_list_query({}) == ListQuery()


def test_every_parameter_is_parsed() -> None:
    cursor = encode_cursor(T0, "3f1c1a2e-8a0e-4e4b-9a55-2d1f7a7f6b10")
    query = parse_list_query({"user_id": ["u-1"], "type": ["otp"], "state": ["delivered"], "channel": ["sms"],
                              "since": ["2026-12-03T08:00:00Z"], "until": ["2026-12-03T10:00:00.1234567+01:00"],
                              "limit": ["7"], "cursor": [cursor]})
    assert query == ListQuery("u-1", "otp", "delivered", "sms", datetime.datetime(2026, 12, 3, 8, tzinfo=datetime.UTC),
                              datetime.datetime(2026, 12, 3, 10, 0, 0, 123456,
                                                tzinfo=datetime.timezone(datetime.timedelta(hours=1))),
                              7, Cursor(T0, uuid.UUID("3f1c1a2e-8a0e-4e4b-9a55-2d1f7a7f6b10")))


def test_every_bad_parameter_is_named() -> None:
    with pytest.raises(InvalidQuery) as caught:
        parse_list_query({"type": ["sms"], "state": ["lost"], "limit": ["0"], "since": ["yesterday"],
                          "cursor": ["!!"], "user_id": ["a\x00b"], "colour": ["red"], "channel": ["sms", "email"]})
    assert sorted(field for field, _ in caught.value.problems) == [
        "channel", "colour", "cursor", "limit", "since", "state", "type", "user_id"]


@pytest.mark.parametrize("params", [
    {"limit": ["201"]}, {"limit": ["-1"]}, {"limit": ["1e2"]}, {"since": ["2026-12-03T08:00:00"]},
    {"since": ["2026-12-03T10:00:00Z"], "until": ["2026-12-03T09:00:00Z"]}, {"user_id": ["   "]},
    {"user_id": ["x" * 129]}, {"user_id": ["\ud800"]}, {"cursor": ["a" * 201]},
])
def test_out_of_range_times_limits_and_ids_are_refused(params: dict[str, list[str]]) -> None:
    with pytest.raises(InvalidQuery):
        parse_list_query(params)


def test_a_cursor_round_trips_to_the_microsecond_and_a_tampered_one_is_refused() -> None:
    nid = uuid.uuid4()
    assert decode_cursor(encode_cursor(T0, nid)) == Cursor(T0, nid)
    assert decode_cursor("bm90LWEtY3Vyc29y") is None  # base64 of "not-a-cursor"
    assert decode_cursor("") is None


# --- request view ------------------------------------------------------------------------------------------------

def test_an_otps_parameters_and_body_are_never_shown() -> None:
    task = {"template_id": "otp.default", "template_params": {"code": "123456"},
            "content": {"subject": None, "body": "Your code is 123456"}, "locale": "en", "device_tokens": []}
    view = request_view("otp", task, {"sms": "+2348012345678"})
    assert view == {"template_id": "otp.default", "template_params": {"code": REDACTED},
                    "content": {"subject": None, "body": REDACTED}, "locale": "en",
                    "recipients": {"sms": "+2348012345678"}, "redacted": True}


def test_a_push_device_shows_its_platform_and_fingerprint_never_its_token() -> None:
    task = {"template_id": None, "template_params": {}, "content": {"subject": "Hi", "body": "BTC at 90k"},
            "locale": "en", "device_tokens": [{"platform": "ios", "token": "secret-token"}]}
    view = request_view("price_alert", task, {"push": None})
    assert view is not None and view["recipients"] == {"push": [{"platform": "ios",
                                                                 "fingerprint": fingerprint("secret-token")}]}
    assert "secret-token" not in repr(view) and view["content"]["body"] == "BTC at 90k"
    assert request_view("otp", None, {}) is None


# --- timeline ----------------------------------------------------------------------------------------------------

def _delivery(**fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"channel": "sms", "state": "delivered", "provider": "twilio", "attempt_count": 2,
                              "created_at": at(1), "updated_at": at(9), "accepted_at": at(8), "final_at": at(9),
                              "last_error_code": None}
    row.update(fields)
    return row


def test_recorded_changes_and_attempts_come_in_time_order() -> None:
    transitions: list[dict[str, Any]] = [
        {"channel": "sms", "from_state": None, "to_state": "queued", "attempt_count": 0, "provider": None,
         "error_code": None, "changed_at": at(1)},
        {"channel": "sms", "from_state": "queued", "to_state": "sending", "attempt_count": 1, "provider": None,
         "error_code": None, "changed_at": at(2)},
        {"channel": "sms", "from_state": "sending", "to_state": "accepted", "attempt_count": 1,
         "provider": "twilio", "error_code": None, "changed_at": at(4)},
    ]
    attempts = [{"channel": "sms", "attempt_no": 1, "provider": "twilio", "outcome": "accepted", "error_code": None,
                 "started_at": at(3), "latency_ms": 120}]
    entries = timeline(at(0), [_delivery(state="accepted", final_at=None)], transitions, attempts)
    assert [(e.kind, e.from_state, e.to_state) for e in entries] == [
        ("received", None, "received"), ("state", None, "queued"), ("state", "queued", "sending"),
        ("attempt", None, "accepted"), ("state", "sending", "accepted")]
    assert entries[3].detail == "120 ms" and not any(e.derived for e in entries)


def test_a_delivery_without_recorded_changes_gets_them_from_its_timestamps_marked_derived() -> None:
    entries = timeline(at(0), [_delivery()], [], [])
    assert [(e.to_state, e.from_state, e.at, e.derived) for e in entries[1:]] == [
        ("queued", None, at(1), True), ("accepted", "queued", at(8), True), ("delivered", "accepted", at(9), True)]


def test_a_row_written_final_is_one_derived_change() -> None:
    entries = timeline(at(0), [_delivery(state="suppressed", accepted_at=None, final_at=at(1), provider=None,
                                         last_error_code="opted_out")], [], [])
    assert [(e.to_state, e.from_state) for e in entries[1:]] == [("suppressed", None)]


# --- console sessions and CSRF -----------------------------------------------------------------------------------

SECRET = b"s" * 32


def test_a_session_cookie_round_trips_and_a_forged_altered_or_expired_one_is_refused() -> None:
    opened = session.new_session("0123456789ab", now=1000.0, ttl_s=60)
    cookie = session.encode(SECRET, opened)
    assert session.decode(SECRET, cookie, now=1059.0) == opened
    assert session.decode(SECRET, cookie, now=1061.0) is None  # expired
    assert session.decode(b"other" * 8, cookie, now=1000.0) is None  # another secret: forged
    payload, mac = cookie.split(".")
    assert session.decode(SECRET, payload[:-1] + ("A" if payload[-1] != "A" else "B") + "." + mac, 1000.0) is None
    assert session.decode(SECRET, None, 1000.0) is None and session.decode(SECRET, "x" * 600, 1000.0) is None


def test_a_csrf_token_belongs_to_its_session_alone() -> None:
    one, other = session.new_session(None, 0), session.new_session(None, 0)
    token = session.csrf_token(SECRET, one.nonce)
    assert session.csrf_ok(SECRET, one.nonce, token)
    assert not session.csrf_ok(SECRET, other.nonce, token)
    assert not session.csrf_ok(SECRET, one.nonce, None) and not session.csrf_ok(SECRET, one.nonce, "")


# --- console figures ---------------------------------------------------------------------------------------------

METRICS = """# TYPE notify_stage_messages_total counter
notify_stage_messages_total{stage="sender",lane="critical",outcome="ok"} 100.0
notify_stage_messages_total{stage="sender",lane="critical",outcome="failed"} 20.0
# TYPE notify_stage_errors_total counter
notify_stage_errors_total{stage="sender",lane="critical",kind="message"} 6.0
# TYPE notify_consumer_lag_messages gauge
notify_consumer_lag_messages{group="notify-sender-critical",stage="sender",lane="critical",topic="a",partition="0"} 3.0
notify_consumer_lag_messages{group="notify-sender-critical",stage="sender",lane="critical",topic="a",partition="1"} 4.0
"""


def test_rates_come_from_two_scrapes_and_lag_sums_the_partitions() -> None:
    samples = figures.parse_samples(METRICS)
    by = {k: v for k, v in figures.sum_by(samples, figures.MESSAGES, "stage", "lane").items()}
    assert by == {("sender", "critical"): 120.0}
    [row] = figures.stage_figures([("sender", "critical")], {("sender", "critical"): 7.0},
                                  {("sender", "critical"): 120.0}, {("sender", "critical"): 6.0},
                                  {("sender", "critical"): 100.0}, {("sender", "critical"): 5.0}, 2.0)
    assert (row.lag, row.messages_per_s, row.errors_per_s, row.error_rate) == (7.0, 10.0, 0.5, 0.05)
    [first] = figures.stage_figures([("sender", "bulk")], {}, {}, {}, None, None, 0.0)
    assert (first.lag, first.messages_per_s, first.error_rate) == (None, None, None)


def test_provider_figures_per_country_with_cost_from_the_price_per_segment() -> None:
    facts = [figures.AttemptFact("twilio", "sms", "NG", "accepted", float(ms), None, "x" * 200) for ms in range(1, 20)]
    facts.append(figures.AttemptFact("twilio", "sms", "NG", "transient", 500.0, None, ""))
    facts.append(figures.AttemptFact("sendgrid", "email", "none", "accepted", None, 2500, "hi"))
    [sendgrid, twilio] = figures.provider_figures(facts, {"twilio": 0.01, "sendgrid": 0.001})
    assert (twilio.calls, twilio.accepted, twilio.success_rate, twilio.p95_ms) == (20, 19, 0.95, 19.0)
    assert twilio.cost_usd == pytest.approx(19 * 2 * 0.01)  # 200 GSM-7 characters: two segments
    assert (sendgrid.cost_usd, sendgrid.p95_ms) == (0.0025, None)  # a recorded cost wins
