"""Rate limit and routing: routed.<lane> -> send.<channel>.<lane>, with a `deliveries` row per channel.

Redis sliding windows (pipeline/ratelimit) decide; over the limit the channel ends `suppressed` with reason
`rate_limited`. When Redis is down, the critical lane keeps flowing (counted as degraded) and the bulk lane is
held for a while and re-checked, so an outage never floods users and never stops an OTP.
Routing is idempotent: the row is inserted once (ON CONFLICT DO NOTHING) and a row already past `queued` is not
sent again, so a redelivery or a replay creates nothing new.
"""

from __future__ import annotations

import datetime

from pipeline import db, metrics, serde, topics
from pipeline.ratelimit import RateLimiter
from pipeline.stages import holds
from pipeline.stages.runtime import Record, Stage, StageContext, utcnow

RATE_LIMIT_DEGRADED = metrics.counter(
    "notify_ratelimit_degraded_total", "Critical sends let through while Redis was unavailable.", ["lane"])
REDIS_OUTAGE_HOLD = datetime.timedelta(seconds=30)

UPSERT_QUEUED = """
INSERT INTO deliveries (notification_id, channel, state, task)
VALUES (%s, %s, 'queued', %s)
ON CONFLICT (notification_id, channel) DO UPDATE SET state = deliveries.state
RETURNING state, (xmax = 0) AS inserted
"""
INSERT_LIMITED = """
INSERT INTO deliveries (notification_id, channel, state, last_error_code, final_at)
VALUES (%s, %s, 'suppressed', 'rate_limited', now())
ON CONFLICT (notification_id, channel) DO NOTHING
"""


def build(ctx: StageContext) -> Stage:
    lane = ctx.lane
    limiter = RateLimiter.from_url(ctx.settings.redis_dsn)

    async def handle(ctx: StageContext, record: Record) -> str:
        task = await ctx.decode_or_quarantine(record, serde.DELIVERY_TASK)
        if task is None:
            return "undecodable"
        notification_id, channel = str(task["notification_id"]), task["channel"]
        now = utcnow()
        expires_at = task.get("expires_at")
        if expires_at is not None and expires_at <= now:
            await ctx.emit(task, "expired", channel=channel, error_code="expired")
            return "expired"

        decision = await limiter.check(user_id=task["user_id"], channel=channel, notification_type=task["type"],
                                       lane=lane, notification_id=notification_id,
                                       now_ms=int(now.timestamp() * 1000))
        if decision.outcome == "unavailable":
            assert record.value is not None
            await holds.hold(ctx, hold_id=f"ratelimit:{notification_id}:{channel}:{int(now.timestamp())}",
                             topic=topics.routed_topic(lane), key=task["user_id"], value=record.value,
                             reason="rate_limiter_unavailable", notification_id=notification_id,
                             due_at=now + REDIS_OUTAGE_HOLD)
            await ctx.emit(task, "deferred", channel=channel, error_code="rate_limiter_unavailable")
            return "held"
        if decision.outcome == "limited":
            pool = await db.async_pool(ctx.settings)
            async with pool.connection() as conn:
                await conn.execute(INSERT_LIMITED, (notification_id, channel))
            await ctx.emit(task, "rate_limited", channel=channel, error_code=decision.rule,
                           error_message=f"retry after {decision.retry_after_s}s")
            return "rate_limited"
        if decision.degraded:
            RATE_LIMIT_DEGRADED.labels(lane).inc()

        pool = await db.async_pool(ctx.settings)
        async with pool.connection() as conn:
            row = await (await conn.execute(UPSERT_QUEUED, (notification_id, channel, record.value))).fetchone()
        assert row is not None
        state, inserted = row
        if not inserted and state != "queued":
            return "already_routed"  # a replay of something already on its way or done: nothing new
        ctx.send(topics.send_topic(channel, lane), task["user_id"], record.value)
        # Also when the row was there already and still queued: a worker killed between its insert and this event
        # left the row without its event, and the redelivery is the only chance to emit it (events are at least
        # once: a replay of a still-queued row says `queued` again).
        await ctx.emit(task, "queued", channel=channel)
        return "queued"

    stage = Stage(ctx, {topics.routed_topic(lane): handle})
    holds.add_releaser(stage, [topics.routed_topic(lane)])
    return stage
