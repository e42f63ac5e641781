"""Intake: requests.<lane> -> accepted.<lane>. Decode, validate, drop the expired, deduplicate; a batch at a time.

Deduplication has two layers: a table of dedup keys whose entries expire after the dedup window (kept per
partition in memory, backed by the compacted dedup.<lane> topic; a timer forgets expired keys and writes their
tombstones, so memory stays bounded), and the PostgreSQL unique key (user_id, notification_type,
idempotency_key) as the final guard. The table remembers the notification id and the Kafka record
(topic/partition/offset) that first carried the key: the same record coming back (a redelivery after a crash,
an offset reset for a replay) is re-driven, not called a duplicate, because every later stage is idempotent;
another record with the same key is a duplicate, even when it carries the same notification id (an upstream
resend). Two records of one batch with the same key: the first is the candidate, the later ones duplicates of
whoever owns the key, as if they had come one batch apart.

Per batch: one INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING for every candidate, which also says who
owns each key. A notification id that is already taken by a request with another key is refused as invalid
(`notification_id_reused`): the id names another notification.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any

from pipeline.domain import Lane, lane_for
from pipeline.kafka import serde, topics
from pipeline.policy import intake as policy
from pipeline.stages.context import StageContext
from pipeline.stages.records import Record, utcnow
from pipeline.stages.runtime import Stage
from pipeline.stages.tables import Table
from pipeline.state import db

# Inserts the batch's candidates and answers, for each, the id that owns its dedup key: its own when inserted, the
# earlier request's when the key was taken, NULL when its notification id was taken by another key (the CTE's
# snapshot does not see the rows it inserts, so `n` only finds earlier ones).
CLAIM_NOTIFICATIONS = """
WITH input AS (
    SELECT * FROM unnest(%(ids)s::uuid[], %(users)s::text[], %(types)s::text[], %(keys)s::text[], %(lanes)s::text[],
                         %(sources)s::text[], %(correlations)s::text[], %(channels)s::text[],
                         %(created)s::timestamptz[], %(expires)s::timestamptz[], %(collapse)s::text[])
        AS k(notification_id, user_id, notification_type, idempotency_key, lane, source_service, correlation_id,
             channels, created_at, expires_at, collapse_key)
), inserted AS (
    INSERT INTO notifications (notification_id, user_id, notification_type, idempotency_key, lane, source_service,
                               correlation_id, requested_channels, created_at, expires_at, collapse_key)
    SELECT notification_id, user_id, notification_type, idempotency_key, lane, source_service, correlation_id,
           string_to_array(channels, ','), created_at, expires_at, NULLIF(collapse_key, '')
    FROM input
    ON CONFLICT DO NOTHING
    RETURNING notification_id
)
SELECT i.notification_id::text, COALESCE(ins.notification_id, n.notification_id)::text
FROM input i
LEFT JOIN inserted ins ON ins.notification_id = i.notification_id
LEFT JOIN notifications n ON n.user_id = i.user_id AND n.notification_type = i.notification_type
                         AND n.idempotency_key = i.idempotency_key
"""
# A second look, in a statement of its own, for candidates the first found no owner for: a concurrent insert of the
# same key by another worker (a rebalance) is visible to a new statement.
KEY_OWNERS = """
SELECT k.notification_id::text, n.notification_id::text
FROM unnest(%(ids)s::uuid[], %(users)s::text[], %(types)s::text[], %(keys)s::text[])
    AS k(notification_id, user_id, notification_type, idempotency_key)
JOIN notifications n ON n.user_id = k.user_id AND n.notification_type = k.notification_type
                    AND n.idempotency_key = k.idempotency_key
"""


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


@dataclass(slots=True)
class Candidate:
    """A valid, unexpired request whose key the table does not rule a duplicate: the database decides."""

    record: Record
    request: dict[str, Any]
    key: str
    lane: Lane  # the lane of its type
    seen_at: float  # when the key was first seen (now, unless this very record carried it before)
    repeats: list[dict[str, Any]]  # later requests of the same batch with the same key

    @property
    def notification_id(self) -> str:
        return str(self.request["notification_id"])


async def claim_keys(ctx: StageContext, candidates: list[Candidate]) -> dict[str, str | None]:
    """Insert the candidates (one statement); notification id -> the id that owns its key (None: its id is taken
    by a request with another key)."""
    requests = [c.request for c in candidates]
    params = {
        "ids": [c.notification_id for c in candidates], "users": [r["user_id"] for r in requests],
        "types": [r["type"] for r in requests], "keys": [r["idempotency_key"] for r in requests],
        "lanes": [c.lane for c in candidates], "sources": [r["source_service"] for r in requests],
        "correlations": [r.get("correlation_id") for r in requests],
        "channels": [",".join(r.get("channels") or ()) for r in requests],
        "created": [r["created_at"] for r in requests], "expires": [r.get("expires_at") for r in requests],
        "collapse": [r.get("collapse_key") for r in requests],
    }
    pool = await db.async_pool(ctx.settings)
    async with pool.connection() as conn:
        owners: dict[str, str | None] = dict(await (await conn.execute(CLAIM_NOTIFICATIONS, params)).fetchall())
        unowned = [i for i, c in enumerate(candidates) if owners.get(c.notification_id) is None]
        if unowned:
            found: dict[str, str | None] = dict(await (await conn.execute(KEY_OWNERS, {
                name: [params[name][i] for i in unowned] for name in ("ids", "users", "types", "keys")})).fetchall())
            owners.update(found)
    return owners


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

    def refuse(record: Record, request: dict[str, Any], reasons: str) -> None:
        ctx.quarantine(record, "invalid", reasons)
        ctx.emit(request, "invalid", error_code="invalid", error_message=reasons)
        ctx.outcomes("invalid").inc()

    def duplicate(request: dict[str, Any], owner: str | None) -> None:
        ctx.emit(request, "duplicate", error_code="duplicate", error_message=f"first seen as {owner}")
        ctx.outcomes("duplicate").inc()

    async def handle(ctx: StageContext, records: list[Record]) -> None:
        now = utcnow()
        now_s = now.timestamp()
        candidates: list[Candidate] = []
        by_key: dict[str, Candidate] = {}
        for record in records:
            request = ctx.decode(record, serde.NOTIFICATION_REQUEST)
            if request is None:
                continue
            ctx.observe_queue_latency(request.get("created_at"), now)
            decision = policy.decide(request, now)
            if decision.outcome == "invalid":
                refuse(record, request, "; ".join(decision.reasons))
                continue
            if decision.outcome == "expired":
                ctx.emit(request, "expired", error_code="expired", error_message="expires_at is in the past", at=now)
                ctx.outcomes("expired").inc()
                continue
            key = policy.dedup_key(request)
            earlier = by_key.get(key)
            if earlier is not None:
                earlier.repeats.append(request)
                continue
            first = seen(key, record.partition, now_s)
            if first is not None and first.source != record.source:
                duplicate(request, first.notification_id)
                continue
            candidate = Candidate(record, request, key, lane_for(request["type"]), first.at if first else now_s, [])
            by_key[key] = candidate
            candidates.append(candidate)
        if not candidates:
            return
        owners = await claim_keys(ctx, candidates)
        for candidate in candidates:
            request, record = candidate.request, candidate.record
            owner = owners.get(candidate.notification_id)
            if owner is None:
                refuse(record, request, "notification_id_reused: the notification_id is already taken by a request "
                                        "with another (user_id, type, idempotency_key)")
            elif owner != candidate.notification_id:
                duplicate(request, owner)
            else:
                # (again, for the same record coming back: the backing topic may have missed the first write)
                dedup.put(candidate.key, Sighting(owner, record.source, candidate.seen_at).encode(), record.partition)
                ctx.emit(request, "received", at=now)
                # the type decides the lane: a request produced to the wrong lane's topic still goes the right way
                ctx.send(topics.accepted_topic(candidate.lane), request["user_id"], record.value)
                ctx.outcomes("accepted").inc()
            for repeat in candidate.repeats:
                duplicate(repeat, owner or candidate.notification_id)

    stage = Stage(ctx, {topics.requests_topic(lane): handle}, tables=[dedup])

    @stage.every(60.0, "forget-expired-dedup-keys")
    async def forget_expired() -> None:
        horizon = utcnow().timestamp() - window_s
        for partition in dedup.owned:
            for key, raw in dedup.items(partition):
                if Sighting.decode(raw).at <= horizon:
                    dedup.put(key, None, partition)

    return stage
