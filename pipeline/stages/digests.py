"""Digests on the preferences stage: items held in PostgreSQL (digest_items), one email per window released.

Holding: the preferences stage writes a batch's digested items in one statement. An item that already has a
delivery row was answered before (by an earlier digest, or it expired there) and is not held again: a replay of
accepted.bulk never puts an item in a second digest. A held item has no delivery row until its digest goes out.

Releasing: a timer of the bulk preferences workers, elected per round by a PostgreSQL advisory lock (two workers
sharing a window would each send half of it). A round reads the windows that ended, plans each digest
(pipeline/policy/digests), then:
1. inserts each digest's notification (its id derives from the window: a repeated round inserts nothing new);
2. produces the digest's DeliveryTask to routed.bulk, where routing and the sender treat it as any other email
   (routing's unique delivery row sends it once however often it is produced), and stages the events;
3. after Kafka acknowledged, writes every item's final row (suppressed `digested`, expired, superseded or failed)
   and deletes the held items, in one transaction.
A crash between 2 and 3 repeats the round: the same digest again, sent once; nothing is dropped.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import metrics
from pipeline.errors import DecodeError
from pipeline.kafka import serde, topics
from pipeline.policy import digests as policy
from pipeline.policy.templates import TemplateError, render
from pipeline.stages.context import StageContext
from pipeline.stages.records import utcnow
from pipeline.stages.runtime import Stage
from pipeline.state import db

log = logging.getLogger("notify.digests")

LOCK_KEY = 0x6E6F746479676573  # pg advisory lock id of the digest releaser ("notdyges"), one per topic prefix
WINDOWS_PER_ROUND = 200
DIGEST_TTL = datetime.timedelta(days=1)  # a digest not sent within a day of its window is stale

HELD = metrics.counter("notify_digest_items_held_total", "Notifications held for a digest, by type and frequency.",
                       ["type", "frequency"])
SENT = metrics.counter("notify_digests_sent_total", "Digest emails released, by type and frequency.",
                       ["type", "frequency"])
ITEMS = metrics.counter("notify_digest_items_total", "Held items answered by a digest round, by outcome.",
                        ["type", "outcome"])

INSERT_ITEMS = """
INSERT INTO digest_items (notification_id, user_id, notification_type, frequency, window_end, address, request,
                          topic_prefix)
SELECT k.*, %s FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::text[],
                           %s::bytea[])
     AS k(notification_id, user_id, notification_type, frequency, window_end, address, request)
WHERE NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.notification_id = k.notification_id)
ON CONFLICT (notification_id) DO NOTHING
"""
DUE_ITEMS = """
WITH due AS (
    SELECT user_id, notification_type, window_end FROM digest_items
    WHERE topic_prefix = %(prefix)s AND window_end <= %(now)s
    GROUP BY user_id, notification_type, window_end ORDER BY window_end LIMIT %(windows)s
)
SELECT i.notification_id::text, i.user_id, i.notification_type, i.frequency, i.window_end, i.address, i.request
FROM digest_items i JOIN due USING (user_id, notification_type, window_end)
WHERE i.topic_prefix = %(prefix)s
ORDER BY i.window_end, i.user_id, i.notification_type, i.created_at
"""
INSERT_DIGESTS = """
INSERT INTO notifications (notification_id, user_id, notification_type, idempotency_key, lane, source_service,
                           requested_channels, created_at, expires_at)
SELECT k.notification_id, k.user_id, k.notification_type, k.idempotency_key, 'bulk', 'notify-digest', '{email}',
       k.created_at, k.expires_at
FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[])
     AS k(notification_id, user_id, notification_type, idempotency_key, created_at, expires_at)
ON CONFLICT DO NOTHING
"""
ANSWER_ITEMS = """
INSERT INTO deliveries (notification_id, channel, state, last_error_code, last_error_message, final_at)
SELECT k.notification_id, 'email', k.state, k.code, k.message, now()
FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[]) AS k(notification_id, state, code, message)
ON CONFLICT (notification_id, channel) DO NOTHING
"""
DELETE_ITEMS = "DELETE FROM digest_items WHERE notification_id = ANY(%s::uuid[])"


@dataclass(frozen=True, slots=True)
class Held:
    """An accepted request to keep for the digest of (user, type, window end)."""

    notification_id: str
    user_id: str
    notification_type: str
    frequency: str
    window_end: datetime.datetime
    address: str
    request: bytes


async def hold_all(ctx: StageContext, conn: Any, items: Sequence[Held]) -> None:
    """Keep `items` for their digests (one statement, in the caller's transaction), as this pipeline's (its topic
    prefix): only its releaser sends them."""
    if not items:
        return
    await conn.execute(INSERT_ITEMS, (
        ctx.settings.topic_prefix,
        [i.notification_id for i in items], [i.user_id for i in items], [i.notification_type for i in items],
        [i.frequency for i in items], [i.window_end for i in items], [i.address for i in items],
        [i.request for i in items]))
    for item in items:
        HELD.labels(item.notification_type, item.frequency).inc()


def _item(ctx: StageContext, notification_id: str, raw: bytes) -> tuple[policy.Item, dict[str, Any] | None]:
    """The held request as the digest lists it (rendered as its email), and the request itself."""
    try:
        request = ctx.codec.decode(raw, expected=serde.NOTIFICATION_REQUEST).value
    except DecodeError as exc:  # written by this stage from a record it decoded: only a schema accident
        log.error("held digest item %s cannot be decoded: %s", notification_id, exc)
        return policy.Item(notification_id, utcnow(), None, None, None, None, "undecodable_item"), None
    created, expires = request["created_at"], request.get("expires_at")
    try:
        text = render({**request, "channel": "email"})
    except TemplateError as exc:
        return policy.Item(notification_id, created, expires, request.get("collapse_key"), None, None,
                           exc.code), request
    return policy.Item(notification_id, created, expires, request.get("collapse_key"), text.subject,
                       text.body), request


def _task(digest: policy.Digest, now: datetime.datetime) -> dict[str, Any]:
    window = digest.window
    return {
        "notification_id": digest.notification_id, "user_id": window.user_id, "type": window.notification_type,
        "lane": "bulk", "channel": "email", "address": window.address, "device_tokens": [],
        "template_id": None, "template_params": {}, "content": {"subject": digest.subject, "body": digest.body},
        "locale": "en", "attempt": 0, "created_at": now, "expires_at": now + DIGEST_TTL,
        "correlation_id": f"digest:{window.frequency}", "collapse_key": None,
    }


def lock_key(topic_prefix: str) -> int:
    """The releaser's advisory lock for one pipeline (topic prefix): one releaser per pipeline, not per database."""
    if not topic_prefix:
        return LOCK_KEY
    return LOCK_KEY ^ int.from_bytes(hashlib.blake2b(topic_prefix.encode(), digest_size=7).digest(), "big")


async def release_due(ctx: StageContext, now: datetime.datetime | None = None) -> int:
    """Send the digest of every window that ended by `now` (default: the clock); how many digests were sent.
    Nothing when another worker holds the releaser's lock."""
    pool = await db.async_pool(ctx.settings)
    lock = lock_key(ctx.settings.topic_prefix)
    async with pool.connection() as lock_conn:
        won = await (await lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (lock,))).fetchone()
        await lock_conn.commit()
        if not won or not won[0]:
            return 0
        try:
            return await _release(ctx, pool, now or utcnow())
        finally:
            await lock_conn.execute("SELECT pg_advisory_unlock(%s)", (lock,))
            await lock_conn.commit()


async def _release(ctx: StageContext, pool: Any, now: datetime.datetime) -> int:
    async with pool.connection() as conn:
        rows = await (await conn.execute(DUE_ITEMS, {"now": now, "windows": WINDOWS_PER_ROUND,
                                                      "prefix": ctx.settings.topic_prefix})).fetchall()
        await conn.commit()
    if not rows:
        return 0
    windows: dict[tuple[str, str, datetime.datetime], list[Any]] = defaultdict(list)
    for row in rows:
        windows[(row[1], row[2], row[4])].append(row)
    plans: list[policy.Digest] = []
    requests: dict[str, dict[str, Any]] = {}
    for (user_id, notification_type, end), held in windows.items():
        items = []
        for notification_id, _user, _type, _frequency, _end, _address, raw in held:
            item, request = _item(ctx, notification_id, bytes(raw))
            items.append(item)
            if request is not None:
                requests[notification_id] = request
        window = policy.Window(user_id, notification_type, held[-1][3], end, held[-1][5])
        plans.append(policy.plan(window, items, now))
    sending = [p for p in plans if p.included]
    async with pool.connection() as conn, conn.transaction():
        if sending:
            await conn.execute(INSERT_DIGESTS, (
                [p.notification_id for p in sending], [p.window.user_id for p in sending],
                [p.window.notification_type for p in sending], [p.idempotency_key for p in sending],
                [now] * len(sending), [now + DIGEST_TTL] * len(sending)))
    answers: list[tuple[str, str, str, str | None]] = []  # notification id, state, code, message
    for digest in plans:
        window = digest.window
        if digest.included:
            task = _task(digest, now)
            ctx.send(topics.routed_topic("bulk"), window.user_id,
                     ctx.codec.encode(serde.DELIVERY_TASK, task, trusted=True))
            ctx.emit(task, "received", channel="email", error_code="digest",
                     error_message=f"{window.frequency} digest of {len(digest.included)}", lane="bulk", at=now)
            SENT.labels(window.notification_type, window.frequency).inc()
        outcomes: list[tuple[str, str, str, str | None]] = [
            (nid, "suppressed", "digested", f"in digest {digest.notification_id}") for nid in digest.included]
        outcomes += [(nid, "expired", "expired_before_digest", None) for nid in digest.expired]
        outcomes += [(nid, "suppressed", "superseded", "a newer item of its collapse key is in the digest")
                     for nid in digest.superseded]
        outcomes += [(nid, "failed", code, "its template cannot be rendered") for nid, code in digest.failed]
        for nid, state, code, message in outcomes:
            answers.append((nid, state, code, message))
            ITEMS.labels(window.notification_type, code).inc()
            request = requests.get(nid)
            if request is not None:
                ctx.emit(request, state, channel="email", error_code=code, error_message=message, lane="bulk",
                         at=now)
    await ctx.settle()  # the digests and events acknowledged by Kafka before the items go
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(ANSWER_ITEMS, tuple(map(list, zip(*answers, strict=True))))
        await conn.execute(DELETE_ITEMS, ([a[0] for a in answers],))
    if sending:
        log.info("released %d digests of %d items", len(sending), len(answers))
    return len(sending)


def add_releaser(stage: Stage, interval_s: float = 1.0) -> None:
    """A timer of the stage that sends the digests of ended windows."""

    @stage.every(interval_s, f"release-digests-{stage.ctx.lane}")
    async def release() -> None:
        await release_due(stage.ctx)
