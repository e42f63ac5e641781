"""Digest policy without a broker: who is digested, when windows end (time zones, DST), what a digest lists."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.policy import digests, preferences
from pipeline.policy.digests import Item, Window, frequency_for, plan, window_end

NOW = datetime(2026, 12, 7, 14, 20, 5, tzinfo=UTC)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


# --- who ------------------------------------------------------------------------------------------------------

def test_the_category_choice_wins_over_the_users_and_none_means_instant_for_that_type() -> None:
    settings: dict[str, Any] = {"digest": "daily", "categories": {
        "portfolio": {"digest": "hourly"}, "marketing": {"digest": "none"}, "price_alert": {"digest": None}}}
    assert frequency_for(settings, "portfolio") == "hourly"
    assert frequency_for(settings, "marketing") is None
    assert frequency_for(settings, "price_alert") == "daily"  # null takes the user's choice
    assert frequency_for({"digest": "none"}, "portfolio") is None
    assert frequency_for(None, "portfolio") is None


@pytest.mark.parametrize("critical", ["otp", "transaction", "security"])
def test_critical_types_are_never_digested_whatever_the_settings_say(critical: str) -> None:
    assert frequency_for({"digest": "hourly", "categories": {critical: {"digest": "daily"}}}, critical) is None


# --- when -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("zone", "now", "end"), [
    ("UTC", "2026-12-07T14:20:05+00:00", "2026-12-07T15:00:00+00:00"),
    ("UTC", "2026-12-07T14:00:00+00:00", "2026-12-07T15:00:00+00:00"),  # a boundary is the end of the one before
    ("Asia/Kolkata", "2026-12-07T14:20:00+00:00", "2026-12-07T14:30:00+00:00"),  # +05:30
    ("Asia/Kathmandu", "2026-12-07T14:20:00+00:00", "2026-12-07T15:15:00+00:00"),  # +05:45: 20:05 -> 21:00
    ("America/St_Johns", "2026-12-07T14:20:00+00:00", "2026-12-07T14:30:00+00:00"),  # -03:30
    # Europe/London springs forward at 01:00 UTC on 2026-03-29: 00:30 local (GMT) ends at 01:00 UTC = 02:00 BST
    ("Europe/London", "2026-03-29T00:30:00+00:00", "2026-03-29T01:00:00+00:00"),
    # and falls back at 01:00 UTC on 2026-10-25: the repeated 01:00-02:00 local hour is two windows
    ("Europe/London", "2026-10-25T00:10:00+00:00", "2026-10-25T01:00:00+00:00"),
    ("Europe/London", "2026-10-25T01:10:00+00:00", "2026-10-25T02:00:00+00:00"),
    # Lord Howe Island goes back half an hour at 02:00 local on 2026-04-05 (15:00 UTC): +11, then +10:30. So the
    # local 01:00-02:00 hour lasts 90 minutes there, one window
    ("Australia/Lord_Howe", "2026-04-04T13:50:00+00:00", "2026-04-04T14:00:00+00:00"),
    ("Australia/Lord_Howe", "2026-04-04T14:40:00+00:00", "2026-04-04T15:30:00+00:00"),
    ("Australia/Lord_Howe", "2026-04-04T15:10:00+00:00", "2026-04-04T15:30:00+00:00"),
])
def test_hourly_windows_end_at_the_top_of_the_local_hour(zone: str, now: str, end: str) -> None:
    assert window_end(at(now), zone, "hourly") == at(end)


def test_daily_windows_end_at_eight_local_on_both_sides_of_a_clock_change() -> None:
    # London: 08:00 GMT is 08:00 UTC in winter, 08:00 BST is 07:00 UTC in summer
    assert window_end(at("2026-03-28T09:00:00+00:00"), "Europe/London", "daily") == at("2026-03-29T07:00:00+00:00")
    assert window_end(at("2026-10-24T09:00:00+00:00"), "Europe/London", "daily") == at("2026-10-25T08:00:00+00:00")
    # Lagos (+01:00): before 08:00 local it is today's 08:00, after it tomorrow's
    assert window_end(at("2026-12-07T06:59:00+00:00"), "Africa/Lagos", "daily") == at("2026-12-07T07:00:00+00:00")
    assert window_end(at("2026-12-07T07:00:00+00:00"), "Africa/Lagos", "daily") == at("2026-12-08T07:00:00+00:00")


def test_weekly_windows_end_on_monday_at_eight_local() -> None:
    monday_8 = at("2026-12-07T08:00:00-05:00")  # New York, a Monday
    assert window_end(at("2026-12-02T12:00:00+00:00"), "America/New_York", "weekly") == monday_8
    assert window_end(monday_8, "America/New_York", "weekly") == monday_8 + timedelta(days=7)


def test_an_unknown_time_zone_takes_utc() -> None:
    assert window_end(NOW, "Mars/Olympus", "daily") == at("2026-12-08T08:00:00+00:00")


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2037, 12, 31), timezones=st.just(UTC)),
       st.sampled_from(["Europe/London", "Asia/Kolkata", "Australia/Lord_Howe", "America/St_Johns", "UTC",
                        "Pacific/Chatham", "America/Sao_Paulo"]),
       st.sampled_from(digests.FREQUENCIES))
def test_a_window_ends_after_now_on_a_local_boundary_and_within_its_length(
        now: datetime, zone: str, frequency: digests.Frequency) -> None:
    from zoneinfo import ZoneInfo
    end = window_end(now, zone, frequency)
    local = end.astimezone(ZoneInfo(zone))
    assert end > now
    assert (local.minute, local.second, local.microsecond) == (0, 0, 0)
    longest = {"hourly": timedelta(hours=1, minutes=30), "daily": timedelta(hours=25),
               "weekly": timedelta(days=7, hours=1)}[frequency]
    assert end - now <= longest
    if frequency != "hourly":
        assert local.hour == 8
    if frequency == "weekly":
        assert local.weekday() == 0


# --- what -----------------------------------------------------------------------------------------------------

WINDOW = Window("u-1", "portfolio", "hourly", at("2026-12-07T15:00:00+00:00"), "ada@example.com")


def item(n: int, **overrides: Any) -> Item:
    base: dict[str, Any] = {"notification_id": f"00000000-0000-0000-0000-{n:012d}",
                            "created_at": NOW - timedelta(minutes=60 - n), "expires_at": None, "collapse_key": None,
                            "subject": f"Update {n}", "body": f"Your portfolio moved {n}%."}
    return Item(**{**base, **overrides})


def test_a_digest_lists_live_items_oldest_first_and_answers_every_other_one() -> None:
    items = [item(3), item(1), item(2, expires_at=NOW - timedelta(seconds=1)),
             item(4, collapse_key="BTC"), item(5, collapse_key="BTC"), item(6, subject=None, body=None,
                                                                          error_code="unknown_template")]
    digest = plan(WINDOW, items, NOW)
    assert digest.included == (item(1).notification_id, item(3).notification_id, item(5).notification_id)
    assert digest.expired == (item(2).notification_id,)
    assert digest.superseded == (item(4).notification_id,)
    assert digest.failed == ((item(6).notification_id, "unknown_template"),)
    assert digest.subject == "Your hourly digest: 3 portfolio updates"
    assert digest.body.splitlines()[2:] == ["1. Update 1: Your portfolio moved 1%.",
                                            "2. Update 3: Your portfolio moved 3%.",
                                            "3. Update 5: Your portfolio moved 5%."]


def test_a_digest_is_the_same_notification_however_often_it_is_planned() -> None:
    first, again = plan(WINDOW, [item(1), item(2)], NOW), plan(WINDOW, [item(2), item(1)], NOW + timedelta(hours=1))
    assert (first.notification_id, first.idempotency_key, first.body) == (
        again.notification_id, again.idempotency_key, again.body)
    other_window = plan(Window("u-1", "portfolio", "hourly", WINDOW.end + timedelta(hours=1), "a@b.c"), [item(1)], NOW)
    other_type = plan(Window("u-1", "marketing", "hourly", WINDOW.end, "a@b.c"), [item(1)], NOW)
    assert len({first.notification_id, other_window.notification_id, other_type.notification_id}) == 3


def test_a_long_digest_lists_fifty_and_counts_the_rest() -> None:
    digest = plan(WINDOW, [item(n) for n in range(1, 61)], NOW)
    assert len(digest.included) == 60
    assert digest.body.splitlines()[-1] == "... and 10 more in the app."
    assert digest.body.count("\n") == 2 + 50


def test_a_window_of_expired_items_sends_nothing() -> None:
    digest = plan(WINDOW, [item(1, expires_at=NOW)], NOW)
    assert digest.included == () and len(digest.expired) == 1


# --- the preferences decision -----------------------------------------------------------------------------------

def request(notification_type: str = "portfolio", **overrides: Any) -> dict[str, Any]:
    return {"notification_id": "n-1", "user_id": "u-1", "type": notification_type, "channels": ["push", "email"],
            "recipient": {"phone": "+2348012345678", "email": "ada@example.com", "device_tokens": []},
            "template_id": f"{notification_type}.default", **overrides}


def test_a_digested_request_is_held_for_its_window_and_sends_nothing_now() -> None:
    decision = preferences.decide(request(), {"digest": "hourly", "timezone": "Asia/Kolkata"}, NOW)
    assert decision.send == () and decision.suppressed == ()
    assert decision.digest == preferences.DigestHold("hourly", at("2026-12-07T14:30:00+00:00"), "ada@example.com")


def test_no_digest_without_an_email_address_or_where_email_is_refused() -> None:
    no_email = request(recipient={"phone": "+2348012345678", "email": None, "device_tokens": []})
    assert preferences.decide(no_email, {"digest": "hourly"}, NOW).digest is None
    opted_out = {"digest": "hourly", "categories": {"portfolio": {"opted_out_channels": ["email"]}}}
    assert preferences.decide(request(), opted_out, NOW).digest is None
    # marketing needs consent: without an email opt-in it is not digested (and stays suppressed as before)
    unconsented = preferences.decide(request("marketing"), {"digest": "daily"}, NOW)
    assert unconsented.digest is None and {r for _, r in unconsented.suppressed} == {"no_consent"}
    consented = {"digest": "daily", "categories": {"marketing": {"opted_in_channels": ["email"]}}}
    assert preferences.decide(request("marketing"), consented, NOW).digest is not None


def test_an_otp_is_sent_at_once_for_a_user_with_a_digest() -> None:
    decision = preferences.decide(request("otp", channels=["sms"]), {"digest": "hourly"}, NOW)
    assert decision.digest is None and [t.channel for t in decision.send] == ["sms"]


def test_a_window_ending_in_quiet_hours_waits_for_their_end() -> None:
    settings = {"digest": "hourly", "timezone": "UTC", "quiet_hours": {"start": "15:00", "end": "18:30"}}
    decision = preferences.decide(request(), settings, NOW)
    assert decision.digest is not None and decision.digest.window_end == at("2026-12-07T18:30:00+00:00")
