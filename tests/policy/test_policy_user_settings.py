"""The settings write contract: what a PUT body may hold, checked without a broker or database."""

from __future__ import annotations

import datetime

import pytest

from pipeline.kafka.serde import USER_SETTINGS, AvroSerde
from pipeline.policy import user_settings as policy
from pipeline.policy.request_contract import InvalidRequest

NOW = datetime.datetime(2026, 11, 22, 9, 30, tzinfo=datetime.UTC)


def test_a_full_body_becomes_a_user_settings_record_that_encodes() -> None:
    body = {
        "timezone": "Africa/Lagos", "channel_preference": ["push", "sms"], "digest": "daily",
        "categories": {"marketing": {"opted_out_channels": ["sms"], "opted_in_channels": ["email"]},
                       "portfolio": {"digest": "hourly"}},
        "quiet_hours": {"start": "22:00", "end": "07:00"},
        "contacts": {"phone": "+2348012345678", "email": "ada@example.com",
                     "device_tokens": [{"platform": "ios", "token": "abc"}]},
    }
    record = policy.parse("u-1", body, version=3, now=NOW)
    assert record["categories"] == {
        "marketing": {"opted_in_channels": ["email"], "opted_out_channels": ["sms"], "digest": None},
        "portfolio": {"opted_in_channels": [], "opted_out_channels": [], "digest": "hourly"}}
    assert (record["version"], record["updated_at"], record["timezone"]) == (3, NOW, "Africa/Lagos")
    decoded = AvroSerde().decode(AvroSerde().encode(USER_SETTINGS, record), expected=USER_SETTINGS).value
    assert decoded["contacts"]["device_tokens"] == [{"platform": "ios", "token": "abc"}]
    assert decoded["quiet_hours"] == {"start": "22:00", "end": "07:00"}


def test_an_empty_body_means_every_default() -> None:
    record = policy.parse("u-1", {}, version=1, now=NOW)
    assert record["timezone"] == "UTC" and record["quiet_hours"] is None and record["digest"] == "none"
    assert record["channel_preference"] == [] and record["categories"] == {}
    assert record["contacts"] == {"phone": None, "email": None, "device_tokens": []}


def test_every_wrong_field_is_named_at_once() -> None:
    body = {
        "timezone": "Mars/Olympus", "channel_preference": ["sms", "fax", "sms"], "digest": "monthly",
        "categories": {"spam": {}, "marketing": {"opted_out_channels": ["pigeon"], "colour": 1},
                       "portfolio": {"digest": "yearly"}},
        "quiet_hours": {"start": "25:00", "end": "07:00"}, "colour": "blue",
        "contacts": {"phone": "0801", "email": "nope", "device_tokens": [{"platform": "nokia", "token": "x"}]},
    }
    with pytest.raises(InvalidRequest) as raised:
        policy.parse("u-1", body, version=1, now=NOW)
    fields = [p.field for p in raised.value.problems]
    assert sorted(set(fields)) == sorted({
        "", "timezone", "digest", "channel_preference", "categories.spam", "categories.marketing",
        "categories.marketing.opted_out_channels", "categories.portfolio.digest", "quiet_hours.start",
        "contacts.phone", "contacts.email",
        "contacts.device_tokens[0]"})


@pytest.mark.parametrize("quiet_hours", [{"start": "22:00"}, {"start": "08:00", "end": "08:00"}, "22-07"])
def test_quiet_hours_need_two_different_clock_times(quiet_hours: object) -> None:
    with pytest.raises(InvalidRequest, match="quiet_hours"):
        policy.parse("u-1", {"quiet_hours": quiet_hours}, version=1, now=NOW)


def test_a_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="JSON object"):
        policy.parse("u-1", ["sms"], version=1, now=NOW)
