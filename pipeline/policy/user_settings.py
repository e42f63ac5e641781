"""What a settings write may contain: the body of `PUT /v1/users/{id}/settings`, checked and made a UserSettings.

A PUT replaces the user's settings whole; an absent field takes its default (UTC, no preference order, no
opt-outs, no quiet hours, no digest, no contacts). Every problem is reported at once, by field path. The version
and updated_at are the writer's (the API), not the caller's.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any, Final

from pipeline.domain import CHANNELS, NOTIFICATION_TYPES, is_e164, is_email, text_flaws
from pipeline.policy.quiet_hours import known_timezone, parse_clock_time
from pipeline.policy.request_contract import PLATFORMS, FieldProblem, InvalidRequest

DIGESTS: Final = ("none", "hourly", "daily", "weekly")
FIELDS: Final = frozenset({"timezone", "channel_preference", "categories", "quiet_hours", "digest", "contacts"})
MAX_DEVICE_TOKENS: Final = 20
MAX_TOKEN_LENGTH: Final = 4096


def _channels(value: Any, field: str, problems: list[FieldProblem]) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        problems.append(FieldProblem(field, f"must be a list of channels ({', '.join(CHANNELS)})"))
        return []
    unknown = [c for c in value if c not in CHANNELS]
    if unknown:
        problems.append(FieldProblem(field, f"unknown channel(s) {', '.join(unknown)}; known: {', '.join(CHANNELS)}"))
    if len(set(value)) != len(value):
        problems.append(FieldProblem(field, "a channel appears twice"))
    return [c for c in value if c in CHANNELS]


def _categories(value: Any, problems: list[FieldProblem]) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.append(FieldProblem("categories", "must be an object keyed by notification type"))
        return {}
    categories: dict[str, dict[str, Any]] = {}
    for notification_type, choice in value.items():
        where = f"categories.{notification_type}"
        if notification_type not in NOTIFICATION_TYPES:
            problems.append(FieldProblem(where, f"unknown notification type; known: {', '.join(NOTIFICATION_TYPES)}"))
            continue
        if not isinstance(choice, Mapping):
            problems.append(FieldProblem(where, "must be an object with opted_in_channels and opted_out_channels"))
            continue
        extra = set(choice) - {"opted_in_channels", "opted_out_channels", "digest"}
        if extra:
            problems.append(FieldProblem(where, f"unknown field(s) {', '.join(sorted(extra))}"))
        digest = choice.get("digest")
        if digest is not None and digest not in DIGESTS:
            problems.append(FieldProblem(f"{where}.digest", f"must be null or one of {', '.join(DIGESTS)}"))
        categories[notification_type] = {
            "opted_in_channels": _channels(choice.get("opted_in_channels"), f"{where}.opted_in_channels", problems),
            "opted_out_channels": _channels(choice.get("opted_out_channels"), f"{where}.opted_out_channels",
                                            problems),
            "digest": digest if digest in DIGESTS else None,
        }
    return categories


def _quiet_hours(value: Any, problems: list[FieldProblem]) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != {"start", "end"}:
        problems.append(FieldProblem("quiet_hours", 'must be {"start": "HH:MM", "end": "HH:MM"} or null'))
        return None
    for end in ("start", "end"):
        try:
            parse_clock_time(str(value[end]))
        except ValueError:
            problems.append(FieldProblem(f"quiet_hours.{end}", "must be a 24 h local time HH:MM, e.g. 22:00"))
    if value["start"] == value["end"]:
        problems.append(FieldProblem("quiet_hours", "start and end are equal: an empty window; use null for none"))
    return {"start": str(value["start"]), "end": str(value["end"])}


def _contacts(value: Any, problems: list[FieldProblem]) -> dict[str, Any]:
    contacts: dict[str, Any] = {"phone": None, "email": None, "device_tokens": []}
    if value is None:
        return contacts
    if not isinstance(value, Mapping):
        problems.append(FieldProblem("contacts", "must be an object with phone, email and device_tokens"))
        return contacts
    extra = set(value) - set(contacts)
    if extra:
        problems.append(FieldProblem("contacts", f"unknown field(s) {', '.join(sorted(extra))}"))
    phone, email, tokens = value.get("phone"), value.get("email"), value.get("device_tokens")
    tokens = [] if tokens is None else tokens  # an empty object is not an empty list
    if phone is not None and not (isinstance(phone, str) and is_e164(phone)):
        problems.append(FieldProblem("contacts.phone", "must be an E.164 number, e.g. +2348012345678"))
    else:
        contacts["phone"] = phone
    if email is not None and not (isinstance(email, str) and is_email(email)):
        problems.append(FieldProblem("contacts.email", "must be an email address"))
    else:
        contacts["email"] = email
    if not isinstance(tokens, list) or len(tokens) > MAX_DEVICE_TOKENS:
        problems.append(FieldProblem("contacts.device_tokens", f"must be a list of at most {MAX_DEVICE_TOKENS}"))
        return contacts
    for index, token in enumerate(tokens):
        where = f"contacts.device_tokens[{index}]"
        if (not isinstance(token, Mapping) or token.get("platform") not in PLATFORMS
                or not isinstance(token.get("token"), str) or not token["token"].strip()
                or len(token["token"]) > MAX_TOKEN_LENGTH):
            problems.append(FieldProblem(where, f"must be {{platform: {'|'.join(PLATFORMS)}, token: non-empty}}"))
            continue
        contacts["device_tokens"].append({"platform": token["platform"], "token": token["token"]})
    return contacts


def parse(user_id: str, body: Any, *, version: int, now: datetime.datetime) -> dict[str, Any]:
    """The UserSettings record for `body`; InvalidRequest naming every wrong field."""
    if not isinstance(body, Mapping):
        raise InvalidRequest([FieldProblem("", "the body must be a JSON object")])
    problems = [FieldProblem(where, flaw) for where, flaw in text_flaws(body)]
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        problems.append(FieldProblem("", f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}"))
    timezone = body.get("timezone", "UTC")
    if not isinstance(timezone, str) or known_timezone(timezone) is None:
        problems.append(FieldProblem("timezone", "must be an IANA time zone name, e.g. Africa/Lagos"))
    digest = body.get("digest", "none")
    if digest not in DIGESTS:
        problems.append(FieldProblem("digest", f"must be one of {', '.join(DIGESTS)}"))
    record = {
        "user_id": user_id,
        "timezone": timezone,
        "channel_preference": _channels(body.get("channel_preference"), "channel_preference", problems),
        "categories": _categories(body.get("categories"), problems),
        "quiet_hours": _quiet_hours(body.get("quiet_hours"), problems),
        "digest": digest,
        "contacts": _contacts(body.get("contacts"), problems),
        "version": version,
        "updated_at": now,
    }
    if problems:
        raise InvalidRequest(problems)
    return record


def as_json(record: Mapping[str, Any]) -> dict[str, Any]:
    """A UserSettings record as the API shows it."""
    return {**record, "updated_at": record["updated_at"].isoformat().replace("+00:00", "Z")}


def opt_out_changes(before: Mapping[str, Any] | None,
                    after: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """What a settings write changed in opt-outs: (notification type, channel, "opt_out" | "opt_in") for each
    channel newly in, or no longer in, a category's opted_out_channels. `before` is None for a new user."""
    changes = []
    for notification_type in sorted(set(before or {}) | set(after)):
        was = set(((before or {}).get(notification_type) or {}).get("opted_out_channels") or ())
        now = set((after.get(notification_type) or {}).get("opted_out_channels") or ())
        changes += [(notification_type, channel, "opt_out") for channel in sorted(now - was)]
        changes += [(notification_type, channel, "opt_in") for channel in sorted(was - now)]
    return changes
