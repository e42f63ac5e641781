"""Digest policy: which notifications wait for a digest, when a digest window ends, and what one digest says.

Rules:
- A user chooses a digest for all bulk-lane types (UserSettings.digest) or per type (categories[type].digest,
  which wins, `none` included: "instant for this type"). Critical types (otp, transaction, security) are never
  digested, whatever the settings say.
- A digest is an email: an item is digested only when the user can be emailed for its type (an address in the
  request or the contacts, email not opted out, consent where the type needs it). Otherwise it goes out at once
  as if no digest were chosen. A digested item is answered by the digest alone, on every channel it asked for.
- Windows end, in the user's time zone: hourly at the top of each local hour (in zones whose offset is not whole
  hours too, e.g. Asia/Kolkata, America/St_Johns), daily at 08:00, weekly on Monday at 08:00. Local times are
  resolved by the zone database at each instant, so a window is correct across DST changes: a spring-forward day
  has one hourly window fewer, a fall-back day one more, and 08:00 is 08:00 on both sides.
- A digest lists the items that are still live: one whose own expiry passed before the window ended is left out
  and reported `expired`; of items sharing a collapse key (latest-wins), only the newest is listed and the others
  are `superseded`; an item whose template cannot be rendered is `failed` with the template's error code.
- The digest's notification id and idempotency key derive from (user, type, window end): a release repeated
  after a crash is the same notification, and the pipeline's unique keys send it once.

Pure functions over plain data.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any, Final, Literal, cast

from pipeline.domain import CRITICAL_TYPES
from pipeline.policy.quiet_hours import known_timezone

Frequency = Literal["hourly", "daily", "weekly"]
FREQUENCIES: Final[tuple[Frequency, ...]] = ("hourly", "daily", "weekly")
DAILY_AT: Final = time(8, 0)  # local: a daily or weekly digest is read with the morning's first look at the phone
WEEKLY_ON: Final = 0  # Monday
MAX_LISTED: Final = 50  # items written out in one email; the rest are counted ("and 12 more")
NAMESPACE: Final = uuid.UUID("5b0c3f0e-7d1a-4c59-9a53-6f1d2a7c4e10")  # digest notification ids (uuid5)
TYPE_NAMES: Final[Mapping[str, tuple[str, str]]] = {  # singular, plural
    "price_alert": ("price alert", "price alerts"), "portfolio": ("portfolio update", "portfolio updates"),
    "marketing": ("offer", "offers"),
}


def frequency_for(settings: Mapping[str, Any] | None, notification_type: str) -> Frequency | None:
    """The digest frequency that applies to `notification_type` for a user with `settings` (None: send at once)."""
    if notification_type in CRITICAL_TYPES or not settings:
        return None
    category: Mapping[str, Any] = (settings.get("categories") or {}).get(notification_type) or {}
    choice = category.get("digest") or settings.get("digest") or "none"
    return cast(Frequency, choice) if choice in FREQUENCIES else None


def window_end(now_utc: datetime, timezone: str, frequency: Frequency) -> datetime:
    """The end (UTC) of the `frequency` window that `now_utc` falls in: the first boundary strictly after it.
    An unknown time zone takes UTC."""
    if now_utc.utcoffset() is None:
        raise ValueError("now_utc must be a timezone-aware datetime")
    zone = known_timezone(timezone) or UTC
    now = now_utc.astimezone(UTC)
    if frequency == "hourly":
        # Every zone's offset is a whole number of quarter hours today: a local top of the hour is a UTC quarter
        # hour, and one comes within 75 minutes whatever the clock does.
        step = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0)
        for _ in range(12):
            step += timedelta(minutes=15)
            local = step.astimezone(zone)
            if local.minute == 0 and local.second == 0:
                return step
        raise AssertionError(f"no local hour start within 3 h in {timezone}")  # pragma: no cover
    today = now.astimezone(zone).date()
    for days in range(9):
        day = today + timedelta(days=days)
        if frequency == "weekly" and day.weekday() != WEEKLY_ON:
            continue
        # fold=0 for a repeated 08:00 (never in practice): the earlier one, so a window is not stretched
        candidate = datetime.combine(day, DAILY_AT, tzinfo=zone).astimezone(UTC)
        if candidate > now:
            return candidate
    raise AssertionError("no daily boundary within 9 days")  # pragma: no cover


def digest_id(user_id: str, notification_type: str, end: datetime) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{user_id}\n{notification_type}\n{end.astimezone(UTC).isoformat()}"))


@dataclass(frozen=True, slots=True)
class Item:
    """One held notification as the digest sees it: its rendered email text, or the error that prevents one."""

    notification_id: str
    created_at: datetime
    expires_at: datetime | None
    collapse_key: str | None
    subject: str | None
    body: str | None
    error_code: str | None = None


@dataclass(frozen=True, slots=True)
class Window:
    user_id: str
    notification_type: str
    frequency: Frequency
    end: datetime
    address: str  # the newest item's email address


@dataclass(frozen=True, slots=True)
class Digest:
    """What to do with one window: the email (when `included` is not empty) and every item's answer."""

    notification_id: str
    idempotency_key: str
    window: Window
    subject: str
    body: str
    included: tuple[str, ...]
    expired: tuple[str, ...] = ()
    superseded: tuple[str, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()  # (notification id, error code)


def _newest_per_collapse_key(items: Sequence[Item]) -> tuple[list[Item], list[Item]]:
    """(kept, superseded): of items with the same collapse key only the newest is kept."""
    newest: dict[str, Item] = {}
    for item in items:
        if item.collapse_key is None:
            continue
        held = newest.get(item.collapse_key)
        if held is None or (item.created_at, item.notification_id) > (held.created_at, held.notification_id):
            newest[item.collapse_key] = item
    kept = [i for i in items if i.collapse_key is None or newest[i.collapse_key] is i]
    return kept, [i for i in items if i not in kept]


def _line(number: int, item: Item) -> str:
    subject = (item.subject or "").strip()
    body = " ".join((item.body or "").split())
    return f"{number}. {subject}: {body}" if subject and subject not in body else f"{number}. {body or subject}"


def plan(window: Window, items: Iterable[Item], now: datetime) -> Digest:
    """The digest of `window` at `now` from its held items (in any order; listed oldest first)."""
    ordered = sorted(items, key=lambda i: (i.created_at, i.notification_id))
    expired = [i for i in ordered if i.expires_at is not None and i.expires_at <= now]
    failed = [i for i in ordered if i not in expired and i.error_code is not None]
    live = [i for i in ordered if i not in expired and i not in failed]
    kept, superseded = _newest_per_collapse_key(live)
    singular, plural = TYPE_NAMES.get(window.notification_type, ("notification", "notifications"))
    count = len(kept)
    what = singular if count == 1 else plural
    subject = f"Your {window.frequency} digest: {count} {what}"
    lines = [_line(n, item) for n, item in enumerate(kept[:MAX_LISTED], start=1)]
    if count > MAX_LISTED:
        lines.append(f"... and {count - MAX_LISTED} more in the app.")
    body = "\n".join([f"{subject}.", "", *lines])
    end = window.end.astimezone(UTC)
    return Digest(
        notification_id=digest_id(window.user_id, window.notification_type, end),
        idempotency_key=f"digest:{window.frequency}:{end.isoformat()}",
        window=window, subject=subject, body=body,
        included=tuple(i.notification_id for i in kept),
        expired=tuple(i.notification_id for i in expired),
        superseded=tuple(i.notification_id for i in superseded),
        failed=tuple((i.notification_id, i.error_code or "template_error") for i in failed),
    )
