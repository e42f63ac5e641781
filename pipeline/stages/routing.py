"""Rate limit and routing: routed.<lane> -> send.<channel>.<lane>, with a `deliveries` row per channel.

Redis sliding windows (pipeline/state/ratelimit.py) decide, a batch in one pipeline; over the limit the channel ends
`suppressed` with reason `rate_limited`. When Redis is down, the critical lane keeps flowing (counted as degraded)
and the bulk lane is held for a while and re-checked, so an outage never floods users and never stops an OTP.
Routing is idempotent: the row is inserted once (ON CONFLICT DO NOTHING) and a row already past `queued` is not
sent again, so a redelivery or a replay creates nothing new. Per batch: one Redis pipeline, then one transaction
with one statement per kind of write (holds, rate-limited rows, queued rows).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from pipeline import metrics
from pipeline.kafka import serde, topics
from pipeline.stages import holds
from pipeline.stages.context import StageContext
from pipeline.stages.records import Record, utcnow
from pipeline.stages.runtime import Stage
from pipeline.state import db
from pipeline.state.ratelimit import RateCheck, RateLimiter

RATE_LIMIT_DEGRADED = metrics.counter(
    "notify_ratelimit_degraded_total", "Critical sends let through while Redis was unavailable.", ["lane"])
REDIS_OUTAGE_HOLD = datetime.timedelta(seconds=30)

# One row per (notification, channel): `inserted` when this statement made it; `state` what the row is in now.
UPSERT_QUEUED = """
INSERT INTO deliveries (notification_id, channel, state, task)
SELECT k.notification_id, k.channel, 'queued', k.task
FROM unnest(%s::uuid[], %s::text[], %s::bytea[]) AS k(notification_id, channel, task)
ON CONFLICT (notification_id, channel) DO UPDATE SET state = deliveries.state
RETURNING notification_id::text, channel, state, (xmax = 0) AS inserted
"""
INSERT_LIMITED = """
INSERT INTO deliveries (notification_id, channel, state, last_error_code, final_at)
SELECT k.notification_id, k.channel, 'suppressed', 'rate_limited', now()
FROM unnest(%s::uuid[], %s::text[]) AS k(notification_id, channel)
ON CONFLICT (notification_id, channel) DO NOTHING
"""


@dataclass(slots=True)
class Routed:
    record: Record
    task: dict[str, Any]

    @property
    def key(self) -> tuple[str, str]:
        return str(self.task["notification_id"]), str(self.task["channel"])


def build(ctx: StageContext) -> Stage:
    lane = ctx.lane
    limiter = RateLimiter.from_url(ctx.settings.redis_dsn)
    degraded = RATE_LIMIT_DEGRADED.labels(lane)

    async def handle(ctx: StageContext, records: list[Record]) -> None:
        now = utcnow()
        live: list[Routed] = []
        for record in records:
            task = ctx.decode(record, serde.DELIVERY_TASK)
            if task is None:
                continue
            ctx.observe_queue_latency(task.get("created_at"), now)
            expires_at = task.get("expires_at")
            if expires_at is not None and expires_at <= now:
                ctx.emit(task, "expired", channel=task["channel"], error_code="expired", at=now)
                ctx.outcomes("expired").inc()
                continue
            live.append(Routed(record, task))
        if not live:
            return
        decisions = await limiter.check_all(
            [RateCheck(r.task["user_id"], r.task["channel"], r.task["type"], r.key[0]) for r in live],
            lane=lane, now_ms=int(now.timestamp() * 1000))
        to_hold: list[holds.Hold] = []
        limited: list[Routed] = []
        allowed: list[Routed] = []
        for routed, decision in zip(live, decisions, strict=True):
            task, (notification_id, channel) = routed.task, routed.key
            if decision.outcome == "unavailable":
                assert routed.record.value is not None
                to_hold.append(holds.Hold(f"ratelimit:{notification_id}:{channel}:{int(now.timestamp())}",
                                          topics.routed_topic(lane), task["user_id"], routed.record.value,
                                          "rate_limiter_unavailable", notification_id, now + REDIS_OUTAGE_HOLD))
                ctx.emit(task, "deferred", channel=channel, error_code="rate_limiter_unavailable", at=now)
                ctx.outcomes("held").inc()
            elif decision.outcome == "limited":
                limited.append(routed)
                ctx.emit(task, "rate_limited", channel=channel, error_code=decision.rule,
                         error_message=f"retry after {decision.retry_after_s}s", at=now)
                ctx.outcomes("rate_limited").inc()
            else:
                if decision.degraded:
                    degraded.inc()
                allowed.append(routed)
        rows: dict[tuple[str, str], tuple[str, bool]] = {}
        pool = await db.async_pool(ctx.settings)
        async with pool.connection() as conn:
            await holds.hold_all(ctx, conn, to_hold)
            if limited:
                await conn.execute(INSERT_LIMITED, ([r.key[0] for r in limited], [r.key[1] for r in limited]))
            if allowed:
                once = list({r.key: r for r in reversed(allowed)}.values())  # a statement may touch a row once
                answered = await (await conn.execute(UPSERT_QUEUED, (
                    [r.key[0] for r in once], [r.key[1] for r in once], [r.record.value for r in once]))).fetchall()
                rows = {(nid, channel): (state, inserted) for nid, channel, state, inserted in answered}
        for routed in allowed:
            state, inserted = rows[routed.key]
            if not inserted and state != "queued":
                ctx.outcomes("already_routed").inc()  # a replay of something already on its way or done
                continue
            task, channel = routed.task, routed.key[1]
            ctx.send(topics.send_topic(channel, lane), task["user_id"], routed.record.value)
            # Also when the row was there already and still queued: a worker killed between its insert and this
            # event left the row without its event, and the redelivery is the only chance to emit it (events are
            # at least once: a replay of a still-queued row says `queued` again).
            ctx.emit(task, "queued", channel=channel, at=now)
            ctx.outcomes("queued").inc()

    async def close() -> None:
        await limiter.aclose()

    stage = Stage(ctx, {topics.routed_topic(lane): handle}, closers=[close])
    holds.add_releaser(stage, [topics.routed_topic(lane)])
    return stage
