"""The delivery log as people read it (the read API and the ops console): pure decisions, no I/O.

- `parse_list_query`: the query string of GET /v1/notifications, every wrong parameter named (422).
- `encode_cursor` / `decode_cursor`: an opaque keyset position (created_at, notification_id) of the stable order
  created_at DESC, notification_id DESC; a page never skips or repeats a row however many rows arrive meanwhile.
- `request_view`: what the request held, from the stored DeliveryTask; an OTP's parameters and content are never
  shown (the code is a credential), nor a device token (only its platform and fingerprint, as 0009 logs them).
- `timeline`: received, every state change and every provider attempt, in order. State changes come from
  `delivery_transitions` (recorded by triggers since migration 0011); a delivery without recorded changes (older
  rows) gets them derived from its own timestamps (created, accepted, final), marked `derived`.
"""

from __future__ import annotations

import base64
import datetime
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pipeline.domain import (
    CHANNELS,
    DELIVERY_STATES,
    FINAL_DELIVERY_STATES,
    MAX_USER_ID_LENGTH,
    NOTIFICATION_TYPES,
    text_flaws,
)
from pipeline.policy.push import fingerprint

DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 200
MAX_CURSOR_LENGTH: Final = 200
LIST_PARAMETERS: Final = ("user_id", "type", "state", "channel", "since", "until", "limit", "cursor")
REDACTED: Final = "[redacted: an OTP's code is a credential]"
REDACTED_TYPES: Final = frozenset({"otp"})
_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
# RFC 3339 with an offset (a naive time would be guessed).
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


@dataclass(frozen=True)
class Cursor:
    created_at: datetime.datetime
    notification_id: uuid.UUID


@dataclass(frozen=True)
class ListQuery:
    user_id: str | None = None
    notification_type: str | None = None
    state: str | None = None
    channel: str | None = None
    since: datetime.datetime | None = None
    until: datetime.datetime | None = None
    limit: int = DEFAULT_LIMIT
    cursor: Cursor | None = None


class InvalidQuery(ValueError):
    """Parameters that are not a valid query: (parameter, problem) for each."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {problem}" for field, problem in problems))
        self.problems = list(problems)


def encode_cursor(created_at: datetime.datetime, notification_id: str | uuid.UUID) -> str:
    micros = (created_at - _EPOCH) // datetime.timedelta(microseconds=1)  # exact, unlike a float timestamp
    raw = f"{micros}|{uuid.UUID(str(notification_id)).hex}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor | None:
    """The position a cursor names; None for anything that is not one of ours."""
    if not text or len(text) > MAX_CURSOR_LENGTH or not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
        micros_text, _, hex_id = raw.partition("|")
        if not re.fullmatch(r"-?\d{1,20}", micros_text) or not re.fullmatch(r"[0-9a-f]{32}", hex_id):
            return None
        moment = _EPOCH + datetime.timedelta(microseconds=int(micros_text))
        return Cursor(moment, uuid.UUID(hex_id))
    except (ValueError, OverflowError):
        return None


def parse_instant(text: str) -> datetime.datetime | None:
    if not _RFC3339.match(text):
        return None
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)  # Python keeps microseconds
    try:
        return datetime.datetime.fromisoformat(text.upper().replace(" ", "T").replace("Z", "+00:00"))
    except ValueError:
        return None


def parse_list_query(params: Mapping[str, Sequence[str]]) -> ListQuery:
    """The query of GET /v1/notifications; InvalidQuery naming every wrong parameter (unknown or repeated ones
    too: a typo must not silently widen a query)."""
    problems: list[tuple[str, str]] = []
    values: dict[str, str] = {}
    for name, given in params.items():
        if name not in LIST_PARAMETERS:
            problems.append((name, f"unknown parameter; known: {', '.join(LIST_PARAMETERS)}"))
        elif len(given) != 1:
            problems.append((name, "given more than once"))
        elif flaws := text_flaws(given[0], name):
            problems.extend(flaws)
        else:
            values[name] = given[0]
    user_id = values.get("user_id")
    if user_id is not None and not (user_id.strip() and len(user_id) <= MAX_USER_ID_LENGTH):
        problems.append(("user_id", f"must be 1 to {MAX_USER_ID_LENGTH} characters, not blank"))
    for name, allowed in (("type", NOTIFICATION_TYPES), ("state", DELIVERY_STATES), ("channel", CHANNELS)):
        if name in values and values[name] not in allowed:
            problems.append((name, f"must be one of {', '.join(allowed)}"))
    instants: dict[str, datetime.datetime | None] = {}
    for name in ("since", "until"):
        instants[name] = None
        if name in values:
            instants[name] = parse_instant(values[name])
            if instants[name] is None:
                problems.append((name, "must be an RFC 3339 date-time with offset, e.g. 2026-12-03T09:00:00Z"))
    since, until = instants["since"], instants["until"]
    if since is not None and until is not None and since >= until:
        problems.append(("until", "must be later than since"))
    limit = DEFAULT_LIMIT
    if "limit" in values:
        text = values["limit"]
        if not re.fullmatch(r"\d{1,4}", text) or not 1 <= int(text) <= MAX_LIMIT:
            problems.append(("limit", f"must be an integer from 1 to {MAX_LIMIT}"))
        else:
            limit = int(text)
    cursor = None
    if "cursor" in values:
        cursor = decode_cursor(values["cursor"])
        if cursor is None:
            problems.append(("cursor", "not a cursor this API gave (pass next_cursor of the previous page as is)"))
    if problems:
        raise InvalidQuery(problems)
    return ListQuery(user_id, values.get("type"), values.get("state"), values.get("channel"), since, until, limit,
                     cursor)


def _mask(value: Any) -> Any:
    return {k: REDACTED for k in value} if isinstance(value, Mapping) else REDACTED


def request_view(notification_type: str, task: Mapping[str, Any] | None,
                 addresses: Mapping[str, str | None]) -> dict[str, Any] | None:
    """What the accepted request asked to send (template or content, locale) and where (per channel), from a
    stored DeliveryTask; None when no delivery row holds a task (suppressed early, a duplicate, a digest item)."""
    if task is None:
        return None
    secret = notification_type in REDACTED_TYPES
    content = task.get("content")
    params = dict(task.get("template_params") or {})
    devices = [{"platform": str(d.get("platform")), "fingerprint": fingerprint(str(d.get("token", "")))}
               for d in task.get("device_tokens") or []]
    return {
        "template_id": task.get("template_id"),
        "template_params": _mask(params) if secret else params,
        "content": None if content is None else {
            "subject": content.get("subject"), "body": REDACTED if secret else content.get("body")},
        "locale": task.get("locale"),
        "recipients": {**{channel: address for channel, address in addresses.items() if channel != "push"},
                       **({"push": devices} if "push" in addresses else {})},
        "redacted": secret,
    }


@dataclass(frozen=True)
class Entry:
    """One line of a notification's timeline."""

    at: datetime.datetime
    kind: str  # received | state | attempt
    channel: str | None
    to_state: str
    from_state: str | None = None
    attempt: int | None = None
    provider: str | None = None
    code: str | None = None
    detail: str | None = None
    derived: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(), "kind": self.kind, "channel": self.channel, "from_state": self.from_state,
                "to_state": self.to_state, "attempt": self.attempt, "provider": self.provider,
                "error_code": self.code, "detail": self.detail, "derived": self.derived}


def timeline(received_at: datetime.datetime, deliveries: Sequence[Mapping[str, Any]],
             transitions: Sequence[Mapping[str, Any]], attempts: Sequence[Mapping[str, Any]]) -> list[Entry]:
    """Received, then every state change and provider attempt in time order (ties: recorded order)."""
    entries = [Entry(received_at, "received", None, "received")]
    recorded = {t["channel"] for t in transitions}
    for t in transitions:
        entries.append(Entry(t["changed_at"], "state", t["channel"], t["to_state"], t["from_state"],
                             t["attempt_count"] or None, t["provider"], t["error_code"], t.get("error_message")))
    for d in deliveries:
        if d["channel"] in recorded:
            continue
        entries.extend(_derived(d))
    for a in attempts:
        entries.append(Entry(a["started_at"], "attempt", a["channel"], a["outcome"], None, a["attempt_no"],
                             a["provider"], a["error_code"],
                             None if a.get("latency_ms") is None else f"{a['latency_ms']} ms"))
    indexed = sorted(enumerate(entries), key=lambda pair: (pair[1].at, pair[0]))
    return [entry for _, entry in indexed]


def _derived(d: Mapping[str, Any]) -> list[Entry]:
    """A delivery's state changes as its timestamps tell them (rows written before 0011 recorded changes)."""
    channel, state = d["channel"], d["state"]
    first = "queued" if state not in FINAL_DELIVERY_STATES or d.get("final_at") != d.get("created_at") else state
    out = [Entry(d["created_at"], "state", channel, first, None, derived=True)]
    previous = first
    if d.get("accepted_at") is not None and first != state:
        out.append(Entry(d["accepted_at"], "state", channel, "accepted", previous, d.get("attempt_count") or None,
                         d.get("provider"), derived=True))
        previous = "accepted"
    if state != previous:
        at = d.get("final_at") or d["updated_at"]
        out.append(Entry(at, "state", channel, state, previous, d.get("attempt_count") or None, d.get("provider"),
                         d.get("last_error_code"), derived=True))
    return out
