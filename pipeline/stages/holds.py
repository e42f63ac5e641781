"""Durable holds in PostgreSQL: a message that must wait (quiet hours, rate limiter outage) is kept here.

Quiet-hours windows end at a different time for every user, so a delay topic (whose head is always the next due)
does not fit; a table ordered by due time does. Release runs in each worker's timer: due rows are locked
(SKIP LOCKED: workers never release the same row), produced, and deleted in the same transaction only after
Kafka acknowledged, so a crash in between re-releases (every stage downstream is idempotent) and loses nothing.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import metrics
from pipeline.stages.context import StageContext
from pipeline.stages.records import HEADER_RELEASED
from pipeline.stages.runtime import Stage
from pipeline.state import db

log = logging.getLogger("notify.holds")

HELD = metrics.counter("notify_held_total", "Messages put on hold, by reason.", ["stage", "lane", "reason"])
RELEASED = metrics.counter("notify_released_total", "Held messages released when due.", ["stage", "lane", "reason"])

INSERT_HOLDS = """
INSERT INTO held_messages (hold_id, topic, message_key, message_value, reason, notification_id, due_at)
SELECT * FROM unnest(%s::text[], %s::text[], %s::bytea[], %s::bytea[], %s::text[], %s::uuid[], %s::timestamptz[])
ON CONFLICT (hold_id) DO NOTHING
"""
DUE_HOLDS = """
SELECT hold_id, topic, message_key, message_value, reason FROM held_messages
WHERE topic = ANY(%s) AND due_at <= now()
ORDER BY due_at
LIMIT %s
FOR UPDATE SKIP LOCKED
"""
DELETE_HOLDS = "DELETE FROM held_messages WHERE hold_id = ANY(%s)"


@dataclass(frozen=True, slots=True)
class Hold:
    """A message to keep until `due_at`, then produce to `topic` (logical) again. It is stored under the physical
    name (the topic prefix included), so only this pipeline's releaser takes it."""

    hold_id: str
    topic: str
    key: str
    value: bytes
    reason: str
    notification_id: str | None
    due_at: datetime.datetime


async def hold_all(ctx: StageContext, conn: Any, holds: Sequence[Hold]) -> None:
    """Keep `holds` (one statement, in the caller's transaction); a hold already kept is kept once."""
    if not holds:
        return
    await conn.execute(INSERT_HOLDS, ([h.hold_id for h in holds], [ctx.topic(h.topic) for h in holds],
                                      [h.key.encode() for h in holds], [h.value for h in holds],
                                      [h.reason for h in holds], [h.notification_id for h in holds],
                                      [h.due_at for h in holds]))
    for h in holds:
        HELD.labels(ctx.stage, ctx.lane, h.reason).inc()


async def release_due(ctx: StageContext, logical_topics: Sequence[str], batch: int = 500) -> int:
    """Produce every due hold of this pipeline for `logical_topics`; return how many were released."""
    logical_of = {ctx.topic(name): name for name in logical_topics}
    pool = await db.async_pool(ctx.settings)
    async with pool.connection() as conn, conn.transaction():
        rows: list[Any] = await (await conn.execute(DUE_HOLDS, (list(logical_of), batch))).fetchall()
        if not rows:
            return 0
        for _id, topic, key, value, _reason in rows:
            ctx.send(logical_of[topic], key, value, {HEADER_RELEASED: b"1"})
        await ctx.settle()  # acknowledged by Kafka before the rows go
        await conn.execute(DELETE_HOLDS, ([row[0] for row in rows],))
    for row in rows:
        RELEASED.labels(ctx.stage, ctx.lane, row[4]).inc()
    return len(rows)


def add_releaser(stage: Stage, logical_topics: Sequence[str], interval_s: float = 1.0) -> None:
    """A timer of the stage that releases due holds (on every worker: SKIP LOCKED shares the work)."""
    ctx = stage.ctx

    @stage.every(interval_s, f"release-holds-{ctx.stage}-{ctx.lane}")
    async def release() -> None:
        # one batch per tick: the stage's own records wait for the timer, so it never runs long
        await release_due(ctx, logical_topics)
