"""What every stage agent shares: its Faust app, output topics, delivery events, quarantine and metrics.

A stage is a Faust app of its own (app id = consumer group `notify-<stage>-<lane>`), so each stage and lane
scales and lags apart. The agent body reads, calls a policy (pipeline/policy), and writes through this module.
Every agent body catches its own failures and routes the message on (see `guarded`): an exception inside a
Faust agent would otherwise ack and drop the message.
"""

from __future__ import annotations

import datetime
import logging
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import faust
from prometheus_client import Counter, Histogram

from pipeline import serde, topics
from pipeline.config import Settings
from pipeline.domain import Lane
from pipeline.errors import DecodeError

log = logging.getLogger("notify.stage")

STAGE_MESSAGES = Counter(
    "notify_stage_messages_total", "Messages a stage finished, by outcome.", ["stage", "lane", "outcome"])
STAGE_SECONDS = Histogram(
    "notify_stage_processing_seconds", "Time a stage spent on one message.", ["stage", "lane"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
STAGE_QUEUE_SECONDS = Histogram(
    "notify_stage_queue_latency_seconds", "Time from a notification's creation to this stage picking it up.",
    ["stage", "lane"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
QUARANTINED = Counter(
    "notify_quarantined_total", "Messages sent to the invalid topic, by reason.", ["stage", "lane", "reason"])
EVENTS = Counter("notify_delivery_events_total", "Delivery events emitted, by status.", ["stage", "lane", "status"])

HEADER_REASON = "notify-reason"
HEADER_DETAIL = "notify-detail"
HEADER_SOURCE = "notify-source"  # topic/partition/offset the quarantined bytes came from
HEADER_RELEASED = "notify-released"  # a held message coming back; its hold is not applied again


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def raw_topic(app: faust.App, name: str) -> Any:
    """A topic of bytes keys and values (our own Avro serializer does the encoding)."""
    return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")


def make_app(settings: Settings, stage: str, lane: Lane) -> faust.App:
    brokers = ";".join(f"kafka://{server}" for server in settings.bootstrap_servers.split(","))
    return faust.App(
        f"{settings.topic_prefix}notify-{stage}-{lane}",
        broker=brokers,
        store="memory://",
        datadir=str(settings.stack_dir / "faust"),
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=True,  # Faust declares only its internal (changelog) topics; ours come from topics/
        topic_partitions=topics.spec(topics.requests_topic(lane)).partitions,
        producer_acks=-1,
        broker_commit_interval=1.0,
        # a worker that died is noticed in seconds, not Faust's default minute, so its partitions move on fast
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        consumer_auto_offset_reset="earliest",
        stream_wait_empty=False,
        stream_processing_timeout=30.0,
        table_cleanup_interval=60.0,
        logging_config=None,
    )


@dataclass
class StageContext:
    """One stage of one lane: the app, its output topics, the serializer, and how to report."""

    settings: Settings
    stage: str
    lane: Lane
    app: faust.App
    codec: serde.AvroSerde = field(default_factory=serde.AvroSerde)
    _topics: dict[str, Any] = field(default_factory=dict)

    def topic(self, logical_name: str) -> Any:
        if logical_name not in self._topics:
            self._topics[logical_name] = raw_topic(self.app, self.settings.topic(logical_name))
        return self._topics[logical_name]

    async def send(self, logical_name: str, key: str, value: bytes,
                   headers: Mapping[str, bytes] | None = None) -> None:
        await self.topic(logical_name).send(key=key.encode(), value=value, headers=dict(headers or {}))

    async def emit(self, request: Mapping[str, Any], status: str, *, channel: str | None = None,
                   provider: str | None = None, attempt: int = 0, error_code: str | None = None,
                   error_message: str | None = None) -> None:
        """One DeliveryEvent on delivery-events for a state change of `request` (a request or a task)."""
        event = {
            "event_id": str(uuid.uuid4()),
            "notification_id": str(request["notification_id"]),
            "user_id": request["user_id"],
            "notification_type": request["type"],
            "lane": self.lane,
            "channel": channel,
            "provider": provider,
            "status": status,
            "stage": self.stage,
            "attempt": attempt,
            "error_code": error_code,
            "error_message": (error_message or "")[:1000] or None,
            "occurred_at": utcnow(),
            "created_at": request.get("created_at"),
            "correlation_id": request.get("correlation_id"),
        }
        await self.send(topics.DELIVERY_EVENTS, request["user_id"], self.codec.encode(serde.DELIVERY_EVENT, event))
        EVENTS.labels(self.stage, self.lane, status).inc()

    async def quarantine(self, event: Any, reason: str, detail: str) -> None:
        """The original bytes to `invalid`, with why and where from in headers."""
        message = event.message
        headers = {
            HEADER_REASON: reason.encode(),
            HEADER_DETAIL: detail[:2000].encode(errors="replace"),
            HEADER_SOURCE: f"{message.topic}/{message.partition}/{message.offset}".encode(),
            "notify-stage": self.stage.encode(),
        }
        await self.topic(topics.INVALID).send(key=event.key, value=event.value, headers=headers)
        QUARANTINED.labels(self.stage, self.lane, reason).inc()
        log.warning("quarantined %s/%s/%s: %s %s", message.topic, message.partition, message.offset, reason, detail)

    async def decode_or_quarantine(self, event: Any, record: str) -> dict[str, Any] | None:
        """The record `event` carries, or None after sending undecodable bytes to quarantine."""
        try:
            value: dict[str, Any] = self.codec.decode(event.value, expected=record).value
        except DecodeError as exc:
            await self.quarantine(event, exc.reason, str(exc))
            return None
        self.observe_queue_latency(value.get("created_at"))
        return value

    def observe_queue_latency(self, created_at: datetime.datetime | None) -> None:
        if created_at is not None:
            STAGE_QUEUE_SECONDS.labels(self.stage, self.lane).observe(
                max(0.0, (utcnow() - created_at).total_seconds()))


Handler = Callable[[StageContext, Any], Awaitable[str]]


async def guarded(ctx: StageContext, event: Any, handle: Handler) -> None:
    """Run `handle` on one event; whatever it raises, the message is routed (quarantine), never dropped."""
    started = time.perf_counter()
    try:
        outcome = await handle(ctx, event)
    except Exception as exc:  # the last line of defence: the message must go somewhere
        outcome = "error"
        log.exception("%s/%s failed on %s/%s/%s", ctx.stage, ctx.lane, event.message.topic,
                      event.message.partition, event.message.offset)
        try:
            await ctx.quarantine(event, "stage_error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}")
        except Exception:
            # Not even the quarantine topic takes it: stop rather than ack a message we could not route.
            log.critical("cannot quarantine; stopping the worker so the message is redelivered")
            raise SystemExit(70) from None
    STAGE_MESSAGES.labels(ctx.stage, ctx.lane, outcome).inc()
    STAGE_SECONDS.labels(ctx.stage, ctx.lane).observe(time.perf_counter() - started)


def header(event: Any, name: str) -> bytes | None:
    headers = event.headers or {}
    if isinstance(headers, Mapping):
        value = headers.get(name)
        return value if isinstance(value, bytes) or value is None else bytes(value)
    for key, value in headers:
        if key == name:
            return bytes(value)
    return None
