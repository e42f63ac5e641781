"""The ingest endpoints: validate, produce to the request lane, answer 202 once Kafka acknowledged.

POST /v1/notifications          one request           -> 202 {"notification_id": ...}
POST /v1/notifications:batch    {"notifications": []}  -> 202 {"notification_ids": [...]} (in order)

400: not well-formed JSON. 413: body over MAX_BODY_BYTES. 422: well-formed, but not a valid request; the body
names every wrong field. 503 with Retry-After: Kafka did not take it (retry with the same idempotency key: the
pipeline drops duplicates). A batch is checked whole before anything is produced.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import psycopg
from aiohttp import web

from pipeline import metrics
from pipeline.api import auth
from pipeline.config import Settings
from pipeline.kafka.upstream import NotificationProducer, PreparedNotification, SendOutcome
from pipeline.policy.request_contract import FieldProblem, InvalidRequest
from pipeline.state import db

log = logging.getLogger(__name__)

MAX_BODY_BYTES: Final = 1024 * 1024
MAX_BATCH: Final = 500
MAX_JSON_DEPTH: Final = 32
KAFKA_RETRY_AFTER_S: Final = 5
# The reused-id lookup is a courtesy (intake decides either way): it never holds a request up for long.
REUSED_ID_LOOKUP_S: Final = 1.0
OWNERS_OF_IDS: Final = """
SELECT notification_id::text, user_id, notification_type, idempotency_key FROM notifications
WHERE notification_id = ANY(%s::uuid[])
"""
# RFC 3339 date-time: a time zone offset is required (a naive time would be guessed, and OTP expiry depends on it).
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")
_TIMESTAMP_FIELDS: Final = ("created_at", "expires_at")

NOTIFICATIONS = metrics.counter(
    "notify_api_notifications_total", "Notifications received by the ingest API, by lane and outcome "
    "(accepted, invalid, conflict, unavailable).", ["lane", "outcome"])


@dataclass
class IngestState:
    """What the handlers share; the producer is set when the app starts and cleared when it stops."""

    settings: Settings
    producer: NotificationProducer | None = None


INGEST = web.AppKey("notify.ingest", IngestState)


def json_error(status: type[web.HTTPException], message: str, details: Sequence[FieldProblem] = (),
                headers: Mapping[str, str] | None = None, **extra: Any) -> NoReturn:
    body: dict[str, Any] = {"error": message}
    if details:
        body["details"] = [problem.as_json() for problem in details]
    body.update(extra)
    raise status(text=json.dumps(body), content_type="application/json", headers=headers)


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _too_large(actual_size: int | None) -> NoReturn:
    body = {"error": f"body larger than {MAX_BODY_BYTES} bytes", "max_size": MAX_BODY_BYTES}
    raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=actual_size or MAX_BODY_BYTES + 1,
                                        text=json.dumps(body), content_type="application/json")


def _depth_over(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest deeper than `limit` in `value` (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def parse_json(raw: bytes) -> Any:
    """`raw` as JSON; 400 when not well-formed, 422 when nested deeper than MAX_JSON_DEPTH (no request of ours
    nests more than a few levels, and Python's parser would exhaust its stack near a thousand)."""
    try:
        value = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        value = None
        json_error(web.HTTPUnprocessableEntity, f"body nests deeper than {MAX_JSON_DEPTH} levels")
    except (ValueError, UnicodeDecodeError) as exc:
        json_error(web.HTTPBadRequest, f"body is not well-formed JSON: {exc}")
    if _depth_over(value, MAX_JSON_DEPTH):
        json_error(web.HTTPUnprocessableEntity, f"body nests deeper than {MAX_JSON_DEPTH} levels")
    return value


async def read_json(request: web.Request) -> Any:
    """The parsed body; 413 when over MAX_BODY_BYTES, 400 when not well-formed JSON, 422 when nested too deep."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        _too_large(request.content_length)
    try:
        raw = await request.read()  # aiohttp stops reading at the app's client_max_size
    except web.HTTPRequestEntityTooLarge:  # a chunked body without Content-Length
        _too_large(None)
    return parse_json(raw)


def _parse_instant(value: Any, field: str, problems: list[FieldProblem]) -> Any:
    if value is None:
        return None
    if not isinstance(value, str) or not _RFC3339.match(value):
        problems.append(FieldProblem(field, "must be an RFC 3339 date-time with offset, e.g. 2026-05-01T12:00:00Z"))
        return None
    text = value.upper().replace(" ", "T")
    fraction = re.search(r"\.(\d+)", text)
    if fraction and len(fraction[1]) > 6:  # Python keeps microseconds; the schema keeps milliseconds anyway
        text = text.replace(fraction[0], "." + fraction[1][:6])
    try:
        return datetime.datetime.fromisoformat(text)
    except ValueError:
        problems.append(FieldProblem(field, "not a valid date-time"))
        return None


def prepare_item(producer: NotificationProducer, item: Any, service: str, prefix: str = ""
                 ) -> tuple[PreparedNotification | None, list[FieldProblem]]:
    """A JSON request as a prepared notification, or the problems with it (fields named under `prefix`).
    source_service defaults to the calling key's service."""
    where = prefix.rstrip(".") or "(body)"
    if not isinstance(item, dict):
        return None, [FieldProblem(where, "must be a JSON object")]
    request = dict(item)
    problems: list[FieldProblem] = []
    for field in _TIMESTAMP_FIELDS:
        if field in request:
            request[field] = _parse_instant(request[field], field, problems)
    if request.get("source_service") is None:
        request["source_service"] = service
    prepared = None
    try:
        prepared = producer.prepare(request)
    except InvalidRequest as exc:
        problems.extend(exc.problems)
    if problems:
        return None, [FieldProblem(f"{prefix}{p.field}" if p.field else where, p.problem) for p in problems]
    return prepared, []


def _producer(request: web.Request) -> NotificationProducer:
    producer = request.app[INGEST].producer
    if producer is None:  # only while starting or stopping
        json_error(web.HTTPServiceUnavailable, "the API is not ready", headers=_retry_after())
    return producer


def _retry_after() -> dict[str, str]:
    return {"Retry-After": str(KAFKA_RETRY_AFTER_S)}


def _count(outcomes: Sequence[SendOutcome]) -> None:
    for outcome in outcomes:
        NOTIFICATIONS.labels(outcome.lane, "accepted" if outcome.acked else "unavailable").inc()


async def post_notification(request: web.Request) -> web.Response:
    producer = _producer(request)
    body = await read_json(request)
    prepared, problems = prepare_item(producer, body, request[auth.SERVICE])
    if prepared is None:
        NOTIFICATIONS.labels("unknown", "invalid").inc()
        json_error(web.HTTPUnprocessableEntity, "invalid notification request", problems)
    reused = await _reused_ids(request.app[INGEST], _chosen_id(body, prepared, "notification_id"))
    if reused:
        _reused_error(reused)
    (outcome,) = await producer.send_prepared([prepared])
    _count([outcome])
    if outcome.error is not None:
        json_error(web.HTTPServiceUnavailable, "Kafka did not take the notification; retry with the same "
                    "idempotency_key", headers=_retry_after(), notification_id=outcome.notification_id,
                    retryable=outcome.error.retryable, reason=outcome.error.reason)
    return web.json_response({"notification_id": outcome.notification_id}, status=202)


async def _reused_ids(state: IngestState, chosen: Sequence[tuple[str, PreparedNotification]]
                      ) -> list[FieldProblem]:
    """Client-chosen notification ids (field name, item) that an earlier request with another (user_id, type,
    idempotency_key) already holds: intake would refuse them as `notification_id_reused`, so say it now. When
    PostgreSQL does not answer in time the request goes on and intake decides."""
    if not chosen:
        return []
    ids = [item.notification_id for _, item in chosen]
    try:
        async with asyncio.timeout(REUSED_ID_LOOKUP_S):
            pool = await db.async_pool(state.settings)
            async with pool.connection() as conn:
                rows = await (await conn.execute(OWNERS_OF_IDS, (ids,))).fetchall()
    except (TimeoutError, OSError, psycopg.Error) as exc:
        log.warning("reused notification id lookup skipped (intake decides): %s", exc)
        return []
    owners = {row[0]: (row[1], row[2], row[3]) for row in rows}
    problems: list[FieldProblem] = []
    for field, item in chosen:
        owner = owners.get(item.notification_id)
        request = item.request
        if owner is not None and owner != (request["user_id"], request["type"], request["idempotency_key"]):
            problems.append(FieldProblem(field, "already used by another request (another user_id, type or "
                                                "idempotency_key); choose a new id or leave it out"))
    return problems


def _chosen_id(item: Any, prepared: PreparedNotification, field: str) -> list[tuple[str, PreparedNotification]]:
    return [(field, prepared)] if isinstance(item, dict) and item.get("notification_id") is not None else []


def _reused_error(problems: Sequence[FieldProblem]) -> NoReturn:
    NOTIFICATIONS.labels("unknown", "conflict").inc(len(problems))
    json_error(web.HTTPConflict, "notification id already used", problems)


def _duplicates(prepared: Sequence[PreparedNotification]) -> dict[int, FieldProblem]:
    """Items that repeat an earlier item's (user_id, type, idempotency_key), by index: the pipeline would drop
    them as duplicates, which the caller surely did not mean."""
    first: dict[tuple[str, str, str], int] = {}
    problems: dict[int, FieldProblem] = {}
    for index, item in enumerate(prepared):
        identity = (item.request["user_id"], item.request["type"], item.request["idempotency_key"])
        if identity in first:
            problems[index] = FieldProblem(f"notifications[{index}].idempotency_key",
                                           f"repeats notifications[{first[identity]}] (same user_id and type)")
        first.setdefault(identity, index)
    return problems


async def post_batch(request: web.Request) -> web.Response:
    producer = _producer(request)
    body = await read_json(request)
    items = body.get("notifications") if isinstance(body, dict) else None
    if not isinstance(body, dict) or set(body) - {"notifications"}:
        json_error(web.HTTPUnprocessableEntity, "invalid batch",
                    [FieldProblem("(body)", 'must be an object with only "notifications": [...]')])
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
        json_error(web.HTTPUnprocessableEntity, "invalid batch",
                    [FieldProblem("notifications", f"must be an array of 1 to {MAX_BATCH} requests")])
    prepared: list[PreparedNotification] = []
    problems: list[FieldProblem] = []
    invalid: list[int] = []
    for index, item in enumerate(items):
        ready, item_problems = prepare_item(producer, item, request[auth.SERVICE], f"notifications[{index}].")
        if ready is None:
            invalid.append(index)
            problems.extend(item_problems)
        else:
            prepared.append(ready)
    if not problems:  # all valid, so prepared[i] is items[i]
        duplicates = _duplicates(prepared)
        invalid, problems = list(duplicates), list(duplicates.values())
    if problems:
        NOTIFICATIONS.labels("unknown", "invalid").inc(len(invalid))
        json_error(web.HTTPUnprocessableEntity,
                    f"{len(invalid)} of {len(items)} notification(s) invalid; nothing was produced",
                    problems, invalid_items=invalid)
    reused = await _reused_ids(request.app[INGEST], [
        chosen for index, (item, ready) in enumerate(zip(items, prepared, strict=True))
        for chosen in _chosen_id(item, ready, f"notifications[{index}].notification_id")])
    if reused:
        _reused_error(reused)
    outcomes = await producer.send_prepared(prepared)
    _count(outcomes)
    failed = [outcome for outcome in outcomes if not outcome.acked]
    if failed:
        results = [{"index": i, "notification_id": o.notification_id, "status": "accepted"} if o.error is None
                   else {"index": i, "notification_id": o.notification_id, "status": "failed",
                         "retryable": o.error.retryable, "reason": o.error.reason}
                   for i, o in enumerate(outcomes)]
        json_error(web.HTTPServiceUnavailable,
                    f"Kafka did not take {len(failed)} of {len(outcomes)} notification(s); retrying the whole "
                    "batch with the same idempotency keys is safe", headers=_retry_after(), results=results)
    return web.json_response({"notification_ids": [o.notification_id for o in outcomes]}, status=202)


def setup(app: web.Application, settings: Settings) -> None:
    """Add the ingest routes; the app's startup sets app[INGEST].producer."""
    app[INGEST] = IngestState(settings)
    app.router.add_post("/v1/notifications", post_notification)
    app.router.add_post("/v1/notifications:batch", post_batch)
