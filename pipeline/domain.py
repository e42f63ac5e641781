"""The pipeline's vocabulary: notification types, lanes, channels, statuses, and recipient checks.

Plain data and pure functions only (no I/O), shared by the ingest API, the stages and the policies.
The values match the Avro enums of schemas/ (a test checks they agree).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final, Literal

NotificationType = Literal["otp", "transaction", "security", "price_alert", "portfolio", "marketing"]
Lane = Literal["critical", "bulk"]
Channel = Literal["sms", "email", "push"]

NOTIFICATION_TYPES: Final[tuple[NotificationType, ...]] = (
    "otp", "transaction", "security", "price_alert", "portfolio", "marketing")
LANES: Final[tuple[Lane, ...]] = ("critical", "bulk")
CHANNELS: Final[tuple[Channel, ...]] = ("sms", "email", "push")
PROVIDERS: Final[tuple[str, ...]] = ("twilio", "termii", "sendgrid", "mailgun", "fcm", "apns")
# One limit for every way in (API, client, intake, settings): a user id is the Kafka key and a table key.
MAX_USER_ID_LENGTH: Final = 128
MAX_ID_LENGTH: Final = 256  # idempotency keys, template ids, source services, correlation ids
# Worker stages, per lane except receipts and reconcile, which serve both lanes once (stages/context.LANE_FREE_STAGES).
STAGES: Final[tuple[str, ...]] = ("intake", "preferences", "routing", "sender", "retry", "receipts", "reconcile")

# A million-message marketing burst must never sit in front of an OTP: each lane has its own topics and groups.
LANE_OF_TYPE: Final[dict[NotificationType, Lane]] = {
    "otp": "critical",
    "security": "critical",
    "transaction": "critical",
    "price_alert": "bulk",
    "portfolio": "bulk",
    "marketing": "bulk",
}
CRITICAL_TYPES: Final[frozenset[NotificationType]] = frozenset(
    t for t, lane in LANE_OF_TYPE.items() if lane == "critical")

# DeliveryEvent.status values (schemas/DeliveryEvent.avsc)
EVENT_STATUSES: Final[tuple[str, ...]] = (
    "received", "duplicate", "suppressed", "deferred", "rate_limited", "expired", "invalid", "sending",
    "accepted", "delivered", "failed", "retry_scheduled", "unknown", "dead_lettered", "queued")

# deliveries.state values (infra/migrations/0001_initial.sql)
DELIVERY_STATES: Final[tuple[str, ...]] = (
    "queued", "sending", "accepted", "delivered", "failed", "retry_scheduled", "unknown", "dead_lettered",
    "suppressed", "expired")
FINAL_DELIVERY_STATES: Final[frozenset[str]] = frozenset(
    {"delivered", "failed", "dead_lettered", "suppressed", "expired"})


def lane_for(notification_type: str) -> Lane:
    """The lane of a notification type; ValueError for a type we do not know."""
    try:
        return LANE_OF_TYPE[notification_type]  # type: ignore[index]
    except KeyError:
        known = ", ".join(NOTIFICATION_TYPES)
        raise ValueError(f"unknown notification type {notification_type!r}; known: {known}") from None


# E.164: '+', a country code that does not start with 0, at most 15 digits in all.
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
# Deliberately simple: one '@', a dot in the domain, no spaces. The provider is the final judge.
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s.]{2,}$")


def is_e164(phone: str) -> bool:
    return bool(_E164.match(phone))


def is_email(address: str) -> bool:
    return len(address) <= 254 and bool(_EMAIL.match(address))


def text_flaws(value: Any, where: str = "") -> list[tuple[str, str]]:
    """Every string (map keys included, nested records and lists too) that cannot be stored or sent, as
    (where, "contains ..."): a NUL character (PostgreSQL text cannot hold one, and no provider would deliver one)
    or a lone surrogate (not Unicode at all: it has no UTF-8 encoding)."""
    if isinstance(value, str):
        flaw = _text_flaw(value)
        return [(where or "value", f"contains {flaw}")] if flaw else []
    found: list[tuple[str, str]] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            at = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and (flaw := _text_flaw(key)):
                found.append((where or "value", f"has a key that contains {flaw}"))
                at = f"{where}.(key)" if where else "(key)"
            found += text_flaws(item, at)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found += text_flaws(item, f"{where}[{index}]")
    return found


def _text_flaw(text: str) -> str | None:
    if "\x00" in text:
        return "a NUL character"
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "a lone surrogate (not valid Unicode)"
    return None
