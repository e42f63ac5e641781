"""Intake policy: validate a decoded NotificationRequest, expire stale ones, and key it for deduplication.

Recipients: a channel the request names explicitly (channels=[...]) must come with its address in the request:
sms an E.164 phone, email an email address, push at least one device token. With channels=[] ("auto") no address
is required here, because the preferences stage resolves them from the user's contacts (UserSettings.contacts)
and reports `no_recipient` when there are none, so nothing is lost silently. An address that is present must be
well-formed whichever channels are asked for; an empty or blank string counts as absent.

Duplicates need state (what was seen, when), which the stage keeps in a table with a time-to-live; this module
only decides, from that table's entry, whether it still counts (is_duplicate).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal

from pipeline.domain import (
    CHANNELS,
    MAX_ID_LENGTH,
    MAX_USER_ID_LENGTH,
    NOTIFICATION_TYPES,
    is_e164,
    is_email,
    text_flaws,
)

PLATFORMS: Final[tuple[str, ...]] = ("android", "ios", "web")  # Avro enum Platform

IntakeOutcome = Literal["accept", "invalid", "expired"]


@dataclass(frozen=True)
class IntakeDecision:
    """What intake does with a request; `reasons` says why when the outcome is "invalid"."""

    outcome: IntakeOutcome
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceToken:
    platform: str  # android, ios or web
    token: str


def decide(request: Mapping[str, Any], now: datetime) -> IntakeDecision:
    """Invalid (with every problem) before expired: an invalid request's expires_at cannot be trusted."""
    found = problems(request)
    if found:
        return IntakeDecision("invalid", tuple(found))
    if is_expired(request, now):
        return IntakeDecision("expired")
    return IntakeDecision("accept")


def problems(request: Mapping[str, Any]) -> list[str]:
    """Everything wrong with a decoded NotificationRequest, one short sentence each; empty when it is valid.

    Defensive about shapes, so a value that did not come from the Avro decoder (e.g. the ingest API's JSON)
    gets problems rather than exceptions.
    """
    found: list[str] = []
    if not isinstance(request.get("notification_id"), uuid.UUID):
        found.append("notification_id is not a UUID")
    found += _identifier_problems(request, "user_id", MAX_USER_ID_LENGTH)
    found += _identifier_problems(request, "idempotency_key", MAX_ID_LENGTH)
    if request.get("type") not in NOTIFICATION_TYPES:
        found.append(f"unknown type {request.get('type')!r}; known: {', '.join(NOTIFICATION_TYPES)}")
    found += _recipient_problems(request)
    found += _content_problems(request)
    found += _time_problems(request)
    found += [f"{where} {flaw}" for where, flaw in text_flaws(request)]
    return found


def is_expired(request: Mapping[str, Any], now: datetime) -> bool:
    """True once `now` (timezone-aware) has reached expires_at; a request without expires_at never expires."""
    expires_at: datetime | None = request.get("expires_at")
    return expires_at is not None and expires_at <= now


def dedup_key(request: Mapping[str, Any]) -> str:
    """The request's identity for deduplication: (user_id, type, idempotency_key), as the database's unique key.

    A JSON array, so parts containing any separator cannot collide ("a|b", "c" vs "a", "b|c"). The format is
    stored in the dedup table: changing it forgets every key seen so far.
    """
    parts = [request.get("user_id"), request.get("type"), request.get("idempotency_key")]
    return json.dumps(parts, ensure_ascii=False, separators=(",", ":"))


def is_duplicate(seen_at: datetime | None, now: datetime, window: timedelta) -> bool:
    """Whether a dedup table entry written at `seen_at` still makes a request a duplicate at `now`.

    An entry counts for `window` after it was written ([seen_at, seen_at + window)), then as never seen. An entry
    from the future (clocks of two workers disagree) counts: wrongly dropping is visible, sending twice is not
    undoable.
    """
    if window <= timedelta(0):
        raise ValueError(f"dedup window must be positive, got {window}")
    return seen_at is not None and now - seen_at < window


def usable_phone(recipient: Mapping[str, Any] | None) -> str | None:
    """The recipient's phone if it is E.164; None when absent, blank or malformed."""
    phone = _present((recipient or {}).get("phone"))
    return phone if phone is not None and is_e164(phone) else None


def usable_email(recipient: Mapping[str, Any] | None) -> str | None:
    """The recipient's email address if it is well-formed; None when absent, blank or malformed."""
    email = _present((recipient or {}).get("email"))
    return email if email is not None and is_email(email) else None


def usable_device_tokens(recipient: Mapping[str, Any] | None) -> tuple[DeviceToken, ...]:
    """The recipient's device tokens that can be sent to (known platform, non-blank token), in their order."""
    tokens = (recipient or {}).get("device_tokens")
    if not isinstance(tokens, Sequence):
        return ()
    return tuple(
        DeviceToken(entry["platform"], entry["token"])
        for entry in tokens
        if isinstance(entry, Mapping) and entry.get("platform") in PLATFORMS and _present(entry.get("token"))
    )


def _present(value: object) -> str | None:
    """A string with something in it, else None (producers send "" as well as null for "none")."""
    return value if isinstance(value, str) and value.strip() else None


def _identifier_problems(request: Mapping[str, Any], field: str, max_length: int) -> list[str]:
    value = request.get(field)
    if not isinstance(value, str) or not value.strip():
        return [f"{field} is empty"]
    if len(value) > max_length:
        return [f"{field} is longer than {max_length} characters"]
    return []


def _recipient_problems(request: Mapping[str, Any]) -> list[str]:
    channels = request.get("channels")
    if not isinstance(channels, Sequence) or isinstance(channels, str):
        return ["channels is not a list"]
    unknown = [channel for channel in channels if channel not in CHANNELS]
    if unknown:
        return [f"unknown channel {channel!r}; known: {', '.join(CHANNELS)}" for channel in unknown]
    recipient = request.get("recipient")
    if recipient is not None and not isinstance(recipient, Mapping):
        return ["recipient is not a record"]
    found: list[str] = []
    phone, email = _present((recipient or {}).get("phone")), _present((recipient or {}).get("email"))
    # A malformed address is a producer bug whether or not its channel was asked for; auto may pick it.
    if phone is not None and not is_e164(phone):
        found.append("recipient.phone is not an E.164 number")
    if email is not None and not is_email(email):
        found.append("recipient.email is not a valid email address")
    # A missing address is not a problem here: preferences resolves it from the user's contacts (UserSettings),
    # which intake cannot see, and suppresses the channel (`no_recipient`) when the user has none either.
    return found


def _content_problems(request: Mapping[str, Any]) -> list[str]:
    template_id = _present(request.get("template_id"))
    content = request.get("content")
    if content is not None and not isinstance(content, Mapping):
        return ["content is not a record"]
    if template_id is not None and content is not None:
        return ["both template_id and content given; give one"]
    if template_id is None and content is None:
        return ["neither template_id nor content given"]
    if content is not None and _present(content.get("body")) is None:
        return ["content.body is empty"]
    return []


def _time_problems(request: Mapping[str, Any]) -> list[str]:
    created_at, expires_at = request.get("created_at"), request.get("expires_at")
    found: list[str] = []
    if not _is_aware_datetime(created_at):
        found.append("created_at is not a timezone-aware datetime")
    if expires_at is not None and not _is_aware_datetime(expires_at):
        found.append("expires_at is not a timezone-aware datetime")
    if not found and expires_at is not None and expires_at < created_at:
        found.append("expires_at is before created_at")
    return found


def _is_aware_datetime(value: object) -> bool:
    return isinstance(value, datetime) and value.utcoffset() is not None
