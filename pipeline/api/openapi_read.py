"""The read API's part of the OpenAPI document (pipeline/api/openapi.py merges it): paths and schemas, built from the
constants the code validates with."""

from __future__ import annotations

from typing import Any

from pipeline.api.auth import KEY_CACHE_TTL_S
from pipeline.api.notifications import RETRY_AFTER_S
from pipeline.domain import CHANNELS, DELIVERY_STATES, LANES, MAX_USER_ID_LENGTH, NOTIFICATION_TYPES
from pipeline.policy.delivery_log import MAX_CURSOR_LENGTH, MAX_LIMIT, REDACTED


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: str, description: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}, **extra}


_TEXT = {"type": "string"}
_TEXT_OR_NULL = {"type": ["string", "null"]}
_INT_OR_NULL = {"type": ["integer", "null"]}
_TIME = {"type": "string", "format": "date-time"}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}

SCHEMAS: dict[str, Any] = {
    "DeliverySummary": {
        "type": "object", "required": ["channel", "state", "provider", "attempt_count", "updated_at"],
        "properties": {"channel": {"type": "string", "enum": list(CHANNELS)},
                       "state": {"type": "string", "enum": list(DELIVERY_STATES)},
                       "provider": _TEXT_OR_NULL, "attempt_count": {"type": "integer", "minimum": 0},
                       "updated_at": _TEXT}},
    "NotificationSummary": {
        "type": "object",
        "required": ["notification_id", "user_id", "type", "lane", "source_service", "created_at", "received_at",
                     "deliveries"],
        "properties": {"notification_id": {"type": "string", "format": "uuid"}, "user_id": _TEXT,
                       "type": {"type": "string", "enum": list(NOTIFICATION_TYPES)},
                       "lane": {"type": "string", "enum": list(LANES)}, "source_service": _TEXT,
                       "created_at": _TIME, "received_at": _TIME,
                       "deliveries": {"type": "array", "items": _ref("DeliverySummary")}}},
    "NotificationPage": {
        "type": "object", "required": ["notifications", "next_cursor"],
        "properties": {"notifications": {"type": "array", "items": _ref("NotificationSummary")},
                       "next_cursor": {"type": ["string", "null"],
                                       "description": "Pass as `cursor` for the next page; null: this is the last."}}},
    "Delivery": {
        "type": "object", "required": ["channel", "state", "attempt_count", "created_at", "updated_at"],
        "properties": {"channel": {"type": "string", "enum": list(CHANNELS)},
                       "state": {"type": "string", "enum": list(DELIVERY_STATES)},
                       "provider": _TEXT_OR_NULL, "provider_message_id": _TEXT_OR_NULL,
                       "attempt_count": {"type": "integer"}, "retry_tier": {"type": "integer"},
                       "fallback_from": _TEXT_OR_NULL, "last_error_code": _TEXT_OR_NULL,
                       "last_error_message": _TEXT_OR_NULL, "created_at": _TIME, "updated_at": _TIME,
                       "accepted_at": _TIME_OR_NULL, "final_at": _TIME_OR_NULL, "next_attempt_at": _TIME_OR_NULL}},
    "Attempt": {
        "type": "object", "required": ["channel", "attempt_no", "provider", "outcome", "started_at", "finished_at"],
        "description": "One provider call (push: one per device). cost_micros is in millionths of `currency`.",
        "properties": {"channel": _TEXT, "attempt_no": {"type": "integer", "minimum": 1}, "provider": _TEXT,
                       "outcome": {"type": "string", "enum": ["accepted", "permanent", "transient", "ambiguous"]},
                       "response_status": _INT_OR_NULL, "provider_message_id": _TEXT_OR_NULL,
                       "error_code": _TEXT_OR_NULL, "error_payload": {"description": "The provider's error body."},
                       "started_at": _TIME, "finished_at": _TIME, "latency_ms": _INT_OR_NULL,
                       "cost_micros": _INT_OR_NULL, "currency": _TEXT_OR_NULL, "device_platform": _TEXT_OR_NULL,
                       "device_fingerprint": _TEXT_OR_NULL}},
    "TimelineEntry": {
        "type": "object", "required": ["at", "kind", "channel", "to_state", "derived"],
        "description": "received; a state change (kind state: from_state -> to_state, `derived` when told by the "
                       "delivery's timestamps because it predates recorded changes); a provider call (kind "
                       "attempt: to_state is its outcome).",
        "properties": {"at": _TIME, "kind": {"type": "string", "enum": ["received", "state", "attempt"]},
                       "channel": _TEXT_OR_NULL, "from_state": _TEXT_OR_NULL, "to_state": _TEXT,
                       "attempt": _INT_OR_NULL, "provider": _TEXT_OR_NULL, "error_code": _TEXT_OR_NULL,
                       "detail": _TEXT_OR_NULL, "derived": {"type": "boolean"}}},
    "NotificationLog": {
        "type": "object",
        "required": ["notification_id", "user_id", "type", "lane", "source_service", "created_at", "received_at",
                     "request", "deliveries", "attempts", "timeline"],
        "properties": {
            "notification_id": {"type": "string", "format": "uuid"}, "user_id": _TEXT,
            "type": {"type": "string", "enum": list(NOTIFICATION_TYPES)},
            "lane": {"type": "string", "enum": list(LANES)}, "idempotency_key": _TEXT, "source_service": _TEXT,
            "correlation_id": _TEXT_OR_NULL, "collapse_key": _TEXT_OR_NULL,
            "requested_channels": {"type": "array", "items": _TEXT}, "created_at": _TIME,
            "expires_at": _TIME_OR_NULL, "received_at": _TIME,
            "request": {"type": ["object", "null"],
                        "description": "What the accepted request asked to send and where, per channel (null when "
                                       f"no delivery holds it). An OTP's parameters and body read {REDACTED!r}; "
                                       "push devices show platform and fingerprint, never the token."},
            "deliveries": {"type": "array", "items": _ref("Delivery")},
            "attempts": {"type": "array", "items": _ref("Attempt")},
            "timeline": {"type": "array", "items": _ref("TimelineEntry")}}},
}

_SECURITY: list[dict[str, list[str]]] = [{"bearerKey": []}, {"headerKey": []}]
_ERRORS: dict[str, Any] = {
    "401": _json("Error", "Missing, unknown, malformed or revoked API key."),
    "403": _json("Error", "The key lacks the `read` scope (and `admin`)."),
    "503": _json("Error", "PostgreSQL did not answer: retry after Retry-After.", headers={"Retry-After": {
        "description": f"Seconds to wait ({RETRY_AFTER_S}).", "schema": {"type": "integer", "minimum": 1}}}),
}
_SCOPE_NOTE = (f"Needs a key with the `read` scope (its own service's notifications: source_service) or `admin` "
               f"(every one). Scope changes and revocations take effect within {KEY_CACHE_TTL_S:.0f} s.")


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


LIST: dict[str, Any] = {
    "operationId": "listNotifications", "summary": "Notifications, newest first, in keyset pages",
    "description": "Ordered by created_at then notification_id, both descending; a page never skips or repeats one "
                   "as new notifications arrive. Every filter is optional; state and channel match a notification "
                   "with a delivery in that state (on that channel). " + _SCOPE_NOTE,
    "security": _SECURITY,
    "parameters": [
        _query("user_id", "Only this user's.", {"type": "string", "minLength": 1, "maxLength": MAX_USER_ID_LENGTH,
                                                "pattern": r"\S"}),
        _query("type", "Only this type.", {"type": "string", "enum": list(NOTIFICATION_TYPES)}),
        _query("state", "Only those with a delivery in this state.",
               {"type": "string", "enum": list(DELIVERY_STATES)}),
        _query("channel", "Only those with a delivery on this channel.", {"type": "string", "enum": list(CHANNELS)}),
        _query("since", "created_at at or after (RFC 3339 with offset).", {"type": "string", "format": "date-time"}),
        _query("until", "created_at before (RFC 3339 with offset); later than since.",
               {"type": "string", "format": "date-time"}),
        _query("limit", "Page size.", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50}),
        _query("cursor", "next_cursor of the previous page, as given.",
               {"type": "string", "minLength": 1, "maxLength": MAX_CURSOR_LENGTH, "pattern": "^[A-Za-z0-9_-]+$"}),
    ],
    "responses": {"200": _json("NotificationPage", "A page."), **_ERRORS,
                  "422": _json("Error", "A parameter is unknown, repeated or invalid (`details` names each), a "
                                        "cursor is not one this API gave, or until is not later than since.")},
}
ITEM: dict[str, Any] = {
    "parameters": [{"name": "notification_id", "in": "path", "required": True,
                    "schema": {"type": "string", "format": "uuid"}}],
    "get": {
        "operationId": "getNotification", "summary": "What happened to one notification",
        "description": "The notification as accepted, each channel's delivery, every provider attempt (status, "
                       "error code and payload, latency, cost) and the timeline in order. " + _SCOPE_NOTE,
        "security": _SECURITY,
        "responses": {"200": _json("NotificationLog", "The delivery log of the notification."), **_ERRORS,
                      "404": _json("Error", "No such notification, or another service's (for a `read` key)."),
                      "422": _json("Error", "The id is not a UUID.")},
    },
}
