"""Transitions of a `deliveries` row after its send, shared by receipts, reconciliation and the DLQ redrive.

Every transition is guarded by the state and `updated_at` it was decided from (optimistic concurrency): if a
receipt, a sender or another sweep moved the row meanwhile, the transition changes nothing and its caller emits
nothing. A row is re-sent only by re-injecting its stored task into its send topic, where the sender's claim
decides; so a re-injection that races another is harmless.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline import serde, topics
from pipeline.policy.providers import RoutingTable
from pipeline.policy.recovery import DeliveryView
from pipeline.stages.runtime import StageContext

SELECT = """
SELECT d.notification_id::text, d.channel, d.state, d.provider, d.provider_message_id, d.fallback_from, d.task,
       d.attempt_count, d.updated_at, d.claimed_at, d.accepted_at, n.user_id, n.notification_type, n.lane,
       n.created_at, n.correlation_id, d.lease_expires_at
FROM deliveries d JOIN notifications n USING (notification_id)
"""
# `was` and `seen` are the state and updated_at the caller decided from.
TRANSITION = """
UPDATE deliveries
SET state = %(state)s,
    provider = CASE WHEN %(clear_provider)s THEN NULL ELSE COALESCE(%(provider)s, provider) END,
    provider_message_id = CASE WHEN %(clear_provider)s THEN NULL
                               ELSE COALESCE(%(provider_message_id)s, provider_message_id) END,
    fallback_from = COALESCE(%(fallback_from)s, fallback_from),
    retry_tier = CASE WHEN %(reset_tier)s THEN 0 ELSE retry_tier END,
    last_error_code = COALESCE(%(code)s, last_error_code),
    last_error_message = COALESCE(%(message)s, last_error_message),
    lease_owner = NULL, lease_expires_at = NULL,
    next_attempt_at = CASE WHEN %(state)s = 'retry_scheduled' THEN now() ELSE NULL END,
    accepted_at = CASE WHEN %(state)s = 'accepted' THEN now() WHEN %(clear_provider)s THEN NULL ELSE accepted_at END,
    final_at = CASE WHEN %(state)s IN ('delivered', 'failed', 'dead_lettered', 'expired') THEN now() ELSE NULL END
WHERE notification_id = %(nid)s AND channel = %(channel)s AND state = %(was)s AND updated_at = %(seen)s
RETURNING 1
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


async def transition(conn: Any, row: DeliveryRow, state: str, *, provider: str | None = None,
                     provider_message_id: str | None = None, code: str | None = None, message: str | None = None,
                     fallback_from: str | None = None, clear_provider: bool = False,
                     reset_tier: bool = False) -> bool:
    """Move `row` to `state` if nobody moved it since it was read; whether it moved."""
    done = await (await conn.execute(TRANSITION, {
        "state": state, "provider": provider, "provider_message_id": provider_message_id, "code": code,
        "message": (message or "")[:1000] or None, "fallback_from": fallback_from, "clear_provider": clear_provider,
        "reset_tier": reset_tier, "nid": row.notification_id, "channel": row.channel, "was": row.state,
        "seen": row.updated_at})).fetchone()
    return done is not None


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
