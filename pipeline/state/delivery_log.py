"""Reading the delivery log from PostgreSQL: one notification whole, or a keyset page of many.

Shared by the read API (pipeline/api/notifications.py) and the ops console (pipeline/console/). The decisions
(parameters, cursors, redaction, the timeline's order) are pipeline/policy/delivery_log.py's. Every query is
served by an index: the primary keys and notification_attempts_delivery_idx and delivery_transitions_by_delivery
for one notification; notifications_user_created_idx, notifications_source_created_idx or
notifications_created_idx for a page (created_at DESC, notification_id DESC), with the deliveries primary key
for the state and channel filters.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from pipeline.kafka import serde
from pipeline.policy.delivery_log import ListQuery, encode_cursor, request_view, timeline

NOTIFICATION: Final = """
SELECT notification_id::text, user_id, notification_type, idempotency_key, lane, source_service, correlation_id,
       requested_channels, created_at, expires_at, received_at, collapse_key
FROM notifications WHERE notification_id = %s
"""
DELIVERIES: Final = """
SELECT channel, state, provider, provider_message_id, attempt_count, retry_tier, fallback_from, last_error_code,
       last_error_message, created_at, updated_at, accepted_at, final_at, next_attempt_at, task
FROM deliveries WHERE notification_id = %s ORDER BY channel
"""
ATTEMPTS: Final = """
SELECT channel, attempt_no, provider, outcome, response_status, provider_message_id, error_code, error_payload,
       started_at, finished_at, latency_ms, cost_micros, currency, device_platform, device_fingerprint
FROM notification_attempts WHERE notification_id = %s ORDER BY attempt_id
"""
TRANSITIONS: Final = """
SELECT channel, from_state, to_state, attempt_count, provider, error_code, error_message, changed_at
FROM delivery_transitions WHERE notification_id = %s ORDER BY transition_id
"""
PAGE: Final = """
SELECT n.notification_id::text, n.user_id, n.notification_type, n.lane, n.source_service, n.created_at,
       n.received_at,
       COALESCE((SELECT json_agg(json_build_object('channel', d.channel, 'state', d.state, 'provider', d.provider,
                                                   'attempt_count', d.attempt_count, 'updated_at', d.updated_at)
                                 ORDER BY d.channel)
                 FROM deliveries d WHERE d.notification_id = n.notification_id), '[]'::json)
FROM notifications n
WHERE {where}
ORDER BY n.created_at DESC, n.notification_id DESC
LIMIT %(limit)s
"""
_SUMMARY_FIELDS: Final = ("notification_id", "user_id", "type", "lane", "source_service", "created_at", "received_at")


def _iso(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


async def _rows(cursor: Any) -> list[dict[str, Any]]:
    names = [column.name for column in cursor.description or []]
    return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]


@dataclass(frozen=True)
class NotificationLog:
    """One notification whole: the row, its deliveries, attempts and recorded state changes."""

    notification: dict[str, Any]
    deliveries: list[dict[str, Any]]
    attempts: list[dict[str, Any]]
    transitions: list[dict[str, Any]]

    @property
    def source_service(self) -> str:
        return str(self.notification["source_service"])

    def as_json(self, codec: serde.AvroSerde) -> dict[str, Any]:
        n = self.notification
        task = None
        addresses: dict[str, str | None] = {}
        for d in self.deliveries:
            if d["task"] is None:
                continue
            decoded = codec.decode(bytes(d["task"]), expected=serde.DELIVERY_TASK).value
            task = task or decoded
            addresses[d["channel"]] = decoded.get("address")
        return {
            "notification_id": n["notification_id"], "user_id": n["user_id"], "type": n["notification_type"],
            "lane": n["lane"], "idempotency_key": n["idempotency_key"], "source_service": n["source_service"],
            "correlation_id": n["correlation_id"], "collapse_key": n["collapse_key"],
            "requested_channels": list(n["requested_channels"]), "created_at": _iso(n["created_at"]),
            "expires_at": _iso(n["expires_at"]), "received_at": _iso(n["received_at"]),
            "request": request_view(n["notification_type"], task, addresses),
            "deliveries": [{k: _iso(v) for k, v in d.items() if k != "task"} for d in self.deliveries],
            "attempts": [{k: _iso(v) for k, v in a.items()} for a in self.attempts],
            "timeline": [entry.as_json() for entry in timeline(n["received_at"], self.deliveries, self.transitions,
                                                               self.attempts)],
        }


async def fetch(conn: Any, notification_id: uuid.UUID) -> NotificationLog | None:
    """The notification with this id, whole; None when there is none."""
    rows = await _rows(await conn.execute(NOTIFICATION, (notification_id,)))
    if not rows:
        return None
    deliveries = await _rows(await conn.execute(DELIVERIES, (notification_id,)))
    attempts = await _rows(await conn.execute(ATTEMPTS, (notification_id,)))
    transitions = await _rows(await conn.execute(TRANSITIONS, (notification_id,)))
    return NotificationLog(rows[0], deliveries, attempts, transitions)


def page_statement(query: ListQuery, source_service: str | None) -> tuple[str, dict[str, Any]]:
    """The page's SQL and parameters (only the filters given; `source_service` None: every service's)."""
    where = ["TRUE"]
    params: dict[str, Any] = {"limit": query.limit + 1}  # one more says whether another page follows
    filters: Mapping[str, tuple[str, Any]] = {
        "service": ("n.source_service = %(service)s", source_service),
        "user_id": ("n.user_id = %(user_id)s", query.user_id),
        "type": ("n.notification_type = %(type)s", query.notification_type),
        "since": ("n.created_at >= %(since)s", query.since),
        "until": ("n.created_at < %(until)s", query.until),
    }
    for name, (clause, value) in filters.items():
        if value is not None:
            where.append(clause)
            params[name] = value
    if query.cursor is not None:
        where.append("(n.created_at, n.notification_id) < (%(after_at)s, %(after_id)s)")
        params |= {"after_at": query.cursor.created_at, "after_id": query.cursor.notification_id}
    if query.state is not None or query.channel is not None:
        inner = ["d.notification_id = n.notification_id"]
        if query.state is not None:
            inner.append("d.state = %(state)s")
            params["state"] = query.state
        if query.channel is not None:
            inner.append("d.channel = %(channel)s")
            params["channel"] = query.channel
        where.append(f"EXISTS (SELECT 1 FROM deliveries d WHERE {' AND '.join(inner)})")
    return PAGE.format(where=" AND ".join(where)), params


async def page(conn: Any, query: ListQuery, source_service: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """A page of notification summaries (newest first) and the cursor of the next page (None: the last one)."""
    statement, params = page_statement(query, source_service)
    rows = await (await conn.execute(statement.encode(), params)).fetchall()
    more = len(rows) > query.limit
    rows = rows[:query.limit]
    items = [{**{name: _iso(value) for name, value in zip(_SUMMARY_FIELDS, row[:7], strict=True)},
              "deliveries": list(row[7])} for row in rows]
    next_cursor = encode_cursor(rows[-1][5], rows[-1][0]) if more and rows else None
    return items, next_cursor
