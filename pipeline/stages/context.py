"""A stage's context: one stage of one lane, its consumer group, its staged output and how it is produced and
acknowledged (`settle`), and how the stage reports (delivery events, quarantine, decoding, metrics)."""

from __future__ import annotations

import asyncio
import datetime
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from pipeline import metrics
from pipeline.config import Settings
from pipeline.domain import Lane
from pipeline.errors import DecodeError
from pipeline.kafka import serde, topics
from pipeline.stages.records import (
    HEADER_DETAIL,
    HEADER_REASON,
    HEADER_SOURCE,
    HEADER_STAGE,
    DeliveryFailed,
    Output,
    Record,
    utcnow,
)

log = logging.getLogger("notify.stage")

STAGE_MESSAGES = metrics.counter(
    "notify_stage_messages_total", "Messages a stage finished, by outcome.", ["stage", "lane", "outcome"])
STAGE_QUEUE_SECONDS = metrics.histogram(
    "notify_stage_queue_latency_seconds", "Time from a notification's creation to this stage picking it up.",
    ["stage", "lane"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
QUARANTINED = metrics.counter(
    "notify_quarantined_total", "Messages sent to the invalid topic, by reason.", ["stage", "lane", "reason"])
ERRORS = metrics.counter(
    "notify_stage_errors_total", "Failures a worker caught and routed, by kind: message (a record broke the "
    "handler and was quarantined), infrastructure (a database, Redis or Kafka error; the batch is retried), "
    "timer, consumer (Kafka reported an error), round (a reconciler round failed), retention (a retention sweep "
    "failed).", ["stage", "lane", "kind"])
EVENTS = metrics.counter(
    "notify_delivery_events_total", "Delivery events emitted, by status.", ["stage", "lane", "status"])

# Stages that serve both lanes from one consumer group (the receipts topic and the deliveries table are shared);
# they run once, in the critical lane's process slot.
LANE_FREE_STAGES = frozenset({"receipts", "reconcile"})
FLUSH_TIMEOUT_S = 30.0


@dataclass
class StageContext:
    """One stage of one lane: its producer, the serializer, its staged output, how it reports (events,
    quarantine, metrics)."""

    settings: Settings
    stage: str
    lane: Lane
    producer: Producer
    codec: serde.AvroSerde = field(default_factory=serde.AvroSerde)
    staged: list[Output] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._refused: list[Output] = []
        self._failure = ""
        self._unflushed = 0
        self._physical: dict[str, str] = {}
        self.outcomes = metrics.Children(STAGE_MESSAGES, self.stage, self.lane)
        self.errors = metrics.Children(ERRORS, self.stage, self.lane)
        self._events = metrics.Children(EVENTS, self.stage)
        self._quarantined = metrics.Children(QUARANTINED, self.stage, self.lane)
        self._queue_latency = STAGE_QUEUE_SECONDS.labels(self.stage, self.lane)

    @property
    def group_id(self) -> str:
        if self.stage in LANE_FREE_STAGES:
            return f"{self.settings.topic_prefix}notify-{self.stage}"
        return f"{self.settings.topic_prefix}notify-{self.stage}-{self.lane}"

    def topic(self, logical_name: str) -> str:
        physical = self._physical.get(logical_name)
        if physical is None:
            physical = self._physical[logical_name] = self.settings.topic(logical_name)
        return physical

    # ------------------------------------------------------------------------------------------------ output

    def send(self, logical_name: str, key: str | bytes | None, value: bytes | None,
             headers: Mapping[str, bytes] | None = None, partition: int | None = None) -> None:
        """Stage a record; it is produced by the next `settle()` (the runner's, after the handler returned)."""
        self.staged.append(Output(self.topic(logical_name), key.encode() if isinstance(key, str) else key, value,
                                  list(headers.items()) if headers else None,
                                  -1 if partition is None else partition))

    def discard(self, since: int = 0) -> None:
        """Drop what was staged from position `since` on and not produced (a handler that failed is run again)."""
        del self.staged[since:]

    def _acked(self, error: KafkaError | None, message: Message) -> None:
        # One bound callback for every record (no future or closure per record); it runs in flush()'s thread.
        # A refused record is kept, on the partition it was given, to be produced again.
        if error is not None:
            headers = message.headers()
            partition = message.partition()
            self._refused.append(Output(message.topic() or "", message.key(), message.value(),
                                        list(headers.items()) if isinstance(headers, dict) else headers,
                                        partition if partition is not None and partition >= 0 else -1))
            self._failure = f"{message.topic()}: {error}"

    def produce_staged(self) -> None:
        """Hand everything staged to the producer (without waiting for acknowledgements)."""
        if not self.staged:
            return
        staged, self.staged = self.staged, []
        produce, acked = self.producer.produce, self._acked
        for out in staged:
            while True:
                try:
                    produce(out.topic, out.value, out.key, out.partition, acked, headers=out.headers)
                    break
                except BufferError:  # the local queue is full: let deliveries drain, then try again
                    self.producer.poll(0.05)
        self._unflushed += len(staged)

    async def settle(self) -> None:
        """Produce what is staged and wait until Kafka acknowledged everything produced since the last settle;
        DeliveryFailed if anything was refused or not acknowledged in time."""
        self.produce_staged()
        if not self._unflushed:
            return
        remaining = await asyncio.to_thread(self.producer.flush, FLUSH_TIMEOUT_S)
        self._unflushed = remaining  # still queued in the producer: the next settle waits for them again
        refused, self._refused = self._refused, []
        if refused:
            self.staged[:0] = refused
            raise DeliveryFailed(f"Kafka refused {len(refused)} messages, e.g. {self._failure}")
        if remaining:
            raise DeliveryFailed(f"{remaining} messages not acknowledged within {FLUSH_TIMEOUT_S:.0f}s")

    # ------------------------------------------------------------------------------------------------ reports

    def emit(self, request: Mapping[str, Any], status: str, *, channel: str | None = None,
             provider: str | None = None, attempt: int = 0, error_code: str | None = None,
             error_message: str | None = None, lane: str | None = None, at: datetime.datetime | None = None,
             ) -> None:
        """Stage one DeliveryEvent on delivery-events for a state change of `request` (a request or a task);
        `lane` for stages that serve both lanes (default: this stage's); `at` when a batch shares one clock."""
        event = {
            "event_id": str(uuid.uuid4()),
            "notification_id": str(request["notification_id"]),
            "user_id": request["user_id"],
            "notification_type": request["type"],
            "lane": lane or self.lane,
            "channel": channel,
            "provider": provider,
            "status": status,
            "stage": self.stage,
            "attempt": attempt,
            "error_code": error_code,
            "error_message": (error_message or "")[:1000] or None,
            "occurred_at": at or utcnow(),
            "created_at": request.get("created_at"),
            "correlation_id": request.get("correlation_id"),
        }
        self.send(topics.DELIVERY_EVENTS, request["user_id"],
                  self.codec.encode(serde.DELIVERY_EVENT, event, trusted=True))
        self._events(lane or self.lane, status).inc()

    def quarantine(self, record: Record, reason: str, detail: str) -> None:
        """Stage the original bytes for `invalid`, with why and where from in headers beside the record's own (a
        redrive puts those back: upstream's tracing, a retry's due time)."""
        headers = {
            **record.headers,
            HEADER_REASON: reason.encode(),
            HEADER_DETAIL: detail[:2000].encode(errors="replace"),
            HEADER_SOURCE: record.source.encode(),
            HEADER_STAGE: self.stage.encode(),
        }
        self.send(topics.INVALID, record.key, record.value, headers)
        self._quarantined(reason).inc()
        log.warning("quarantined %s: %s %s", record.source, reason, detail[:500])

    def decode(self, record: Record, name: str) -> dict[str, Any] | None:
        """The record `record` carries, or None after staging undecodable bytes for quarantine."""
        try:
            if record.value is None:
                raise DecodeError("empty", "a null value (tombstone) where a record was expected")
            value: dict[str, Any] = self.codec.decode(record.value, expected=name).value
        except DecodeError as exc:
            self.quarantine(record, exc.reason, str(exc))
            self.outcomes("undecodable").inc()
            return None
        return value

    def observe_queue_latency(self, created_at: datetime.datetime | None, now: datetime.datetime) -> None:
        if created_at is not None:
            self._queue_latency.observe(max(0.0, (now - created_at).total_seconds()))
