"""pipeline.policy.preferences: opt-outs per type and channel, the critical guarantee, channel choice for auto,
address resolution and quiet hours."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.domain import CHANNELS, CRITICAL_TYPES, NOTIFICATION_TYPES, Channel
from pipeline.kafka.serde import USER_SETTINGS, AvroSerde
from pipeline.policy.intake import DeviceToken
from pipeline.policy.preferences import (
    CONSENT_REQUIRED,
    DEFAULT_ORDER,
    ChannelTarget,
    PreferenceDecision,
    SuppressionReason,
    consent_refusal,
    decide,
)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
PHONE, EMAIL = "+2348012345678", "ada@example.com"
TOKEN = {"platform": "ios", "token": "apns-token-1"}
CONTACT_PHONE, CONTACT_EMAIL = "+14155550100", "ada@contacts.example"
CONTACT_TOKEN = {"platform": "android", "token": "fcm-token-from-contacts"}
NO_ADDRESSES: dict[str, Any] = {"phone": None, "email": None, "device_tokens": []}
EVERY_ADDRESS: dict[str, Any] = {"phone": PHONE, "email": EMAIL, "device_tokens": [TOKEN]}
BULK_TYPES = tuple(t for t in NOTIFICATION_TYPES if t not in CRITICAL_TYPES)
CONSENTED = {"marketing": {"opted_in_channels": ["sms", "email", "push"], "opted_out_channels": []}}

SMS = ChannelTarget("sms", address=PHONE)
EMAIL_TARGET = ChannelTarget("email", address=EMAIL)
PUSH = ChannelTarget("push", device_tokens=(DeviceToken("ios", "apns-token-1"),))


def request(kind: str = "transaction", channels: tuple[Channel, ...] = (),
            recipient: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fields of a decoded NotificationRequest that preferences read."""
    return {"type": kind, "channels": list(channels), "recipient": EVERY_ADDRESS if recipient is None else recipient}


def user_settings(**fields: Any) -> dict[str, Any]:
    """UserSettings as the preferences stage sees them: through Avro and back, defaults filled in."""
    avro = AvroSerde()
    value = {"user_id": "user-42", "version": 1, "updated_at": NOW, **fields}
    return avro.decode(avro.encode(USER_SETTINGS, value), expected=USER_SETTINGS).value


def opted_out(kind: str, *channels: Channel) -> dict[str, Any]:
    return {kind: {"opted_in_channels": [], "opted_out_channels": list(channels)}}


# --- no settings ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [t for t in NOTIFICATION_TYPES if t not in CONSENT_REQUIRED])
def test_without_settings_auto_picks_the_first_channel_of_the_lanes_default_order(kind: str) -> None:
    first = DEFAULT_ORDER["critical" if kind in CRITICAL_TYPES else "bulk"][0]
    assert decide(request(kind), None, NOW) == PreferenceDecision(send=({"sms": SMS, "push": PUSH}[first],))


def test_the_default_orders_are_sms_first_for_critical_and_push_first_for_bulk() -> None:
    assert DEFAULT_ORDER == {"critical": ("sms", "push", "email"), "bulk": ("push", "email", "sms")}


def test_settings_with_every_field_at_its_default_decide_like_no_settings() -> None:
    for kind in NOTIFICATION_TYPES:
        assert decide(request(kind), user_settings(), NOW) == decide(request(kind), None, NOW)


# --- explicit channels ----------------------------------------------------------------------------------------------


def test_explicit_channels_are_all_sent_in_the_order_asked() -> None:
    decision = decide(request("portfolio", ("email", "sms", "email")), None, NOW)
    assert decision.send == (EMAIL_TARGET, SMS)


def test_an_explicit_channel_the_user_opted_out_of_is_suppressed() -> None:
    settings = user_settings(categories=opted_out("price_alert", "sms"))
    decision = decide(request("price_alert", ("sms", "push")), settings, NOW)
    assert decision.send == (PUSH,)
    assert decision.suppressed == (("sms", "opted_out"),)


def test_an_explicit_channel_without_any_address_is_suppressed_as_no_recipient() -> None:
    decision = decide(request("portfolio", ("email",), NO_ADDRESSES), None, NOW)
    assert decision == PreferenceDecision(send=(), suppressed=(("email", "no_recipient"),))


def test_a_channel_in_both_opt_in_and_opt_out_counts_as_opted_out() -> None:
    both = {"marketing": {"opted_in_channels": ["email"], "opted_out_channels": ["email"]}}
    decision = decide(request("marketing", ("email",)), user_settings(categories=both), NOW)
    assert decision.suppressed == (("email", "opted_out"),)


# --- opt-outs are per type ------------------------------------------------------------------------------------------


def test_marketing_goes_only_on_the_channels_the_user_consented_to() -> None:
    email_only = {"marketing": {"opted_in_channels": ["email"], "opted_out_channels": []}}
    decision = decide(request("marketing", ("sms", "email", "push")), user_settings(categories=email_only), NOW)
    assert decision.send == (EMAIL_TARGET,)
    assert decision.suppressed == (("sms", "no_consent"), ("push", "no_consent"))
    # auto: the first consented channel in the user's order; the skipped ones are reported
    auto = decide(request("marketing"), user_settings(categories=email_only), NOW)
    assert auto.send == (EMAIL_TARGET,) and auto.suppressed == (("push", "no_consent"),)


def test_marketing_without_a_consent_record_is_suppressed_on_every_channel() -> None:
    assert decide(request("marketing", ("sms", "email")), None, NOW) == PreferenceDecision(
        send=(), suppressed=(("sms", "no_consent"), ("email", "no_consent")))
    no_choice = user_settings(categories={"price_alert": {"opted_in_channels": ["sms"], "opted_out_channels": []}})
    assert decide(request("marketing"), no_choice, NOW).send == ()
    # consent for one type is not consent for another, and other types need none
    assert decide(request("portfolio", ("sms",)), None, NOW).send == (SMS,)


def test_consent_refusal_reads_only_the_category_settings_the_sender_has() -> None:
    stored = {"categories": {"marketing": {"opted_in_channels": ["sms", "email"], "opted_out_channels": ["email"]}}}
    assert consent_refusal(stored, "marketing", "sms") is None
    assert consent_refusal(stored, "marketing", "email") == "opted_out"
    assert consent_refusal(stored, "marketing", "push") == "no_consent"
    assert consent_refusal(None, "marketing", "sms") == "no_consent"
    assert consent_refusal(None, "price_alert", "sms") is None


def test_a_marketing_opt_out_leaves_otp_untouched() -> None:
    settings = user_settings(categories=opted_out("marketing", "sms", "email", "push"))
    assert decide(request("otp", ("sms",)), settings, NOW).send == (SMS,)
    assert decide(request("marketing", ("sms",)), settings, NOW).send == ()


# --- critical types are never dropped while an address exists -----------------------------------------------------


def test_a_critical_opt_out_is_honoured_while_another_requested_channel_remains() -> None:
    settings = user_settings(categories=opted_out("security", "sms"))
    decision = decide(request("security", ("sms", "email")), settings, NOW)
    assert decision.send == (EMAIL_TARGET,)
    assert decision.suppressed == (("sms", "opted_out"),)
    assert decision.opt_out_overridden is None


def test_a_critical_notification_opted_out_everywhere_goes_out_on_the_first_reachable_channel() -> None:
    settings = user_settings(categories=opted_out("otp", "sms", "email", "push"))
    decision = decide(request("otp", ("email", "sms")), settings, NOW)
    assert decision.send == (EMAIL_TARGET,)
    assert decision.opt_out_overridden == "email"
    assert decision.suppressed == (("sms", "opted_out"),)


def test_with_auto_a_critical_opt_out_override_skips_channels_without_an_address() -> None:
    settings = user_settings(categories=opted_out("transaction", "sms", "email", "push"))
    decision = decide(request("transaction", (), {**NO_ADDRESSES, "email": EMAIL}), settings, NOW)
    assert decision.send == (EMAIL_TARGET,)
    assert decision.opt_out_overridden == "email"


def test_a_bulk_notification_opted_out_everywhere_is_suppressed_entirely() -> None:
    settings = user_settings(categories=opted_out("portfolio", "sms", "email", "push"))
    decision = decide(request("portfolio"), settings, NOW)
    assert decision.send == ()
    assert decision.opt_out_overridden is None
    assert {channel for channel, _ in decision.suppressed} == set(CHANNELS)


# --- auto: channel preference ---------------------------------------------------------------------------------------


def test_auto_follows_the_users_channel_preference() -> None:
    decision = decide(request("otp"), user_settings(channel_preference=["email", "sms"]), NOW)
    assert decision == PreferenceDecision(send=(EMAIL_TARGET,))


def test_auto_skips_preferred_channels_that_are_opted_out_or_unreachable_and_says_why() -> None:
    settings = user_settings(channel_preference=["email", "push", "sms"], categories=opted_out("price_alert", "email"))
    decision = decide(request("price_alert", (), {**NO_ADDRESSES, "phone": PHONE}), settings, NOW)
    assert decision.send == (SMS,)
    assert decision.suppressed == (("email", "opted_out"), ("push", "no_recipient"))


def test_auto_falls_back_to_channels_the_preference_does_not_name_in_default_order() -> None:
    settings = user_settings(channel_preference=["email"])
    decision = decide(request("portfolio", (), {**NO_ADDRESSES, "phone": PHONE}), settings, NOW)
    assert decision.send == (SMS,)
    assert decision.suppressed == (("email", "no_recipient"), ("push", "no_recipient"))


def test_auto_with_no_address_anywhere_suppresses_every_channel_as_no_recipient() -> None:
    decision = decide(request("otp", (), NO_ADDRESSES), None, NOW)
    assert decision.send == ()
    assert decision.suppressed == tuple((channel, "no_recipient") for channel in DEFAULT_ORDER["critical"])


# --- addresses ------------------------------------------------------------------------------------------------------

CONTACTS = {"phone": CONTACT_PHONE, "email": CONTACT_EMAIL, "device_tokens": [CONTACT_TOKEN]}


def test_the_requests_addresses_win_over_the_users_contacts() -> None:
    decision = decide(request("security", ("sms", "email", "push")), user_settings(contacts=CONTACTS), NOW)
    assert decision.send == (SMS, EMAIL_TARGET, PUSH)


def test_missing_request_addresses_are_resolved_from_the_users_contacts() -> None:
    every_channel_no_address = request("security", ("sms", "email", "push"), NO_ADDRESSES)
    decision = decide(every_channel_no_address, user_settings(contacts=CONTACTS), NOW)
    assert decision.send == (
        ChannelTarget("sms", address=CONTACT_PHONE),
        ChannelTarget("email", address=CONTACT_EMAIL),
        ChannelTarget("push", device_tokens=(DeviceToken("android", "fcm-token-from-contacts"),)),
    )


def test_malformed_or_blank_addresses_count_as_absent() -> None:
    bad = {"phone": "0801 234", "email": " ", "device_tokens": [{"platform": "ios", "token": ""}]}
    decision = decide(request("otp", ("sms", "email", "push"), bad), user_settings(contacts=CONTACTS), NOW)
    assert [target.address for target in decision.send[:2]] == [CONTACT_PHONE, CONTACT_EMAIL]
    assert decision.send[2].device_tokens == (DeviceToken("android", "fcm-token-from-contacts"),)


# --- quiet hours ----------------------------------------------------------------------------------------------------

QUIET_LAGOS = {"timezone": "Africa/Lagos", "quiet_hours": {"start": "22:00", "end": "07:00"}}
LAGOS_MIDNIGHT = datetime(2025, 6, 1, 23, 0, tzinfo=UTC)  # 00:00 in Lagos (UTC+1)
LAGOS_SEVEN = datetime(2025, 6, 2, 6, 0, tzinfo=UTC)


@pytest.mark.parametrize("kind", BULK_TYPES)
def test_quiet_hours_defer_a_bulk_notification_until_they_end(kind: str) -> None:
    decision = decide(request(kind), user_settings(**QUIET_LAGOS, categories=CONSENTED), LAGOS_MIDNIGHT)
    assert decision.deferred_until == LAGOS_SEVEN
    assert decision.send == (PUSH,)  # what goes out when the window ends, unless settings change


@pytest.mark.parametrize("kind", sorted(CRITICAL_TYPES))
def test_quiet_hours_never_hold_a_critical_notification(kind: str) -> None:
    assert decide(request(kind), user_settings(**QUIET_LAGOS), LAGOS_MIDNIGHT).deferred_until is None


def test_outside_quiet_hours_nothing_is_deferred() -> None:
    assert decide(request("marketing"), user_settings(**QUIET_LAGOS), NOW).deferred_until is None


def test_a_suppressed_notification_is_not_deferred() -> None:
    settings = user_settings(**QUIET_LAGOS, categories=opted_out("marketing", "sms", "email", "push"))
    assert decide(request("marketing"), settings, LAGOS_MIDNIGHT).deferred_until is None


def test_quiet_hours_in_an_unknown_time_zone_are_taken_in_utc_with_a_note() -> None:
    settings = user_settings(timezone="Lagos", quiet_hours={"start": "22:00", "end": "07:00"})
    decision = decide(request("price_alert"), settings, LAGOS_MIDNIGHT)
    assert decision.deferred_until == datetime(2025, 6, 2, 7, 0, tzinfo=UTC)
    assert decision.notes == ("unknown time zone 'Lagos'; quiet hours taken in UTC",)


def test_malformed_quiet_hours_are_ignored_with_a_note() -> None:
    settings = user_settings(quiet_hours={"start": "10pm", "end": "07:00"})
    decision = decide(request("price_alert"), settings, LAGOS_MIDNIGHT)
    assert decision.deferred_until is None
    assert decision.send == (PUSH,)
    assert decision.notes == ("quiet hours '10pm'-'07:00' are not HH:MM; ignored",)


# --- bad input ------------------------------------------------------------------------------------------------------


def test_a_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        decide(request(), None, datetime(2025, 6, 1, 12, 0))


def test_a_type_intake_would_have_rejected_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown notification type"):
        decide(request("fax"), None, NOW)


# --- properties -----------------------------------------------------------------------------------------------------

channel_lists = st.lists(st.sampled_from(CHANNELS), max_size=4)
addresses = st.fixed_dictionaries({
    "phone": st.sampled_from([None, "", PHONE, "not-a-phone"]),
    "email": st.sampled_from([None, EMAIL, "not-an-email"]),
    "device_tokens": st.lists(st.sampled_from([TOKEN, {"platform": "web", "token": ""}]), max_size=2),
})
categories = st.dictionaries(
    st.sampled_from(NOTIFICATION_TYPES),
    st.fixed_dictionaries({"opted_in_channels": channel_lists, "opted_out_channels": channel_lists}),
)
settings_values = st.one_of(st.none(), st.fixed_dictionaries({
    "timezone": st.sampled_from(["UTC", "Africa/Lagos", "America/New_York", "Nowhere/Atlantis"]),
    "channel_preference": channel_lists,
    "categories": categories,
    "quiet_hours": st.one_of(st.none(), st.fixed_dictionaries({
        "start": st.sampled_from(["22:00", "00:00", "09:30"]), "end": st.sampled_from(["07:00", "22:00", "bad"])})),
    "contacts": addresses,
}))
moments = st.datetimes(datetime(2020, 1, 1), datetime(2030, 1, 1), timezones=st.just(UTC))


def reachable(recipient: dict[str, Any], settings: dict[str, Any] | None) -> set[str]:
    """Channels with a usable address in the request or the contacts (as the strategies above build them)."""
    found = set()
    for source in (recipient, (settings or {}).get("contacts") or NO_ADDRESSES):
        if source["phone"] == PHONE:
            found.add("sms")
        if source["email"] == EMAIL:
            found.add("email")
        if TOKEN in source["device_tokens"]:
            found.add("push")
    return found


@given(st.sampled_from(sorted(CRITICAL_TYPES)), channel_lists, addresses, settings_values, moments)
def test_a_critical_notification_always_goes_out_when_a_requested_channel_can_be_reached(
    kind: str, channels: list[Channel], recipient: dict[str, Any], settings: dict[str, Any] | None, now: datetime
) -> None:
    decision = decide(request(kind, tuple(channels), recipient), settings, now)
    candidates = set(channels) or set(CHANNELS)  # auto may use any channel
    if candidates & reachable(recipient, settings):
        assert decision.send != ()
    assert decision.deferred_until is None


@given(st.sampled_from(sorted(CRITICAL_TYPES)), channel_lists, addresses, settings_values, categories, moments)
def test_marketing_settings_never_change_a_critical_decision(
    kind: str, channels: list[Channel], recipient: dict[str, Any], settings: dict[str, Any] | None,
    other_categories: dict[str, Any], now: datetime,
) -> None:
    base = settings or {}
    marketing = other_categories.get("marketing", {"opted_in_channels": [], "opted_out_channels": list(CHANNELS)})
    marketing_changed = {**base, "categories": {**(base.get("categories") or {}), "marketing": marketing}}
    req = request(kind, tuple(channels), recipient)
    assert decide(req, settings, now) == decide(req, marketing_changed, now)


@given(st.sampled_from(NOTIFICATION_TYPES), channel_lists, addresses, settings_values, moments)
def test_every_decision_is_consistent(
    kind: str, channels: list[Channel], recipient: dict[str, Any], settings: dict[str, Any] | None, now: datetime
) -> None:
    decision = decide(request(kind, tuple(channels), recipient), settings, now)
    sent = [target.channel for target in decision.send]
    suppressed = [channel for channel, _ in decision.suppressed]
    out = set(((settings or {}).get("categories") or {}).get(kind, {}).get("opted_out_channels", []))
    assert len(set(sent)) == len(sent) and not set(sent) & set(suppressed)
    assert {reason for _, reason in decision.suppressed} <= set(get_args(SuppressionReason))
    assert set(sent) <= (set(channels) or set(CHANNELS))
    if not channels:
        assert len(sent) <= 1  # auto sends on one channel
    for target in decision.send:  # every target carries its address
        assert (target.address is not None) == (target.channel != "push")
        assert bool(target.device_tokens) == (target.channel == "push")
    if kind in CRITICAL_TYPES:
        assert decision.deferred_until is None
        assert set(sent) & out <= ({decision.opt_out_overridden} - {None})
    else:
        assert decision.opt_out_overridden is None
        assert not set(sent) & out
        if decision.deferred_until is not None:
            assert decision.send and decision.deferred_until > now
