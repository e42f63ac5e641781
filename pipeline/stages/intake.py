"""Intake: requests.<lane> -> accepted.<lane>. Decode, validate, drop the expired, deduplicate.

Deduplication has two layers: a Faust table of dedup keys whose entries expire (tumbling windows of the dedup
window: a key is looked up in the current and the previous window, so it is remembered for at least one whole
window and memory stays bounded), and the PostgreSQL unique key (user_id, notification_type, idempotency_key)
as the final guard. The table remembers the notification id and the Kafka record (topic/partition/offset) that
first carried the key: the same record coming back (a redelivery after a crash, an offset reset for a replay) is
re-driven, not called a duplicate, because every later stage is idempotent; another record with the same key is
a duplicate, even when it carries the same notification id (an upstream resend).
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any

from pipeline import db, serde, topics
from pipeline.domain import Lane, lane_for
from pipeline.policy import intake as policy
from pipeline.stages.runtime import StageContext, guarded, utcnow

INSERT_NOTIFICATION = """
INSERT INTO notifications (notification_id, user_id, notification_type, idempotency_key, lane, source_service,
                           correlation_id, requested_channels, created_at, expires_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT DO NOTHING
RETURNING notification_id
"""
EXISTING_NOTIFICATION = """
SELECT notification_id FROM notifications WHERE user_id = %s AND notification_type = %s AND idempotency_key = %s
"""


async def _first_claim(ctx: StageContext, request: dict[str, Any], lane: Lane) -> uuid.UUID:
    """Insert the notification (final dedup guard); return the id that owns its dedup key."""
    pool = await db.async_pool(ctx.settings)
    async with pool.connection() as conn:
        row = await (await conn.execute(INSERT_NOTIFICATION, (
            request["notification_id"], request["user_id"], request["type"], request["idempotency_key"], lane,
            request["source_service"], request.get("correlation_id"), list(request.get("channels") or []),
            request["created_at"], request.get("expires_at"),
        ))).fetchone()
        if row is None:
            row = await (await conn.execute(EXISTING_NOTIFICATION, (
                request["user_id"], request["type"], request["idempotency_key"]))).fetchone()
    assert row is not None, "a conflicting notification row must exist"
    owner: uuid.UUID = row[0]
    return owner


def build(ctx: StageContext, dedup_window: datetime.timedelta) -> None:
    app, lane = ctx.app, ctx.lane
    dedup = app.Table(
        "dedup", default=str, key_type=str, value_type=str,  # "" = not seen
        partitions=topics.spec(topics.requests_topic(lane)).partitions,
    ).tumbling(dedup_window, expires=dedup_window * 2)  # windows by the record's timestamp (reads and writes)

    async def handle(ctx: StageContext, event: Any) -> str:
        request = await ctx.decode_or_quarantine(event, serde.NOTIFICATION_REQUEST)
        if request is None:
            return "undecodable"
        now = utcnow()
        decision = policy.decide(request, now)
        if decision.outcome == "invalid":
            await ctx.quarantine(event, "invalid", "; ".join(decision.reasons))
            await ctx.emit(request, "invalid", error_code="invalid", error_message="; ".join(decision.reasons))
            return "invalid"
        if decision.outcome == "expired":
            await ctx.emit(request, "expired", error_code="expired", error_message="expires_at is in the past")
            return "expired"

        notification_id = str(request["notification_id"])
        message = event.message
        first_sighting = f"{notification_id} {message.topic}/{message.partition}/{message.offset}"
        key = policy.dedup_key(request)
        seen = dedup[key].current() or dedup[key].delta(dedup_window) or None
        if seen is not None and seen != first_sighting:
            await ctx.emit(request, "duplicate", error_code="duplicate",
                           error_message=f"first seen as {seen.split()[0]}")
            return "duplicate"
        lane_of_type = lane_for(request["type"])
        owner = str(await _first_claim(ctx, request, lane_of_type))
        if owner != notification_id:
            await ctx.emit(request, "duplicate", error_code="duplicate", error_message=f"first seen as {owner}")
            return "duplicate"
        if seen is None:
            dedup[key] = first_sighting
        await ctx.emit(request, "received")
        # the type decides the lane: a request produced to the wrong lane's topic still goes the right way
        await ctx.send(topics.accepted_topic(lane_of_type), request["user_id"], event.value)
        return "accepted"

    @app.agent(ctx.topic(topics.requests_topic(lane)), name=f"intake-{lane}")
    async def intake(stream: Any) -> None:
        async for event in stream.events():
            await guarded(ctx, event, handle)
