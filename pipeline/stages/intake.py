"""Intake: requests.<lane> -> accepted.<lane>. Decode, validate, drop the expired, deduplicate.

Deduplication has two layers: a table of dedup keys whose entries expire after the dedup window (kept per
partition in memory, backed by the compacted dedup.<lane> topic; a timer forgets expired keys and writes their
tombstones, so memory stays bounded), and the PostgreSQL unique key (user_id, notification_type,
idempotency_key) as the final guard. The table remembers the notification id and the Kafka record
(topic/partition/offset) that first carried the key: the same record coming back (a redelivery after a crash,
an offset reset for a replay) is re-driven, not called a duplicate, because every later stage is idempotent;
another record with the same key is a duplicate, even when it carries the same notification id (an upstream
resend).
"""

from __future__ import annotations

import datetime
import json
import uuid
from dataclasses import dataclass
from typing import Any

from pipeline import db, serde, topics
from pipeline.domain import Lane, lane_for
from pipeline.policy import intake as policy
from pipeline.stages.runtime import Record, Stage, StageContext, Table, utcnow

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


@dataclass(frozen=True)
class Sighting:
    """The first record that carried a dedup key, and when."""

    notification_id: str
    source: str
    at: float  # epoch seconds

    def encode(self) -> bytes:
        return json.dumps({"id": self.notification_id, "src": self.source, "at": self.at}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Sighting:
        value = json.loads(raw)
        return cls(str(value["id"]), str(value["src"]), float(value["at"]))


def build(ctx: StageContext, dedup_window: datetime.timedelta) -> Stage:
    lane = ctx.lane
    dedup = Table(ctx, topics.dedup_topic(lane))
    window_s = dedup_window.total_seconds()

    def seen(key: str, partition: int, now: float) -> Sighting | None:
        raw = dedup.get(key, partition)
        if raw is None:
            return None
        sighting = Sighting.decode(raw)
        return sighting if now - sighting.at < window_s else None

    async def handle(ctx: StageContext, record: Record) -> str:
        request = await ctx.decode_or_quarantine(record, serde.NOTIFICATION_REQUEST)
        if request is None:
            return "undecodable"
        now = utcnow()
        decision = policy.decide(request, now)
        if decision.outcome == "invalid":
            await ctx.quarantine(record, "invalid", "; ".join(decision.reasons))
            await ctx.emit(request, "invalid", error_code="invalid", error_message="; ".join(decision.reasons))
            return "invalid"
        if decision.outcome == "expired":
            await ctx.emit(request, "expired", error_code="expired", error_message="expires_at is in the past")
            return "expired"

        notification_id = str(request["notification_id"])
        key = policy.dedup_key(request)
        first = seen(key, record.partition, now.timestamp())
        if first is not None and first.source != record.source:
            await ctx.emit(request, "duplicate", error_code="duplicate",
                           error_message=f"first seen as {first.notification_id}")
            return "duplicate"
        lane_of_type = lane_for(request["type"])
        owner = str(await _first_claim(ctx, request, lane_of_type))
        if owner != notification_id:
            await ctx.emit(request, "duplicate", error_code="duplicate", error_message=f"first seen as {owner}")
            return "duplicate"
        if first is None:
            dedup.put(key, Sighting(notification_id, record.source, now.timestamp()).encode(), record.partition)
        await ctx.emit(request, "received")
        # the type decides the lane: a request produced to the wrong lane's topic still goes the right way
        ctx.send(topics.accepted_topic(lane_of_type), request["user_id"], record.value)
        return "accepted"

    stage = Stage(ctx, {topics.requests_topic(lane): handle}, tables=[dedup])

    @stage.every(60.0, "forget-expired-dedup-keys")
    async def forget_expired() -> None:
        horizon = utcnow().timestamp() - window_s
        for partition in dedup.owned:
            for key, raw in dedup.items(partition):
                if Sighting.decode(raw).at <= horizon:
                    dedup.put(key, None, partition)

    return stage
