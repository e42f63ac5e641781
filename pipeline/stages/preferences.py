"""Preferences: accepted.<lane> -> routed.<lane>. Opt-outs, quiet hours, digests, channel choice; one task per
channel.

User settings arrive on the compacted, co-partitioned user-settings topic and are kept in a table that follows
this worker's partitions (pipeline/stages/tables.Table), so a user's requests and settings land on the same
worker: each decision is a local read, never a database call. A quiet-hours deferral is held durably
(pipeline/stages/holds) and comes back to accepted.<lane> when the window ends, marked so that it is not deferred again.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline import metrics
from pipeline.errors import DecodeError
from pipeline.kafka import serde, topics
from pipeline.policy import preferences as policy
from pipeline.stages import digests, holds
from pipeline.stages.context import StageContext
from pipeline.stages.records import HEADER_RELEASED, Record, header, utcnow
from pipeline.stages.runtime import Stage
from pipeline.stages.tables import Table
from pipeline.state import db

log = logging.getLogger("notify.preferences")

SUPPRESSED = metrics.counter(
    "notify_suppressed_total", "Deliveries the user's preferences suppressed (opted out, no contact for the "
    "channel, ...), by reason.", ["lane", "channel", "type", "reason"])

INSERT_SUPPRESSED = """
INSERT INTO deliveries (notification_id, channel, state, last_error_code, final_at)
SELECT k.notification_id, k.channel, 'suppressed', k.reason, now()
FROM unnest(%s::uuid[], %s::text[], %s::text[]) AS k(notification_id, channel, reason)
ON CONFLICT (notification_id, channel) DO NOTHING
"""


def delivery_task(request: dict[str, Any], target: Any, lane: str) -> dict[str, Any]:
    return {
        "notification_id": request["notification_id"],
        "user_id": request["user_id"],
        "type": request["type"],
        "lane": lane,
        "channel": target.channel,
        "address": target.address,
        "device_tokens": [{"platform": t.platform, "token": t.token} for t in target.device_tokens],
        "template_id": request.get("template_id"),
        "template_params": request.get("template_params") or {},
        "content": request.get("content"),
        "locale": request.get("locale") or "en",
        "attempt": 0,
        "created_at": request["created_at"],
        "expires_at": request.get("expires_at"),
        "correlation_id": request.get("correlation_id"),
        "collapse_key": request.get("collapse_key"),
    }


def build(ctx: StageContext) -> Stage:
    lane = ctx.lane
    decoded: dict[bytes, dict[str, Any]] = {}  # encoded settings -> decoded (a small cache; bytes are the key)

    def decode(raw: bytes) -> dict[str, Any]:
        value = decoded.get(raw)
        if value is None:
            if len(decoded) > 10_000:
                decoded.clear()
            value = decoded[raw] = ctx.codec.decode(raw, expected=serde.USER_SETTINGS).value
        return value

    def newest(current: bytes | None, new: bytes | None) -> bytes | None:
        """A tombstone erases; an older version arriving late never overrides a newer one; garbage is ignored."""
        if new is None or current is None:
            return new
        try:
            if decode(current)["version"] > decode(new)["version"]:
                return current
        except DecodeError:
            log.warning("undecodable settings on %s ignored", topics.USER_SETTINGS)
            return current
        return new

    def counted(change: str) -> None:
        ctx.outcomes(f"settings_{change}").inc()

    suppressed_count = metrics.Children(SUPPRESSED, lane)

    user_settings = Table(ctx, topics.USER_SETTINGS, apply=newest, on_update=counted)

    def settings_for(user_id: str, partition: int) -> dict[str, Any] | None:
        raw = user_settings.get(user_id, partition)
        if raw is None:
            return None
        try:
            return decode(raw)
        except DecodeError:
            return None  # settings we cannot read are no settings: defaults apply, nothing is blocked

    async def handle(ctx: StageContext, records: list[Record]) -> None:
        now = utcnow()
        to_hold: list[holds.Hold] = []
        to_digest: list[digests.Held] = []
        suppressed: list[tuple[str, str, str]] = []  # notification id, channel, reason
        for record in records:
            request = ctx.decode(record, serde.NOTIFICATION_REQUEST)
            if request is None:
                continue
            ctx.observe_queue_latency(request.get("created_at"), now)
            released = header(record, HEADER_RELEASED) is not None
            decision = policy.decide(request, settings_for(request["user_id"], record.partition), now)
            notification_id = str(request["notification_id"])
            if decision.digest is not None:
                assert record.value is not None
                hold = decision.digest
                to_digest.append(digests.Held(notification_id, request["user_id"], request["type"], hold.frequency,
                                              hold.window_end, hold.address, record.value))
                ctx.emit(request, "deferred", channel="email", error_code="digest",
                         error_message=f"in the {hold.frequency} digest sent at {hold.window_end.isoformat()}",
                         at=now)
                ctx.outcomes("digested").inc()
                continue
            if decision.deferred_until is not None and not released:
                assert record.value is not None
                to_hold.append(holds.Hold(f"quiet:{notification_id}", topics.accepted_topic(lane),
                                          request["user_id"], record.value, "quiet_hours", notification_id,
                                          decision.deferred_until))
                ctx.emit(request, "deferred", error_code="quiet_hours",
                         error_message=f"held until {decision.deferred_until.isoformat()}", at=now)
                ctx.outcomes("deferred").inc()
                continue
            for channel, reason in decision.suppressed:
                suppressed.append((notification_id, channel, reason))
                ctx.emit(request, "suppressed", channel=channel, error_code=reason, at=now)
                suppressed_count(channel, request["type"], reason).inc()
            for target in decision.send:
                task = delivery_task(request, target, lane)
                ctx.send(topics.routed_topic(lane), request["user_id"],
                         ctx.codec.encode(serde.DELIVERY_TASK, task, trusted=True))
            ctx.outcomes("routed" if decision.send else "suppressed").inc()
        if to_hold or suppressed or to_digest:
            pool = await db.async_pool(ctx.settings)
            async with pool.connection() as conn:
                await holds.hold_all(ctx, conn, to_hold)
                await digests.hold_all(ctx, conn, to_digest)
                if suppressed:
                    await conn.execute(INSERT_SUPPRESSED, tuple(map(list, zip(*suppressed, strict=True))))

    stage = Stage(ctx, {topics.accepted_topic(lane): handle}, tables=[user_settings])
    holds.add_releaser(stage, [topics.accepted_topic(lane)])
    if lane == "bulk":  # critical types are never digested
        digests.add_releaser(stage)
    return stage
