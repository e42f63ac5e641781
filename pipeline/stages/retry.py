"""Retry tiers: retry.<lane>.<n> -> (held until due) -> send.<channel>.<lane>; and the headers retries carry.

The sender writes a delivery that failed transiently on every provider to the next tier with its due time and
attempt history in headers (`tier_headers`). Each tier topic holds one delay, so the head of each partition is
always the next record due there. The releaser (one consumer group per lane, over every tier of the lane) reads a
partition until it meets a record not yet due, then pauses that partition and keeps what it already fetched of
it, in order, until the head comes due: the other partitions and tiers keep flowing, and no record is fetched
twice (a seek back would cost a fetch round trip per wake-up). When the kept records are all released the
partition resumes; librdkafka resumes fetching after the last record it handed over, so nothing is skipped.
Due records go back to their send topic unchanged (the claim on the `deliveries` row decides whether they are
sent). Offsets are committed only up to what was forwarded and acknowledged by Kafka; a rebalance drops what a
worker kept, and the next owner reads it again from the committed offset.

A record is released at the later of its header due time and its broker timestamp plus the tier's delay: never
early by either clock. Lateness is bounded by the poll interval (POLL_MAX_S) plus the forwarding time.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pipeline import metrics
from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.kafka import topics
from pipeline.stages.context import StageContext
from pipeline.stages.records import HEADER_DETAIL, HEADER_REASON, HEADER_SOURCE, Record, utcnow
from pipeline.stages.runtime import FlowStep, Stage

log = logging.getLogger("notify.retry")

HEADER_DUE = "notify-due-ms"  # epoch milliseconds; never released before
HEADER_TIER = "notify-tier"
HEADER_ATTEMPTS = "notify-attempts"  # JSON list of {attempt, provider, outcome, code, at}
HEADER_SEND_TOPIC = "notify-send-topic"  # logical send topic a retry or a redrive goes back to
HEADER_NOTIFICATION = "notify-notification-id"
HEADER_CHANNEL = "notify-channel"
HEADER_LANE = "notify-lane"
HEADER_DEAD_AT = "notify-dead-lettered-at"
HEADER_REDRIVEN = "notify-redriven-at"

POLL_MAX_S = 0.25
BATCH_SIZE = 500

RELEASED = metrics.counter("notify_retry_released_total", "Records a retry tier released to their send topic.",
                   ["lane", "tier"])
RELEASE_LATENESS = metrics.histogram(
    "notify_retry_release_lateness_seconds", "How long after its due time a retry was released.", ["lane"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
PARKED = metrics.gauge("notify_retry_parked_partitions", "Tier partitions paused until their head comes due.", ["lane"])
SCHEDULED = metrics.counter(
    "notify_retry_scheduled_total", "Deliveries written to a retry tier.", ["lane", "channel", "tier"])
DEAD_LETTERED = metrics.counter("notify_dlq_total", "Records written to the dead-letter queue, by reason.",
                        ["lane", "channel", "reason"])


def encode_history(history: Sequence[Mapping[str, Any]]) -> bytes:
    return json.dumps(list(history), separators=(",", ":"), default=str).encode()


def decode_history(headers: Mapping[str, bytes]) -> list[dict[str, Any]]:
    """The attempt history a record carries (empty for a first send or an unreadable header)."""
    raw = headers.get(HEADER_ATTEMPTS)
    if not raw:
        return []
    try:
        value = json.loads(raw)
    except ValueError:
        return []
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def delivery_headers(notification_id: str, channel: str, lane: str, send_topic: str,
                     history: Sequence[Mapping[str, Any]]) -> dict[str, bytes]:
    """What every retry and dead letter carries: who it is, where it goes back to, what was tried."""
    return {HEADER_NOTIFICATION: notification_id.encode(), HEADER_CHANNEL: channel.encode(),
            HEADER_LANE: lane.encode(), HEADER_SEND_TOPIC: send_topic.encode(),
            HEADER_ATTEMPTS: encode_history(history)}


def tier_headers(base: Mapping[str, bytes], tier: int, due: datetime.datetime) -> dict[str, bytes]:
    return {**base, HEADER_TIER: str(tier).encode(), HEADER_DUE: str(int(due.timestamp() * 1000)).encode()}


def dead_letter_headers(base: Mapping[str, bytes], reason: str, detail: str, source: str) -> dict[str, bytes]:
    return {**base, HEADER_REASON: reason.encode(), HEADER_DETAIL: detail[:2000].encode(errors="replace"),
            HEADER_SOURCE: source.encode(), HEADER_DEAD_AT: utcnow().isoformat().encode()}


def tiers(settings: Settings, lane: str) -> tuple[tuple[str, float], ...]:
    """The lane's retry tiers, first first: (logical topic, configured delay); ConfigError when the configured
    delays do not match the tier topics one to one."""
    names, delays = topics.retry_topics(lane), settings.retry_delays(lane)
    if len(delays) != len(names):
        raise ConfigError(f"the {lane} lane has {len(names)} retry tier topics but {len(delays)} delays are "
                          f"configured ({', '.join(f'{d:g}' for d in delays)})")
    return tuple(zip(names, delays, strict=True))


def due_s(record: Record, delay_s: float) -> float | None:
    """When `record` may be released (epoch seconds): the later of its header due time and its broker timestamp
    plus the tier's delay. None when neither is known (the record cannot be scheduled)."""
    candidates = []
    raw = record.headers.get(HEADER_DUE)
    if raw:
        try:
            candidates.append(int(raw) / 1000)
        except ValueError:
            return None
    if record.timestamp_ms > 0:
        candidates.append(record.timestamp_ms / 1000 + delay_s)
    return max(candidates) if candidates else None


def release_headers(record: Record) -> dict[str, bytes]:
    """The headers a released record goes back with: its history and identity, not its due time."""
    return {k: v for k, v in record.headers.items() if k not in (HEADER_DUE, HEADER_TIER)}


class TierReleaser:
    """Moves due records from the lane's retry tiers back to their send topics: the stage runtime's Flow of the
    retry stage (it keeps what it fetched behind a paused head and says what the runner may commit)."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        settings = ctx.settings
        lane_tiers = tiers(settings, ctx.lane)
        self.logical_topics = [name for name, _ in lane_tiers]
        self.delays = {settings.topic(name): delay for name, delay in lane_tiers}
        self.tier_of = {settings.topic(name): str(n) for n, (name, _) in enumerate(lane_tiers, start=1)}
        # paused partition -> its records not yet released, head first, each with its due time
        self.parked: dict[tuple[str, int], collections.deque[tuple[Record, float | None]]] = {}
        self._paused: set[tuple[str, int]] = set()
        self._parked_gauge = PARKED.labels(ctx.lane)
        self._released = metrics.Children(RELEASED, ctx.lane)
        self._lateness = RELEASE_LATENESS.labels(ctx.lane)

    def revoked(self, partitions: Iterable[tuple[str, int]]) -> None:
        for key in partitions:  # the next owner reads them again from the committed offset
            self.parked.pop(key, None)
            self._paused.discard(key)
        self._parked_gauge.set(len(self.parked))

    def poll_timeout(self, now: float) -> float:
        heads = [kept[0][1] or now for kept in self.parked.values() if kept]
        if not heads:
            return POLL_MAX_S
        return max(0.005, min(POLL_MAX_S, min(heads) - now))

    def _forward(self, record: Record, now: float, due: float | None) -> None:
        send_topic = record.headers.get(HEADER_SEND_TOPIC, b"").decode()
        if due is None or send_topic not in topics.catalogue():
            base = {k: v for k, v in record.headers.items() if k.startswith("notify-")}
            channel = base.get(HEADER_CHANNEL, b"unknown").decode()
            self.ctx.send(topics.DLQ, record.key, record.value, dead_letter_headers(
                base, "unreleasable", "a retry record without a due time or a known send topic", record.source))
            DEAD_LETTERED.labels(self.ctx.lane, channel, "unreleasable").inc()
            return
        self.ctx.send(send_topic, record.key, record.value, release_headers(record))
        self._released(self.tier_of.get(record.topic, "?")).inc()
        self._lateness.observe(max(0.0, now - due))

    def step(self, ctx: StageContext, records: list[Record], now: float) -> FlowStep:
        """Keep what was fetched behind each partition's head, forward what is due, pause partitions whose head is
        not and resume those with nothing kept; the offsets to commit once Kafka acknowledged the forwards."""
        for record in records:
            kept = self.parked.setdefault((record.topic, record.partition), collections.deque())
            kept.append((record, due_s(record, self.delays.get(record.topic, 0.0))))
        forwarded: dict[tuple[str, int], int] = {}
        to_pause, to_resume = [], []
        for (topic, partition), kept in list(self.parked.items()):
            while kept and (kept[0][1] is None or kept[0][1] <= now):
                record, due = kept.popleft()
                self._forward(record, now, due)
                forwarded[(topic, partition)] = record.offset + 1
            if kept and (topic, partition) not in self._paused:
                to_pause.append((topic, partition))
                self._paused.add((topic, partition))
            elif not kept:
                del self.parked[(topic, partition)]
                if (topic, partition) in self._paused:
                    to_resume.append((topic, partition))
                    self._paused.discard((topic, partition))
        self._parked_gauge.set(len(self.parked))
        return FlowStep(commit=forwarded, pause=to_pause, resume=to_resume)


def build(ctx: StageContext) -> Stage:
    releaser = TierReleaser(ctx)
    return Stage(ctx, {}, flow=releaser, inputs=releaser.logical_topics, batch_size=BATCH_SIZE)
