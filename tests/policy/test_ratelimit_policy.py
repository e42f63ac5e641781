"""The rate-limit policy without Redis: the shipped file, rule matching, key names and the strict loader."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.domain import CHANNELS, CRITICAL_TYPES, LANE_OF_TYPE, NOTIFICATION_TYPES
from pipeline.policy.ratelimit import (
    DEFAULT_POLICY_PATH,
    RatePolicy,
    RatePolicyError,
    Rule,
    load_policy,
    parse_policy,
    rules_for,
)

TWO_RULES = """
[rules.bulk_sms_per_hour]
match = { channels = ["sms"], class = "bulk" }
limit = 3
window_s = 3600

[rules.any_channel_per_minute]
match = { channels = ["sms", "push"] }
limit = 2
window_s = 60
per_channel = true
"""


@pytest.fixture(scope="module")
def shipped() -> RatePolicy:
    return load_policy()


def names(rules: tuple[Rule, ...]) -> list[str]:
    return [rule.name for rule in rules]


def test_the_shipped_policy_loads_from_infra_policies() -> None:
    assert DEFAULT_POLICY_PATH.parts[-3:] == ("infra", "policies", "rate_limits.toml")
    assert load_policy(DEFAULT_POLICY_PATH).rules == load_policy().rules


def test_the_shipped_policy_has_the_articles_three_bulk_sms_per_hour_per_user(shipped: RatePolicy) -> None:
    rule = shipped.rule("bulk_sms_per_hour")

    assert (rule.limit, rule.window_s, rule.channels, rule.lane) == (3, 3600, frozenset({"sms"}), "bulk")
    assert names(rules_for(shipped, channel="sms", notification_type="marketing", lane="bulk")) == [
        "bulk_sms_per_hour"]


def test_the_shipped_otp_ceiling_is_five_per_ten_minutes_and_twenty_per_day_on_every_channel(
        shipped: RatePolicy) -> None:
    for channel in CHANNELS:
        matched = rules_for(shipped, channel=channel, notification_type="otp", lane="critical")
        assert [(r.name, r.limit, r.window_s, r.per_channel) for r in matched] == [
            ("otp_per_10_min", 5, 600, False), ("otp_per_day", 20, 86400, False)]


def test_the_shipped_policy_limits_every_bulk_delivery_and_never_a_transaction_or_security_alert(
        shipped: RatePolicy) -> None:
    for notification_type in NOTIFICATION_TYPES:
        lane = LANE_OF_TYPE[notification_type]
        for channel in CHANNELS:
            matched = rules_for(shipped, channel=channel, notification_type=notification_type, lane=lane)
            if lane == "bulk":
                assert matched, (notification_type, channel)
                assert all(channel in (r.channels or CHANNELS) for r in matched)
            elif notification_type != "otp":
                assert notification_type in CRITICAL_TYPES
                assert matched == (), (notification_type, channel)


def test_rules_come_back_in_policy_order_and_every_criterion_must_match() -> None:
    policy = parse_policy(TWO_RULES)

    assert names(rules_for(policy, channel="sms", notification_type="marketing", lane="bulk")) == [
        "bulk_sms_per_hour", "any_channel_per_minute"]
    assert names(rules_for(policy, channel="sms", notification_type="otp", lane="critical")) == [
        "any_channel_per_minute"]
    assert names(rules_for(policy, channel="push", notification_type="marketing", lane="bulk")) == [
        "any_channel_per_minute"]
    assert rules_for(policy, channel="email", notification_type="marketing", lane="bulk") == ()


def test_a_rule_matches_types_only_when_types_are_given() -> None:
    policy = parse_policy('[rules.otp_only]\nmatch = { types = ["otp"] }\nlimit = 1\nwindow_s = 1\n')

    assert names(rules_for(policy, channel="email", notification_type="otp", lane="critical")) == ["otp_only"]
    assert rules_for(policy, channel="email", notification_type="security", lane="critical") == ()


def test_keys_name_rule_and_user_and_the_channel_only_for_a_per_channel_rule() -> None:
    policy = parse_policy(TWO_RULES)

    assert policy.rule("bulk_sms_per_hour").key(user_id="u-42", channel="sms") == "rl:bulk_sms_per_hour:{u-42}"
    assert policy.rule("any_channel_per_minute").key(user_id="u-42", channel="push") == (
        "rl:any_channel_per_minute:{u-42}:push")


def test_keys_of_one_user_share_a_cluster_hash_tag_and_differ_between_users() -> None:
    policy = parse_policy(TWO_RULES)
    keys = [rule.key(user_id="u-42", channel="sms") for rule in policy.rules]

    assert {key.split("{", 1)[1].split("}", 1)[0] for key in keys} == {"u-42"}
    assert policy.rules[0].key(user_id="u-4", channel="sms") != keys[0]


def test_a_key_without_a_user_id_is_refused() -> None:
    with pytest.raises(ValueError, match="user id"):
        parse_policy(TWO_RULES).rules[0].key(user_id="", channel="sms")


def test_window_in_milliseconds_follows_window_in_seconds() -> None:
    assert parse_policy(TWO_RULES).rule("any_channel_per_minute").window_ms == 60_000


def test_per_channel_defaults_to_one_window_across_channels() -> None:
    assert parse_policy(TWO_RULES).rule("bulk_sms_per_hour").per_channel is False


def test_a_policy_file_path_can_be_given(tmp_path: Path) -> None:
    path = tmp_path / "limits.toml"
    path.write_text(TWO_RULES, encoding="utf-8")

    policy = load_policy(path)

    assert names(policy.rules) == ["bulk_sms_per_hour", "any_channel_per_minute"]
    assert policy.source == str(path)


def test_a_missing_policy_file_is_a_policy_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(RatePolicyError, match=r"missing\.toml"):
        load_policy(tmp_path / "missing.toml")


VALID_RULE = 'match = { channels = ["sms"] }\nlimit = 3\nwindow_s = 60\n'


@pytest.mark.parametrize(("text", "message"), [
    ("[rules.a\n", "not valid TOML"),
    ("", "declares no rules"),
    ("rules = {}\n", "declares no rules"),
    ("version = 2\n[rules.a]\n" + VALID_RULE, "unknown key.*version"),
    ("[rules.a]\nlimt = 3\n" + VALID_RULE, r"rules\.a: unknown key.*limt"),
    ('[rules.a]\nmatch = { types = ["otp"], chanels = ["sms"] }\nlimit = 3\nwindow_s = 60\n',
     r"rules\.a\.match: unknown key.*chanels"),
    ("[rules.a]\nlimit = 3\nwindow_s = 60\n", r"rules\.a\.match: required"),
    ("[rules.a]\nmatch = {}\nlimit = 3\nwindow_s = 60\n", r"rules\.a\.match: required"),
    ('[rules.a]\nmatch = { channels = ["fax"] }\nlimit = 3\nwindow_s = 60\n', "unknown value 'fax'"),
    ('[rules.a]\nmatch = { channels = [] }\nlimit = 3\nwindow_s = 60\n', "non-empty list"),
    ('[rules.a]\nmatch = { channels = "sms" }\nlimit = 3\nwindow_s = 60\n', "non-empty list"),
    ('[rules.a]\nmatch = { types = ["loan"] }\nlimit = 3\nwindow_s = 60\n', "unknown value 'loan'"),
    ('[rules.a]\nmatch = { class = "urgent" }\nlimit = 3\nwindow_s = 60\n', r"class: must be one of critical, bulk"),
    ('[rules.a]\nmatch = { types = ["otp"], class = "bulk" }\nlimit = 3\nwindow_s = 60\n', "could never match"),
    ('[rules.a]\nmatch = { channels = ["sms"] }\nwindow_s = 60\n', r"limit: required"),
    ('[rules.a]\nmatch = { channels = ["sms"] }\nlimit = 0\nwindow_s = 60\n', "positive integer, not 0"),
    ('[rules.a]\nmatch = { channels = ["sms"] }\nlimit = -1\nwindow_s = 60\n', "positive integer"),
    ('[rules.a]\nmatch = { channels = ["sms"] }\nlimit = true\nwindow_s = 60\n', "positive integer, not True"),
    ('[rules.a]\nmatch = { channels = ["sms"] }\nlimit = 3\nwindow_s = 1.5\n', r"window_s: must be a positive"),
    ('[rules.a]\nmatch = { channels = ["sms"] }\nlimit = 3\nwindow_s = "1h"\n', r"window_s: must be a positive"),
    ("[rules.a]\n" + VALID_RULE + 'per_channel = "yes"\n', "per_channel: must be true or false"),
    ("[rules.a]\n" + VALID_RULE + "description = 3\n", "description: must be a string"),
    ("[rules.Bad-Name]\n" + VALID_RULE, "lower case letters"),
    ('[rules."a:b"]\n' + VALID_RULE, "lower case letters"),
    ("[rules]\na = 3\n", r"rules\.a: must be a table"),
    ("[rules.a]\n" + VALID_RULE + "[rules.a]\n" + VALID_RULE, "not valid TOML"),
])
def test_a_malformed_policy_is_refused_with_a_message_that_says_where(text: str, message: str) -> None:
    with pytest.raises(RatePolicyError, match=message):
        parse_policy(text, source="limits.toml")


def test_policy_errors_are_notify_errors() -> None:
    from pipeline.errors import NotifyError

    assert issubclass(RatePolicyError, NotifyError)
