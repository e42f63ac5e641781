"""The NotificationRequest contract at the producer's door: `normalize_request` checks a request as an upstream
service or the ingest API gives it (schemas/NotificationRequest.avsc, and what the schema cannot say: addresses,
lengths, templates that render, the SMS length) and completes it (notification_id, created_at, locale), or raises
`InvalidRequest` with one `FieldProblem` per wrong field. A pure decision; pipeline.kafka.upstream produces what
it returns.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pipeline.domain import (
    CHANNELS,
    CRITICAL_TYPES,
    MAX_ID_LENGTH,
    MAX_USER_ID_LENGTH,
    NOTIFICATION_TYPES,
    is_e164,
    is_email,
    text_flaws,
)
from pipeline.errors import NotifyError
from pipeline.policy import sms, templates

PLATFORMS: Final = ("android", "ios", "web")
REQUEST_FIELDS: Final = frozenset({
    "notification_id", "idempotency_key", "user_id", "type", "channels", "recipient", "template_id",
    "template_params", "content", "locale", "created_at", "expires_at", "source_service", "correlation_id",
    "collapse_key"})


@dataclass(frozen=True)
class FieldProblem:
    field: str  # dotted path, e.g. "recipient.phone" or "channels[1]"
    problem: str

    def as_json(self) -> dict[str, str]:
        return {"field": self.field, "problem": self.problem}


class InvalidRequest(NotifyError):
    """The request does not fit the contract; nothing was produced. Not retryable as is."""

    def __init__(self, problems: Sequence[FieldProblem]) -> None:
        self.problems = list(problems)
        super().__init__("invalid notification request: " + "; ".join(f"{p.field}: {p.problem}" for p in problems))


def _text(value: Any, field: str, problems: list[FieldProblem], *, required: bool, max_length: int = 0) -> None:
    if value is None:
        if required:
            problems.append(FieldProblem(field, "required"))
    elif not isinstance(value, str):
        problems.append(FieldProblem(field, "must be a string"))
    elif required and not value.strip():
        problems.append(FieldProblem(field, "must not be empty"))
    elif max_length and len(value) > max_length:
        problems.append(FieldProblem(field, f"longer than {max_length} characters"))


def _instant(value: Any, field: str, problems: list[FieldProblem]) -> bool:
    problem = ("must be a date-time" if not isinstance(value, datetime.datetime)
               else "must carry a time zone offset" if value.utcoffset() is None else None)
    if problem is not None:
        problems.append(FieldProblem(field, problem))
    return problem is None


def _recipient(value: Any, problems: list[FieldProblem]) -> dict[str, Any]:
    recipient: dict[str, Any] = {"phone": None, "email": None, "device_tokens": []}
    if value is None:
        return recipient
    if not isinstance(value, Mapping):
        problems.append(FieldProblem("recipient", "must be an object"))
        return recipient
    problems.extend(FieldProblem(f"recipient.{k}", "unknown field") for k in value if k not in recipient)
    phone, email, tokens = value.get("phone"), value.get("email"), value.get("device_tokens")
    _text(phone, "recipient.phone", problems, required=False)
    if isinstance(phone, str) and not is_e164(phone):
        problems.append(FieldProblem("recipient.phone", "not E.164 (e.g. +2348012345678)"))
    _text(email, "recipient.email", problems, required=False)
    if isinstance(email, str) and not is_email(email):
        problems.append(FieldProblem("recipient.email", "not an email address"))
    if tokens is not None and not isinstance(tokens, list):
        problems.append(FieldProblem("recipient.device_tokens", "must be an array"))
    for i, token in enumerate(tokens if isinstance(tokens, list) else []):
        at = f"recipient.device_tokens[{i}]"
        if not isinstance(token, Mapping):
            problems.append(FieldProblem(at, "must be an object with platform and token"))
            continue
        problems.extend(FieldProblem(f"{at}.{k}", "unknown field") for k in token if k not in ("platform", "token"))
        if token.get("platform") not in PLATFORMS:
            problems.append(FieldProblem(f"{at}.platform", f"must be one of {', '.join(PLATFORMS)}"))
        _text(token.get("token"), f"{at}.token", problems, required=True, max_length=4096)
    return {"phone": phone, "email": email,
            "device_tokens": [dict(t) for t in tokens if isinstance(t, Mapping)] if isinstance(tokens, list) else []}


def normalize_request(request: Mapping[str, Any], *, now: datetime.datetime | None = None) -> dict[str, Any]:
    """The complete NotificationRequest value for `request` (defaults filled), or InvalidRequest naming every
    wrong field. Pure: no I/O. Timestamps are timezone-aware datetimes."""
    now = now or datetime.datetime.now(datetime.UTC)
    problems = [FieldProblem(k, "unknown field") for k in request if k not in REQUEST_FIELDS]
    problems += [FieldProblem(where, flaw) for where, flaw in text_flaws(request)]
    get = request.get

    notification_id = get("notification_id")
    if notification_id is None:
        notification_id = str(uuid.uuid4())
    elif isinstance(notification_id, uuid.UUID):
        notification_id = str(notification_id)
    else:
        try:
            notification_id = str(uuid.UUID(notification_id))
        except (TypeError, ValueError, AttributeError):
            problems.append(FieldProblem("notification_id", "not a UUID"))
    for field, longest in (("idempotency_key", MAX_ID_LENGTH), ("user_id", MAX_USER_ID_LENGTH),
                           ("source_service", MAX_ID_LENGTH)):
        _text(get(field), field, problems, required=True, max_length=longest)
    for field in ("template_id", "correlation_id", "collapse_key"):
        _text(get(field), field, problems, required=False, max_length=MAX_ID_LENGTH)
    if get("collapse_key") is not None and isinstance(get("type"), str) and get("type") in CRITICAL_TYPES:
        # A newer OTP or fraud alert must never make an older one vanish unread: latest-wins is for the rest.
        problems.append(FieldProblem("collapse_key", f"not for {get('type')} notifications (critical types are "
                                                     "each delivered)"))
    elif isinstance(collapse := get("collapse_key"), str) and not collapse.strip():
        problems.append(FieldProblem("collapse_key", "must not be blank (leave it out for no collapsing)"))
    locale = "en" if get("locale") is None else get("locale")
    _text(locale, "locale", problems, required=True, max_length=35)

    kind = get("type")
    if kind not in NOTIFICATION_TYPES:
        problems.append(FieldProblem("type", f"must be one of {', '.join(NOTIFICATION_TYPES)}"))
    channels = [] if get("channels") is None else get("channels")
    if not isinstance(channels, list):
        problems.append(FieldProblem("channels", "must be an array (empty or absent: chosen by preference)"))
        channels = []
    for i, channel in enumerate(channels):
        if channel not in CHANNELS:
            problems.append(FieldProblem(f"channels[{i}]", f"must be one of {', '.join(CHANNELS)}"))
        elif channels.index(channel) != i:
            problems.append(FieldProblem(f"channels[{i}]", f"{channel} is listed twice"))
    recipient = _recipient(get("recipient"), problems)

    params = {} if get("template_params") is None else get("template_params")
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        problems.append(FieldProblem("template_params", "must be an object"))
        params = {}
    problems.extend(FieldProblem(f"template_params.{k}", "must be a string")
                    for k, v in params.items() if not isinstance(v, str))
    content = get("content")
    if content is not None:
        if not isinstance(content, Mapping):
            problems.append(FieldProblem("content", "must be an object with body and optional subject"))
        else:
            problems.extend(FieldProblem(f"content.{k}", "unknown field") for k in content
                            if k not in ("subject", "body"))
            _text(content.get("subject"), "content.subject", problems, required=False, max_length=998)
            _text(content.get("body"), "content.body", problems, required=True)
            content = {"subject": content.get("subject"), "body": content.get("body")}
    body = content.get("body") if isinstance(content, dict) else None
    if (get("template_id") is None) == (content is None):
        problems.append(FieldProblem("template_id", "give exactly one of template_id and content"))
    elif content is None and isinstance(get("template_id"), str) and isinstance(locale, str):
        try:  # what the sender would render on each channel, rendered now: what it could not is refused, not failed
            for channel in [c for c in channels if c in CHANNELS] or CHANNELS:
                rendered = templates.render({"content": None, "template_id": get("template_id"), "locale": locale,
                                             "channel": channel, "template_params": params})
                body = rendered.body if channel == "sms" else body
        except templates.TemplateError as error:
            field = "template_id" if error.code == "unknown_template" else "template_params"
            problems.append(FieldProblem(field, str(error)))
    sms_possible = not channels or "sms" in channels  # asked for, or possible by preference
    if isinstance(body, str) and sms_possible and (length := sms.utf16_length(body)) > templates.MAX_SMS_CHARS:
        problems.append(FieldProblem("content.body" if content is not None else "template_params",
                                     f"the SMS would be {length} characters; SMS providers take at most "
                                     f"{templates.MAX_SMS_CHARS}"))

    created_at = get("created_at")
    if created_at is None:
        created_at = now.replace(microsecond=now.microsecond // 1000 * 1000)  # the schema keeps milliseconds
    created_ok = _instant(created_at, "created_at", problems)
    expires_at = get("expires_at")
    if expires_at is not None and _instant(expires_at, "expires_at", problems):
        if created_ok and expires_at <= created_at:
            problems.append(FieldProblem("expires_at", "must be later than created_at"))
        elif expires_at <= now:
            problems.append(FieldProblem("expires_at", "already passed: the notification would never be sent"))
    if problems:
        raise InvalidRequest(problems)
    return {
        "notification_id": notification_id, "idempotency_key": get("idempotency_key"), "user_id": get("user_id"),
        "type": kind, "channels": list(channels), "recipient": recipient, "template_id": get("template_id"),
        "template_params": dict(params), "content": content, "locale": locale,
        "created_at": created_at, "expires_at": expires_at, "source_service": get("source_service"),
        "correlation_id": get("correlation_id"), "collapse_key": get("collapse_key"),
    }
