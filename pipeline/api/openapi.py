"""The OpenAPI 3.1 description of the ingest API (and the provider webhooks), served at GET /openapi.json.

Built from the same constants the code validates with (types, channels, limits), so it cannot drift on those.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pipeline.api import openapi_read
from pipeline.api.auth import KEY_CACHE_TTL_S
from pipeline.api.ingest import KAFKA_RETRY_AFTER_S, MAX_BATCH, MAX_BODY_BYTES, MAX_JSON_DEPTH
from pipeline.api.webhooks import RECEIPT_PROVIDERS
from pipeline.domain import CHANNELS, LANE_OF_TYPE, MAX_ID_LENGTH, MAX_USER_ID_LENGTH, NOTIFICATION_TYPES
from pipeline.policy import templates
from pipeline.policy.request_contract import PLATFORMS
from pipeline.policy.user_settings import DIGESTS

SMS_LIMIT = (f"When the notification may go by SMS (channels include sms, or are empty), the text it renders may "
             f"be at most {templates.MAX_SMS_CHARS} characters (UTF-16 units, as the providers count): 422 otherwise.")

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1.0.0"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _text(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


def _json(schema_name: str, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {"application/json": {"schema": _ref(schema_name)}}}
    if headers:
        response["headers"] = headers
    return response


_NOT_BLANK = r"\S"  # at least one character that is not white space

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                "schema": {"type": "integer", "minimum": 1}}}

_SCHEMAS: dict[str, Any] = {
    "NotificationRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["idempotency_key", "user_id", "type"],
        "description": "Mirrors the Avro NotificationRequest (schemas/NotificationRequest.avsc). Give exactly "
                       "one of template_id and content. expires_at must be later than created_at and than now. "
                       "No string may hold a NUL character or a lone surrogate; objects nest at most "
                       f"{MAX_JSON_DEPTH} levels.",
        "oneOf": [{"required": ["template_id"], "properties": {"template_id": {"type": "string"}}},
                  {"required": ["content"], "properties": {"content": {"type": "object"}}}],
        "properties": {
            "notification_id": {"type": ["string", "null"], "format": "uuid",
                                "description": "UUID of this notification; generated when absent. One another "
                                               "request already holds is refused with 409."},
            "idempotency_key": _text("A second request with the same user_id, type and idempotency_key is a "
                                     "duplicate and is never sent again: reuse it when retrying.",
                                     minLength=1, maxLength=MAX_ID_LENGTH, pattern=_NOT_BLANK),
            "user_id": _text("The user to notify (the Kafka key).", minLength=1, maxLength=MAX_USER_ID_LENGTH,
                             pattern=_NOT_BLANK),
            "type": {"type": "string", "enum": list(NOTIFICATION_TYPES),
                     "description": "Decides the lane: " + ", ".join(f"{t} -> {lane}"
                                                                   for t, lane in LANE_OF_TYPE.items())},
            "channels": {"type": ["array", "null"], "uniqueItems": True,
                         "items": {"type": "string", "enum": list(CHANNELS)},
                         "description": "Channels to send on; empty or absent: chosen by the user's preference."},
            "recipient": {"oneOf": [_ref("Recipient"), {"type": "null"}]},
            "template_id": {"type": ["string", "null"], "enum": [*templates.template_ids(), None],
                            "description": "A template of the catalogue; template_params must give each of its "
                                           "placeholders (422 naming the missing ones otherwise)."},
            "template_params": {"type": ["object", "null"], "additionalProperties": {"type": "string"},
                                "description": SMS_LIMIT},
            "content": {"oneOf": [_ref("Content"), {"type": "null"}]},
            "locale": {"type": ["string", "null"], "description": "BCP 47 language tag; en when absent.",
                       "default": "en", "examples": ["en-NG"], "minLength": 1, "maxLength": 35,
                       "pattern": _NOT_BLANK},
            "created_at": {"type": ["string", "null"], "format": "date-time",
                           "description": "RFC 3339 with offset; now when absent."},
            "expires_at": {"type": ["string", "null"], "format": "date-time",
                           "description": "RFC 3339 with offset; after it the notification is never sent."},
            "source_service": {"type": ["string", "null"], "minLength": 1, "maxLength": MAX_ID_LENGTH,
                               "pattern": _NOT_BLANK,
                               "description": "Producing service; defaults to the API key's service."},
            "correlation_id": {"type": ["string", "null"], "maxLength": MAX_ID_LENGTH},
            "collapse_key": {"type": ["string", "null"], "minLength": 1, "maxLength": MAX_ID_LENGTH,
                             "pattern": _NOT_BLANK,
                             "description": "Latest wins (not for otp, security or transaction: 422): a newer "
                                            "notification of the same user, type and key (e.g. the asset of a "
                                            "price alert) replaces this one while it is unsent; it then ends "
                                            "suppressed, reason superseded. One already sent is not recalled."},
        },
    },
    "Recipient": {
        "type": "object",
        "additionalProperties": False,
        "description": "Addresses; a missing one is resolved from the user's contacts.",
        "properties": {
            "phone": {"type": ["string", "null"], "pattern": r"^\+[1-9]\d{6,14}$", "description": "E.164."},
            "email": {"type": ["string", "null"], "format": "email"},
            "device_tokens": {"type": ["array", "null"], "items": _ref("DeviceToken"),
                              "description": "null or absent: none."},
        },
    },
    "DeviceToken": {
        "type": "object",
        "additionalProperties": False,
        "required": ["platform", "token"],
        "properties": {"platform": {"type": "string", "enum": list(PLATFORMS)},
                       "token": {"type": "string", "minLength": 1}},
    },
    "Content": {
        "type": "object",
        "additionalProperties": False,
        "required": ["body"],
        "properties": {"subject": {"type": ["string", "null"], "description": "One line: line breaks fold into "
                                                                              "spaces (no header injection)."},
                       "body": {"type": "string", "minLength": 1, "description": SMS_LIMIT}},
    },
    "Batch": {
        "type": "object",
        "additionalProperties": False,
        "required": ["notifications"],
        "properties": {"notifications": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH,
                                         "items": _ref("NotificationRequest")}},
    },
    "Accepted": {"type": "object", "required": ["notification_id"],
                 "properties": {"notification_id": {"type": "string", "format": "uuid"}}},
    "BatchAccepted": {"type": "object", "required": ["notification_ids"],
                      "properties": {"notification_ids": {"type": "array", "description": "In request order.",
                                                          "items": {"type": "string", "format": "uuid"}}}},
    "WebhookAccepted": {"type": "object", "required": ["accepted"],
                        "properties": {"accepted": {"type": "integer", "minimum": 0, "description":
                                                    "Receipts produced to the receipts topic (0: events we do not "
                                                    "map, or a replay)."},
                                       "replayed": {"type": "boolean", "description": "The same signed request "
                                                    "came before: nothing was produced again."}}},
    "FieldProblem": {"type": "object", "required": ["field", "problem"],
                     "properties": {"field": _text("e.g. recipient.phone or notifications[2].type"),
                                    "problem": _text("What is wrong, e.g. not E.164.")}},
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "details": {"type": "array", "items": _ref("FieldProblem")},
            "invalid_items": {"type": "array", "items": {"type": "integer"}, "description": "Batch: indexes."},
            "notification_id": {"type": "string"},
            "retryable": {"type": "boolean"},
            "reason": {"type": "string", "enum": ["queue_full", "delivery_failed", "timeout", "closed"]},
            "results": {"type": "array", "description": "Batch 503: the status of every item, in order.",
                        "items": _ref("BatchItemResult")},
        },
    },
    "UserSettingsWrite": {
        "type": "object",
        "additionalProperties": False,
        "description": "A user's settings, replaced whole by PUT (absent fields take their defaults). Mirrors "
                       "the Avro UserSettings (schemas/UserSettings.avsc).",
        "properties": {
            "timezone": _text("IANA time zone of quiet hours.", default="UTC"),
            "channel_preference": {"type": "array", "uniqueItems": True,
                                   "items": {"type": "string", "enum": list(CHANNELS)},
                                   "description": "Order used when a request asks for auto channels."},
            "categories": {
                "type": "object", "propertyNames": {"enum": list(NOTIFICATION_TYPES)},
                "additionalProperties": {"type": "object", "additionalProperties": False, "properties": {
                    "opted_in_channels": {"type": "array", "items": {"type": "string", "enum": list(CHANNELS)}},
                    "opted_out_channels": {"type": "array", "items": {"type": "string", "enum": list(CHANNELS)}},
                    "digest": {"oneOf": [{"type": "null"}, {"type": "string", "enum": list(DIGESTS)}],
                               "description": "This type's own digest choice (null: the user's `digest`); "
                                              "ignored for critical types."}}},
                "description": "Per notification type: channel opt-ins and opt-outs (a marketing opt-out never "
                               "blocks an OTP) and a digest choice."},
            "quiet_hours": {"description": "Local window without non-critical notifications; start and end "
                                           "must differ (null: none).", "oneOf": [{"type": "null"}, {
                "type": "object", "required": ["start", "end"], "additionalProperties": False,
                "properties": {"start": _text("HH:MM local", pattern="^[0-2][0-9]:[0-5][0-9]$"),
                               "end": _text("HH:MM local, exclusive", pattern="^[0-2][0-9]:[0-5][0-9]$")}}]},
            "digest": {"type": "string", "enum": list(DIGESTS), "default": "none",
                       "description": "Bulk-lane notifications gathered into one email per window: hourly, daily "
                                      "at 08:00 or weekly on Monday at 08:00, in `timezone`."},
            "contacts": _ref("Recipient"),
        },
    },
    "BatchItemResult": {
        "type": "object",
        "required": ["index", "notification_id", "status"],
        "properties": {"index": {"type": "integer"}, "notification_id": {"type": "string", "format": "uuid"},
                       "status": {"type": "string", "enum": ["accepted", "failed"]},
                       "retryable": {"type": "boolean"}, "reason": {"type": "string"}},
    },
}

# What GET and PUT answer: the written fields (defaults filled) and what the API adds. One flat object: an allOf
# over UserSettingsWrite's additionalProperties: false could never be satisfied by a response with user_id in it.
_SCHEMAS["UserSettings"] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["user_id", "version", "updated_at"],
    "properties": {
        **_SCHEMAS["UserSettingsWrite"]["properties"],
        "user_id": {"type": "string"}, "version": {"type": "integer", "minimum": 1},
        "updated_at": {"type": "string", "format": "date-time"},
        "published": {"type": "boolean", "description": "PUT only: already on the user-settings topic "
                                                        "(otherwise the outbox relay publishes it shortly)."},
    },
}

_COMMON_ERRORS: dict[str, Any] = {
    "400": _json("Error", "The body is not well-formed JSON."),
    "401": _json("Error", "Missing, unknown, malformed or revoked API key."),
    "413": _json("Error", f"The body is larger than {MAX_BODY_BYTES} bytes."),
    "422": _json("Error", "Well-formed JSON that is not a valid request (`details` names every wrong field), "
                          f"or nested deeper than {MAX_JSON_DEPTH} levels."),
}


def _post(summary: str, description: str, body: str, accepted: str, unavailable: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "description": description,
        "security": [{"bearerKey": []}, {"headerKey": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(body)}}},
        "responses": {
            "202": _json(accepted, "Kafka acknowledged (acks=all): the pipeline holds the request."),
            **_COMMON_ERRORS,
            "409": _json("Error", "A client-chosen notification_id that another request (another user_id, type or "
                                  "idempotency_key) already holds; `details` names it. Nothing was produced."),
            "503": _json("Error", unavailable, _RETRY_AFTER),
        },
    }


@cache
def openapi_document() -> dict[str, Any]:
    """The API description (a fresh copy is not needed: callers only serialise it)."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "notify ingest API",
            "version": API_VERSION,
            "description": "Accepts fintech notification requests and produces them to Kafka. A 202 means "
                           "Kafka holds the request; retrying with the same idempotency_key never sends twice. "
                           f"Revoked API keys stop working within {KEY_CACHE_TTL_S:.0f} s.",
        },
        "paths": {
            "/v1/notifications/{notification_id}": openapi_read.ITEM,
            "/v1/notifications": {"get": openapi_read.LIST, "post": {"operationId": "createNotification", **_post(
                "Submit one notification", "Validated, then produced to the lane of its type.",
                "NotificationRequest", "Accepted",
                f"Kafka did not take the request: retry after Retry-After ({KAFKA_RETRY_AFTER_S} s) with the "
                "same idempotency_key.")}},
            "/v1/notifications:batch": {"post": {"operationId": "createNotificationBatch", **_post(
                f"Submit up to {MAX_BATCH} notifications",
                "Every item is checked first: if any is invalid, the answer is 422 and nothing is produced.",
                "Batch", "BatchAccepted",
                "Kafka did not take some items (`results` says which); retrying the whole batch with the same "
                "idempotency keys is safe.")}},
            "/v1/users/{user_id}/settings": {
                "parameters": [{"name": "user_id", "in": "path", "required": True,
                                "schema": {"type": "string", "minLength": 1, "maxLength": MAX_USER_ID_LENGTH}}],
                "get": {"operationId": "getUserSettings", "summary": "A user's notification settings",
                        "security": [{"bearerKey": []}, {"headerKey": []}],
                        "responses": {"200": _json("UserSettings", "The settings; ETag is the version."),
                                      "401": _COMMON_ERRORS["401"],
                                      "404": _json("Error", "No settings stored: defaults apply."),
                                      "422": _json("Error", f"user_id is blank, longer than {MAX_USER_ID_LENGTH} "
                                                            "characters, or holds a NUL or a lone surrogate.")}},
                "put": {"operationId": "putUserSettings", "summary": "Replace a user's notification settings",
                        "description": "Stored in PostgreSQL and published to the user-settings topic through a "
                                       "transactional outbox; the preferences stage follows within seconds. "
                                       'Send `If-Match: "<version>"` to refuse a concurrent change.',
                        "security": [{"bearerKey": []}, {"headerKey": []}],
                        "requestBody": {"required": True,
                                        "content": {"application/json": {"schema": _ref("UserSettingsWrite")}}},
                        "responses": {"200": _json("UserSettings", "Stored (new version)."), **_COMMON_ERRORS,
                                      "412": _json("Error", "If-Match does not name the current version.")}},
            },
            "/webhooks/{provider}": {
                "parameters": [{"name": "provider", "in": "path", "required": True,
                                "schema": {"type": "string", "enum": list(RECEIPT_PROVIDERS)}}],
                "post": {
                    "operationId": "receiveProviderReceipts", "summary": "A provider's delivery receipts",
                    "description": "Called by the provider, not by services: the URL is "
                                   "<NOTIFY_WEBHOOK_BASE_URL>/<provider>, and the provider's signature (Twilio "
                                   "X-Twilio-Signature, Termii X-Termii-Signature, SendGrid signed event webhook, "
                                   "Mailgun `signature` in the body) is checked against that public URL plus the "
                                   "query string. Each receipt is produced to the receipts topic as a "
                                   "ProviderReceipt before the answer.",
                    "security": [],
                    "requestBody": {"required": True, "content": {
                        "application/x-www-form-urlencoded": {"schema": {"type": "object"}},
                        "application/json": {"schema": {}}}},
                    "responses": {
                        "200": _json("WebhookAccepted", "Kafka acknowledged every receipt (acks=all), or the "
                                     "request is a replay of one already taken (`replayed`: nothing produced)."),
                        "400": _json("Error", "Signed, but not a receipt we can read."),
                        "403": _json("Error", "Unsigned, forged, a body too broken to check, or (SendGrid, "
                                              "Mailgun) signed more than NOTIFY_WEBHOOK_MAX_AGE_S from now."),
                        "404": _json("Error", "A provider without delivery receipts (fcm, apns)."),
                        "413": _COMMON_ERRORS["413"],
                        "503": _json("Error", "Kafka did not take the receipts: the provider retries.",
                                     _RETRY_AFTER),
                    },
                },
            },
            "/health/live": {"get": {"operationId": "live", "summary": "The process is up", "security": [],
                                     "responses": {"200": {"description": "Alive."}}}},
            "/health/ready": {"get": {
                "operationId": "ready", "summary": "The API reaches Kafka, PostgreSQL and Redis", "security": [],
                "responses": {"200": {"description": "Ready: every dependency answered."},
                              "503": {"description": "Not ready; `checks` names the dependency that did not "
                                                     "answer and why."}}}},
            "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document", "security": [],
                                      "responses": {"200": {"description": "OpenAPI 3.1 document."}}}},
        },
        "components": {
            "schemas": {**_SCHEMAS, **openapi_read.SCHEMAS},
            "securitySchemes": {
                "bearerKey": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer nk_..."},
                "headerKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }
