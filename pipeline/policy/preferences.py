"""Preferences policy: for an accepted request and the user's settings, which channels and addresses to send on,
which channels are suppressed and why, and whether quiet hours defer it.

Rules:
- Opt-outs are per notification type and channel (UserSettings.categories[type].opted_out_channels), so a
  marketing opt-out never touches otp, security or transaction.
- Marketing needs consent: it goes only on channels the user opted into (categories.marketing.opted_in_channels);
  any other channel is suppressed `no_consent`, and without settings or a marketing choice every one is. An
  opt-out wins over an opt-in (a channel in both is `opted_out`). The sender asks again just before it claims a
  marketing send (`consent_refusal`), so a consent withdrawn while the message waited in a queue is honoured.
- Critical types (otp, security, transaction) are never suppressed entirely: an opt-out is honoured while another
  candidate channel can still be sent on; when none can, the first opted-out candidate that has an address is
  used anyway and named in `opt_out_overridden` (a stale OTP or an unseen fraud alert costs the user more than
  an unwanted SMS). Candidates are the requested channels, or for auto every channel in auto order.
- Quiet hours (UserSettings.quiet_hours in UserSettings.timezone) defer non-critical types until the window ends;
  critical types go through. `send` is then what would be sent at `deferred_until`; the stage re-decides then,
  since settings may have changed. Nothing to send means nothing to defer.
- channels=[] (auto) sends on one channel: the first in auto order that is not opted out and has an address.
  Auto order is UserSettings.channel_preference, followed by the channels it leaves out in the lane's default
  order (channel_preference orders; opting out is what categories are for). Skipped channels before the chosen
  one are reported in `suppressed`; later ones were not needed and are not.
- Explicit channels are each sent on unless opted out or without an address.
- Addresses: the request's recipient field first, else the user's contacts (UserSettings.contacts), per channel;
  malformed or blank ones count as absent. Push goes to the request's usable device tokens, else the contacts'.
- No settings at all: nothing opted out, no quiet hours, default order.
- An unknown time zone takes quiet hours in UTC, and malformed quiet hours are ignored; both leave a note.

- Digests (pipeline/policy/digests): a non-critical type the user chose a digest for, and can be emailed for, is
  not sent: `digest` says which window it waits for and where the email goes; `send` and `suppressed` are empty
  (the digest answers every channel). Quiet hours then apply to the window's end, never to the item itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

from pipeline.domain import CHANNELS, CRITICAL_TYPES, Channel, Lane, lane_for
from pipeline.policy import digests
from pipeline.policy.intake import DeviceToken, usable_device_tokens, usable_email, usable_phone
from pipeline.policy.quiet_hours import known_timezone, parse_clock_time, quiet_until

SuppressionReason = Literal["opted_out", "no_consent", "no_recipient"]
# Types sent only on channels the user consented to (opted_in_channels): unsolicited marketing is unlawful in
# most markets (GDPR/PECR, NDPR, TCPA), while the user's own alerts are the service they signed up for.
CONSENT_REQUIRED: Final[frozenset[str]] = frozenset({"marketing"})

# Critical: the channel most likely to arrive fast and be read first. Bulk: the cheapest that is still seen.
DEFAULT_ORDER: Final[dict[Lane, tuple[Channel, ...]]] = {
    "critical": ("sms", "push", "email"),
    "bulk": ("push", "email", "sms"),
}


@dataclass(frozen=True)
class ChannelTarget:
    """One channel to send on and where: `address` is the phone (sms) or email address (email); push has
    `device_tokens` instead."""

    channel: Channel
    address: str | None = None
    device_tokens: tuple[DeviceToken, ...] = ()


@dataclass(frozen=True)
class DigestHold:
    """Hold the notification for the user's `frequency` digest whose window ends at `window_end` (UTC)."""

    frequency: digests.Frequency
    window_end: datetime
    address: str


@dataclass(frozen=True)
class PreferenceDecision:
    send: tuple[ChannelTarget, ...]
    suppressed: tuple[tuple[Channel, SuppressionReason], ...] = ()
    deferred_until: datetime | None = None  # quiet hours: hold until this instant (UTC), then decide again
    opt_out_overridden: Channel | None = None  # critical, sent despite an opt-out because no other channel could
    notes: tuple[str, ...] = ()  # settings that could not be applied as written
    digest: DigestHold | None = None  # held for a digest email instead of sent


def decide(request: Mapping[str, Any], user_settings: Mapping[str, Any] | None, now: datetime) -> PreferenceDecision:
    """Decide delivery for a request that intake accepted. `now` must be timezone-aware; a type intake would have
    rejected raises ValueError."""
    if now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    notification_type: str = request["type"]
    lane = lane_for(notification_type)
    settings: Mapping[str, Any] = user_settings or {}
    opted_out = _opted_out(settings, notification_type)
    targets = _targets(request.get("recipient"), settings.get("contacts"))
    requested = _unique(request.get("channels") or ())
    auto = not requested
    candidates = _auto_order(settings, lane) if auto else requested

    send: list[ChannelTarget] = []
    suppressed: list[tuple[Channel, SuppressionReason]] = []
    for channel in candidates:
        refusal = consent_refusal(settings, notification_type, channel)
        if refusal is not None:
            suppressed.append((channel, refusal))
        elif channel not in targets:
            suppressed.append((channel, "no_recipient"))
        else:
            send.append(targets[channel])
            if auto:
                break

    overridden: Channel | None = None
    if not send and notification_type in CRITICAL_TYPES:
        overridden = next((c for c in candidates if c in opted_out and c in targets), None)
        if overridden is not None:
            send.append(targets[overridden])
            suppressed.remove((overridden, "opted_out"))

    deferred_until: datetime | None = None
    notes: tuple[str, ...] = ()
    hold = _digest_hold(request, settings, targets, now)
    if hold is not None:
        return PreferenceDecision((), (), None, None, notes, hold)
    if send and notification_type not in CRITICAL_TYPES:
        deferred_until, notes = _quiet_hours(settings, now)
    return PreferenceDecision(tuple(send), tuple(suppressed), deferred_until, overridden, notes)


def _digest_hold(request: Mapping[str, Any], settings: Mapping[str, Any], targets: Mapping[Channel, ChannelTarget],
                 now: datetime) -> DigestHold | None:
    notification_type: str = request["type"]
    frequency = digests.frequency_for(settings, notification_type)
    email = targets.get("email")
    if (frequency is None or email is None or email.address is None
            or consent_refusal(settings, notification_type, "email") is not None):
        return None
    end = digests.window_end(now, settings.get("timezone") or "UTC", frequency)
    quiet_end, _notes = _quiet_hours(settings, end)  # a digest due in quiet hours waits for their end
    return DigestHold(frequency, quiet_end or end, email.address)


def _unique(channels: Iterable[Channel]) -> tuple[Channel, ...]:
    """Known channels, first occurrence kept, in order."""
    return tuple(dict.fromkeys(channel for channel in channels if channel in CHANNELS))


def consent_refusal(settings: Mapping[str, Any] | None, notification_type: str,
                    channel: str) -> SuppressionReason | None:
    """Why the user's own choices forbid `channel` for `notification_type` (None: they do not). Settings as in
    UserSettings; only `categories` is read, so the sender can pass the stored category settings alone."""
    settings = settings or {}
    if channel in _opted_out(settings, notification_type):
        return "opted_out"
    if notification_type in CONSENT_REQUIRED and channel not in _opted_in(settings, notification_type):
        return "no_consent"
    return None


def _opted_in(settings: Mapping[str, Any], notification_type: str) -> frozenset[Channel]:
    category: Mapping[str, Any] = (settings.get("categories") or {}).get(notification_type) or {}
    return frozenset(_unique(category.get("opted_in_channels") or ()))


def _opted_out(settings: Mapping[str, Any], notification_type: str) -> frozenset[Channel]:
    category: Mapping[str, Any] = (settings.get("categories") or {}).get(notification_type) or {}
    return frozenset(_unique(category.get("opted_out_channels") or ()))


def _auto_order(settings: Mapping[str, Any], lane: Lane) -> tuple[Channel, ...]:
    return _unique((*(settings.get("channel_preference") or ()), *DEFAULT_ORDER[lane]))


def _targets(recipient: Mapping[str, Any] | None, contacts: Mapping[str, Any] | None) -> dict[Channel, ChannelTarget]:
    """Where each channel can reach the user: the request's address first, else the user's contacts."""
    targets: dict[Channel, ChannelTarget] = {}
    phone = usable_phone(recipient) or usable_phone(contacts)
    if phone is not None:
        targets["sms"] = ChannelTarget("sms", address=phone)
    email = usable_email(recipient) or usable_email(contacts)
    if email is not None:
        targets["email"] = ChannelTarget("email", address=email)
    tokens = usable_device_tokens(recipient) or usable_device_tokens(contacts)
    if tokens:
        targets["push"] = ChannelTarget("push", device_tokens=tokens)
    return targets


def _quiet_hours(settings: Mapping[str, Any], now: datetime) -> tuple[datetime | None, tuple[str, ...]]:
    """When the user's quiet hours end, if `now` is inside them; and notes on settings that could not be used."""
    quiet: Mapping[str, Any] | None = settings.get("quiet_hours")
    if not quiet:
        return None, ()
    start, end = quiet.get("start"), quiet.get("end")
    if not (isinstance(start, str) and isinstance(end, str) and _is_clock_time(start) and _is_clock_time(end)):
        return None, (f"quiet hours {start!r}-{end!r} are not HH:MM; ignored",)
    timezone: str = settings.get("timezone") or "UTC"
    notes = () if known_timezone(timezone) else (f"unknown time zone {timezone!r}; quiet hours taken in UTC",)
    return quiet_until(now, timezone, start, end), notes


def _is_clock_time(text: str) -> bool:
    try:
        parse_clock_time(text)
    except ValueError:
        return False
    return True
