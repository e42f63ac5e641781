"""Transitions of a `deliveries` row after its send, shared by receipts, reconciliation and the DLQ redrive.

Every transition is guarded by the state and `updated_at` it was decided from (optimistic concurrency): if a
receipt, a sender or another sweep moved the row meanwhile, the transition changes nothing and its caller emits
nothing. A row is re-sent only by re-injecting its stored task into its send topic, where the sender's claim
decides; so a re-injection that races another is harmless.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.kafka import serde, topics
from pipeline.policy.providers import RoutingTable
from pipeline.policy.recovery import DeliveryView
from pipeline.stages.context import StageContext

SELECT = """
SELECT d.notification_id::text, d.channel, d.state, d.provider, d.provider_message_id, d.fallback_from, d.task,
       d.attempt_count, d.updated_at, d.claimed_at, d.accepted_at, n.user_id, n.notification_type, n.lane,
       n.created_at, n.correlation_id, d.lease_expires_at
FROM deliveries d JOIN notifications n USING (notification_id)
"""
# Each move names the state and updated_at it was decided from (`was`, `seen`); one statement moves a batch.
TRANSITIONS = """
UPDATE deliveries d
SET state = k.state,
    provider = CASE WHEN k.clear_provider THEN NULL ELSE COALESCE(k.provider, d.provider) END,
    provider_message_id = CASE WHEN k.clear_provider THEN NULL
                               ELSE COALESCE(k.provider_message_id, d.provider_message_id) END,
    fallback_from = COALESCE(k.fallback_from, d.fallback_from),
    retry_tier = CASE WHEN k.reset_tier THEN 0 ELSE d.retry_tier END,
    last_error_code = COALESCE(k.code, d.last_error_code),
    last_error_message = COALESCE(k.message, d.last_error_message),
    lease_owner = NULL, lease_expires_at = NULL,
    next_attempt_at = CASE WHEN k.state = 'retry_scheduled' THEN now() ELSE NULL END,
    accepted_at = CASE WHEN k.state = 'accepted' THEN now() WHEN k.clear_provider THEN NULL ELSE d.accepted_at END,
    final_at = CASE WHEN k.state IN ('delivered', 'failed', 'dead_lettered', 'expired') THEN now() ELSE NULL END
FROM unnest(%(nids)s::uuid[], %(channels)s::text[], %(states)s::text[], %(providers)s::text[],
            %(provider_ids)s::text[], %(fallback_from)s::text[], %(clear)s::bool[], %(reset)s::bool[],
            %(codes)s::text[], %(messages)s::text[], %(was)s::text[], %(seen)s::timestamptz[])
    AS k(notification_id, channel, state, provider, provider_message_id, fallback_from, clear_provider, reset_tier,
         code, message, was, seen)
WHERE d.notification_id = k.notification_id AND d.channel = k.channel AND d.state = k.was AND d.updated_at = k.seen
RETURNING d.notification_id::text, d.channel
"""


@dataclass(frozen=True)
class DeliveryRow:
    notification_id: str
    channel: str
    state: str
    provider: str | None
    provider_message_id: str | None
    fallback_from: str | None
    task: bytes | None
    attempt_count: int
    updated_at: datetime.datetime
    claimed_at: datetime.datetime | None
    accepted_at: datetime.datetime | None
    user_id: str
    notification_type: str
    lane: str
    created_at: datetime.datetime
    correlation_id: str | None
    lease_expires_at: datetime.datetime | None

    @property
    def view(self) -> DeliveryView:
        return DeliveryView(self.state, self.provider, self.provider_message_id, self.fallback_from)

    @property
    def subject(self) -> Mapping[str, Any]:
        """What an event names (StageContext.emit takes a request or a task; this is both's common part)."""
        return {"notification_id": self.notification_id, "user_id": self.user_id, "type": self.notification_type,
                "created_at": self.created_at, "correlation_id": self.correlation_id}


async def fetch(conn: Any, where: str, params: Mapping[str, Any] | tuple[Any, ...], *,
                lock: bool = False) -> list[DeliveryRow]:
    sql = f"{SELECT} WHERE {where}" + (" FOR UPDATE OF d" if lock else "")
    rows = await (await conn.execute(sql, params)).fetchall()
    as_bytes: list[Any] = [[bytes(v) if isinstance(v, memoryview) else v for v in row] for row in rows]
    return [DeliveryRow(*row) for row in as_bytes]


@dataclass(frozen=True, slots=True)
class Move:
    """A transition of `row` to `state`, decided from the row as it was read."""

    row: DeliveryRow
    state: str
    provider: str | None = None
    provider_message_id: str | None = None
    code: str | None = None
    message: str | None = None
    fallback_from: str | None = None
    clear_provider: bool = False
    reset_tier: bool = False


async def transition_all(conn: Any, moves: Sequence[Move]) -> set[tuple[str, str]]:
    """Apply every move whose row nobody moved since it was read (one statement, at most one move per row); the
    (notification id, channel) of those that moved."""
    if not moves:
        return set()
    answered = await (await conn.execute(TRANSITIONS, {
        "nids": [m.row.notification_id for m in moves], "channels": [m.row.channel for m in moves],
        "states": [m.state for m in moves], "providers": [m.provider for m in moves],
        "provider_ids": [m.provider_message_id for m in moves], "fallback_from": [m.fallback_from for m in moves],
        "clear": [m.clear_provider for m in moves], "reset": [m.reset_tier for m in moves],
        "codes": [m.code for m in moves], "messages": [(m.message or "")[:1000] or None for m in moves],
        "was": [m.row.state for m in moves], "seen": [m.row.updated_at for m in moves]})).fetchall()
    return {(nid, channel) for nid, channel in answered}


async def transition(conn: Any, row: DeliveryRow, state: str, *, provider: str | None = None,
                     provider_message_id: str | None = None, code: str | None = None, message: str | None = None,
                     fallback_from: str | None = None, clear_provider: bool = False,
                     reset_tier: bool = False) -> bool:
    """Move `row` to `state` if nobody moved it since it was read; whether it moved."""
    moved = await transition_all(conn, [Move(row, state, provider, provider_message_id, code, message, fallback_from,
                                             clear_provider, reset_tier)])
    return bool(moved)


def provider_order(routing: RoutingTable, codec: serde.AvroSerde, row: DeliveryRow) -> tuple[str, ...]:
    """The row's provider order, as the sender had it (per lane and, for SMS, the number's calling code)."""
    to = None
    if row.task is not None and row.channel == "sms":
        to = codec.decode(row.task, expected=serde.DELIVERY_TASK).value.get("address")
    return tuple(routing.order(row.channel, row.lane, to))


def reinject(ctx: StageContext, row: DeliveryRow, headers: Mapping[str, bytes] | None = None) -> None:
    """The row's stored task back onto its send topic (the sender's claim decides whether it is sent)."""
    assert row.task is not None
    ctx.send(topics.send_topic(row.channel, row.lane), row.user_id, row.task, headers)
