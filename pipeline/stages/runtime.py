"""What every stage shares: one batch loop with offsets we commit ourselves, tables, timers, output, metrics.

A stage of a lane is one consumer group (`<prefix>notify-<stage>-<lane>`), so stages and lanes lag and scale
apart. Every stage runs on the same loop, and the loop is batch-native and at-least-once by construction:

1. take what has arrived (block until the first record or the next timer, then whatever else is already
   fetched, up to the batch size: a light load never waits to fill a batch);
2. hand the batch to the stage's batch handler per input (records of a partition in offset order), which decodes,
   decides with the pure policies, and writes with one set-based statement per kind of write;
3. produce what the handler staged (events, forwards, quarantine), flush once, and check every acknowledgement;
4. only then commit the batch's offsets.

A crash anywhere re-delivers the uncommitted batch, and every stage is idempotent, so nothing is lost and nothing
is done twice. Output is staged (`StageContext.send`) and produced only once the handler has returned, so a handler
that is retried never produces twice.

Failures are sorted by kind (`is_infrastructure`):
- an infrastructure error (PostgreSQL, Redis, Kafka unreachable, a pool timeout) pauses the stage and retries the
  same batch with growing pauses; the worker reports not-ready meanwhile. Nothing is quarantined for it.
- anything else is about the data: the batch is split in halves until the record that breaks the handler is
  alone, and that record goes to the quarantine topic with the error; the rest of the batch goes on.

Why not Faust agents: faust-streaming 0.15.3 lost requests in our SIGKILL-and-restart test (its fetcher delivers
records before it seeks to the committed offsets after a rebalance, then drops them as "already read"; see
faust-streaming issues #216, #596, #606). The model is the same (an agent per stage, per-partition state in
changelog-backed tables, timers), with offsets under our control.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import logging
import time
import traceback
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
import redis.exceptions
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from pipeline import metrics
from pipeline.config import Settings
from pipeline.domain import Lane
from pipeline.errors import DecodeError
from pipeline.kafka import clients, serde, topics
from pipeline.process import health

log = logging.getLogger("notify.stage")

STAGE_MESSAGES = metrics.counter(
    "notify_stage_messages_total", "Messages a stage finished, by outcome.", ["stage", "lane", "outcome"])
STAGE_BATCH_SECONDS = metrics.histogram(
    "notify_stage_batch_seconds", "Time a stage spent on one consumed batch, from handing it over to the commit.",
    ["stage", "lane"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0))
STAGE_QUEUE_SECONDS = metrics.histogram(
    "notify_stage_queue_latency_seconds", "Time from a notification's creation to this stage picking it up.",
    ["stage", "lane"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
STAGE_BATCH = metrics.histogram(
    "notify_stage_batch_size", "Records per consumed batch.", ["stage", "lane"],
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000))
STAGE_ASSIGNED = metrics.gauge("notify_stage_assigned_partitions", "Partitions this worker owns.", ["stage", "lane"])
TABLE_PARTITIONS = metrics.gauge(
    "notify_stage_table_partitions", "Partitions of a table (its backing topic) this worker holds: those of the input "
    "partitions it owns.", ["stage", "lane", "logical_topic"])
QUARANTINED = metrics.counter(
    "notify_quarantined_total", "Messages sent to the invalid topic, by reason.", ["stage", "lane", "reason"])
ERRORS = metrics.counter(
    "notify_stage_errors_total", "Failures a worker caught and routed, by kind: message (a record broke the "
    "handler and was quarantined), infrastructure (a database, Redis or Kafka error; the batch is retried), "
    "timer, consumer (Kafka reported an error), round (a reconciler round failed).", ["stage", "lane", "kind"])
EVENTS = metrics.counter(
    "notify_delivery_events_total", "Delivery events emitted, by status.", ["stage", "lane", "status"])

HEADER_REASON = "notify-reason"
HEADER_DETAIL = "notify-detail"
HEADER_SOURCE = "notify-source"  # topic/partition/offset the quarantined bytes came from
HEADER_STAGE = "notify-stage"  # the stage that quarantined them
HEADER_RELEASED = "notify-released"  # a held message coming back; its hold is not applied again

BATCH_SIZE = 500
ASSIGNMENT_STRATEGY = "cooperative-sticky"
# Stages that serve both lanes from one consumer group (the receipts topic and the deliveries table are shared);
# they run once, in the critical lane's process slot.
LANE_FREE_STAGES = frozenset({"receipts", "reconcile"})
POLL_TIMEOUT_S = 0.5  # the longest a stage blocks with nothing arriving (timers cut it shorter)
FLUSH_TIMEOUT_S = 30.0
BATCH_RETRY_S = 120.0  # well under max.poll.interval.ms (300 s): the group must not think we died
RETRY_PAUSE_S = (0.25, 10.0)  # first and longest pause between retries of a batch that met an infrastructure error

# What an outage of a dependency raises: the batch is retried, never quarantined.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,  # connection lost, server shutting down, pool timeout, statement timeout, deadlock
    psycopg.InterfaceError,  # a closed connection or pool
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    KafkaException,
    BufferError,  # the producer's queue is full and stays full: the broker is not taking anything
    TimeoutError,
    OSError,
)


def is_infrastructure(exc: BaseException) -> bool:
    """Whether `exc` says a dependency is unavailable (retry the batch) rather than something about the data."""
    if isinstance(exc, DeliveryFailed | serde.RegistryError):
        return True
    return isinstance(exc, INFRASTRUCTURE_ERRORS)


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed Kafka record, as a handler sees it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Mapping[str, bytes]
    timestamp_ms: int

    @classmethod
    def of(cls, message: Message) -> Record:
        raw = message.headers()
        if raw:
            pairs = raw.items() if isinstance(raw, dict) else raw
            headers: Mapping[str, bytes] = {name: value.encode() if isinstance(value, str) else bytes(value or b"")
                                            for name, value in pairs}
        else:
            headers = NO_HEADERS
        return cls(message.topic() or "", message.partition() or 0, message.offset() or 0, message.key(),
                   message.value(), headers, message.timestamp()[1])

    @property
    def source(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


NO_HEADERS: Mapping[str, bytes] = {}


def records_of(messages: Iterable[Message], ctx: StageContext) -> list[Record]:
    """The records of a consumed batch; errors are logged, counted and skipped (end-of-partition is not one)."""
    records = []
    for message in messages:
        error = message.error()
        if error is None:
            records.append(Record.of(message))
        elif error.code() != KafkaError._PARTITION_EOF:
            ctx.errors("consumer").inc()
            log.warning("%s: consumer error %s", ctx.group_id, error)
    return records


class DeliveryFailed(RuntimeError):
    """Kafka did not acknowledge something a batch produced: the batch is not committed."""


@dataclass(slots=True)
class Output:
    """A record staged for producing: physical topic, key, value, headers, partition (-1: the partitioner's)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, str | bytes | None]] | None
    partition: int = -1


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


# A stage's work on the records of one input topic (or several, when they share a handler) in one consumed batch,
# each partition's records in offset order. It stages its output through ctx.send/emit/quarantine; what it raises
# is sorted by the runner (see the module docstring).
BatchHandler = Callable[[StageContext, list[Record]], Awaitable[None]]


def header(record: Record, name: str) -> bytes | None:
    return record.headers.get(name)


# ------------------------------------------------------------------------------------------------- tables


class Table:
    """Per-partition state kept in memory and backed by a compacted topic co-partitioned with the stage's input.

    Partition p of the table belongs to whoever owns partition p of the input (same key, same partitioner), so
    reads are local. When a partition is assigned, its part of the backing topic is read to the end before any
    input record of that partition is processed; afterwards `catch_up` applies what others wrote (e.g. the
    settings API) between batches. `put` writes through to the topic, so a restarted worker finds the state.
    """

    def __init__(self, ctx: StageContext, logical_topic: str, *,
                 apply: Callable[[bytes | None, bytes | None], bytes | None] | None = None,
                 on_update: Callable[[str], None] | None = None) -> None:
        self.ctx = ctx
        self.logical_topic = logical_topic
        self.topic = ctx.settings.topic(logical_topic)
        self._apply = apply or (lambda _current, new: new)
        self._on_update = on_update
        self._data: dict[int, dict[str, bytes]] = defaultdict(dict)
        self._reader: Consumer = clients.consumer(ctx.settings, f"{ctx.group_id}-table-{uuid.uuid4().hex[:8]}")
        self._owned: set[int] = set()
        self._held = TABLE_PARTITIONS.labels(ctx.stage, ctx.lane, logical_topic)

    @property
    def owned(self) -> list[int]:
        return sorted(self._owned)

    def get(self, key: str, partition: int) -> bytes | None:
        return self._data[partition].get(key)

    def items(self, partition: int) -> list[tuple[str, bytes]]:
        return list(self._data[partition].items())

    def put(self, key: str, value: bytes | None, partition: int) -> None:
        """Set (or, with None, delete) `key` in `partition`: in memory now, in the backing topic with the batch's
        output."""
        if value is None:
            self._data[partition].pop(key, None)
        else:
            self._data[partition][key] = value
        self.ctx.send(self.logical_topic, key, value, partition=partition)

    def _ingest(self, message: Message) -> None:
        key = (message.key() or b"").decode(errors="replace")
        partition = message.partition() or 0
        merged = self._apply(self._data[partition].get(key), message.value())
        if merged is None:
            self._data[partition].pop(key, None)
        else:
            self._data[partition][key] = merged
        if self._on_update is not None:
            self._on_update("deleted" if message.value() is None else "updated")

    def restore(self, partitions: Iterable[int], timeout_s: float = 120.0) -> None:
        """Own `partitions`: read their part of the backing topic to its current end (blocking)."""
        new = sorted(set(partitions) - self._owned)
        if not new:
            return
        deadline = time.monotonic() + timeout_s
        ends = {}
        for p in new:
            low, high = self._watermarks(p, deadline)
            if high > low:
                ends[p] = high
            self._data[p] = {}
        self._reader.incremental_assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in new])
        self._owned.update(new)
        self._held.set(len(self._owned))
        restored = 0
        while ends:
            if time.monotonic() > deadline:
                raise TimeoutError(f"restoring {self.topic} partitions {sorted(ends)} took over {timeout_s:.0f}s")
            for message in self._reader.consume(1000, 0.5):
                if message.error() is not None:
                    continue
                self._ingest(message)
                restored += 1
                partition, offset = message.partition() or 0, message.offset() or 0
                if offset + 1 >= ends.get(partition, 0):
                    ends.pop(partition, None)
        log.info("%s: restored %d records of %s partitions %s", self.ctx.group_id, restored, self.topic, new)

    def _watermarks(self, partition: int, deadline: float) -> tuple[int, int]:
        """The backing partition's offsets, asked again while its leadership moves (a broker lost, an election)."""
        while True:
            try:
                low, high = self._reader.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=10)
                return int(low), int(high)
            except KafkaException as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.topic}/{partition}: no offsets before the deadline ({exc})") from None
                log.warning("%s: offsets of %s/%d: %s; asking again", self.ctx.group_id, self.topic, partition, exc)
                time.sleep(0.5)

    def release(self, partitions: Iterable[int]) -> None:
        gone = sorted(set(partitions) & self._owned)
        if not gone:
            return
        self._reader.incremental_unassign([TopicPartition(self.topic, p) for p in gone])
        for p in gone:
            self._owned.discard(p)
            self._data.pop(p, None)
        self._held.set(len(self._owned))

    def catch_up(self) -> int:
        """Apply whatever arrived on the owned partitions since the last call, without waiting."""
        if not self._owned:
            return 0
        applied = 0
        for message in self._reader.consume(1000, 0):
            if message.error() is None and message.partition() in self._owned:
                self._ingest(message)
                applied += 1
        return applied

    def close(self) -> None:
        self._reader.close()


# ------------------------------------------------------------------------------------------------ the loop


@dataclass
class Timer:
    interval_s: float
    run: Callable[[], Awaitable[None]]
    name: str
    due: float = 0.0


@dataclass(frozen=True)
class FlowStep:
    """What a flow-controlled stage did with a batch: offsets it is done with, partitions to pause and resume."""

    commit: Mapping[tuple[str, int], int] = field(default_factory=dict)
    pause: Sequence[tuple[str, int]] = ()
    resume: Sequence[tuple[str, int]] = ()


class Flow(Protocol):
    """A stage that holds records back until they are due (the retry releaser): it sees every loop's batch, even an
    empty one, says which offsets it is done with (the runner commits no further), which partitions to pause or
    resume, and how long the runner may block waiting for new records."""

    def step(self, ctx: StageContext, records: list[Record], now: float) -> FlowStep: ...

    def poll_timeout(self, now: float) -> float: ...

    def revoked(self, partitions: Iterable[tuple[str, int]]) -> None: ...


@dataclass
class Stage:
    """What a stage consists of: a batch handler per input topic (or a flow), tables that follow the input's
    partitions, timers."""

    ctx: StageContext
    handlers: dict[str, BatchHandler]  # logical input topic -> handler; topics sharing a handler share its call
    tables: list[Table] = field(default_factory=list)
    timers: list[Timer] = field(default_factory=list)
    batch_size: int = BATCH_SIZE
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # run once when the runner ends
    flow: Flow | None = None  # instead of handlers: the stage decides what it is done with (see Flow)
    inputs: list[str] = field(default_factory=list)  # the flow's logical input topics

    def every(self, interval_s: float, name: str) -> Callable[[Callable[[], Awaitable[None]]],
                                                             Callable[[], Awaitable[None]]]:
        def register(run: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
            self.timers.append(Timer(interval_s, run, name))
            return run
        return register


class StageRunner:
    """Runs one Stage until `stop()`: take a batch, handle it, settle, commit; tables follow the assignment."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.ctx = stage.ctx
        self._stopping = asyncio.Event()
        self._consumer: Consumer = clients.consumer(self.ctx.settings, self.ctx.group_id, **{
            "max.poll.interval.ms": 300_000,
            "client.id": f"notify-{self.ctx.stage}-{self.ctx.lane}",
            # incremental rebalancing: a worker joining or leaving moves only the partitions that change owner;
            # the others keep flowing. (All members of a group must agree: librdkafka cannot mix it with the eager
            # range assignor, so a group moving from one to the other restarts all its workers at once.)
            "partition.assignment.strategy": ASSIGNMENT_STRATEGY,
        })
        if stage.flow is not None and stage.handlers:
            raise ValueError("a stage has handlers or a flow, not both")
        self._topics = {self.ctx.settings.topic(name): name for name in [*stage.handlers, *stage.inputs]}
        self._handler_of = {self.ctx.settings.topic(name): handler for name, handler in stage.handlers.items()}
        self._uncommitted: dict[tuple[str, int], int] = {}  # committed asynchronously, not yet known to be done
        self._owned: set[tuple[str, int]] = set()  # the partitions assigned now (the callbacks keep it)
        self._broken: Exception | None = None  # a rebalance callback failed: records must not be handled
        self._batch_seconds = STAGE_BATCH_SECONDS.labels(self.ctx.stage, self.ctx.lane)
        self._batch_size = STAGE_BATCH.labels(self.ctx.stage, self.ctx.lane)
        self._assigned = STAGE_ASSIGNED.labels(self.ctx.stage, self.ctx.lane)
        self._stall_key = f"{self.ctx.stage}/{self.ctx.lane}"
        self.ready = asyncio.Event()

    # librdkafka calls these from inside poll()/consume() in `_fetch`, on our consumer thread, between batches:
    # nothing is in flight then (each batch is handled, acknowledged and committed before the next fetch). With
    # the cooperative protocol each call names only the partitions that change: assign adds to what we own (and
    # confluent-kafka assigns them incrementally after the callback), revoke takes some away while the rest keep
    # flowing. A revoked partition's last offsets are committed before it goes, and records of it that the same
    # fetch took before the revocation are dropped (`_fetch`): its next owner starts at our last commit.
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = {tp.partition for tp in partitions}
        try:
            for table in self.stage.tables:
                table.restore(numbers)
        except Exception as exc:  # not raised into poll(): `_fetch` ends the worker (its supervisor restarts it)
            log.error("%s: restoring tables for %s failed: %s", self.ctx.group_id, sorted(numbers), exc)
            self._broken = exc
        self._owned.update((tp.topic, tp.partition) for tp in partitions)
        self._assigned.set(len(self._owned))
        log.info("%s: assigned %s, now owns %d", self.ctx.group_id,
                 sorted((tp.topic, tp.partition) for tp in partitions), len(self._owned))
        self.ready.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._owned -= gone
        # the last batch's offsets went out asynchronously: make sure the next owner starts after them
        pending = [TopicPartition(t, p, o) for (t, p), o in self._uncommitted.items() if (t, p) in gone]
        if pending:
            with contextlib.suppress(KafkaException):
                consumer.commit(offsets=pending, asynchronous=False)
        for key in gone:
            self._uncommitted.pop(key, None)
        # a table partition serves every input topic's partition of that number: release it only when none is left
        numbers = {tp.partition for tp in partitions} - {p for _, p in self._owned}
        for table in self.stage.tables:
            table.release(numbers)
        if self.stage.flow is not None:
            self.stage.flow.revoked(gone)
        self._assigned.set(len(self._owned))
        log.info("%s: revoked %s, now owns %d", self.ctx.group_id, sorted(gone), len(self._owned))

    def stop(self) -> None:
        self._stopping.set()

    # ------------------------------------------------------------------------------------------- one batch

    async def _handle(self, handler: BatchHandler, records: list[Record]) -> None:
        """Run `handler` on `records` until it succeeds: an infrastructure error retries the same records (and the
        worker reports not-ready meanwhile); any other error splits the records until the one that breaks the
        handler is alone, and quarantines it."""
        started = time.monotonic()
        pause = RETRY_PAUSE_S[0]
        mark = len(self.ctx.staged)  # what earlier handlers of the batch staged stays
        while True:
            try:
                await handler(self.ctx, records)
                return
            except Exception as exc:
                self.ctx.discard(mark)
                if not is_infrastructure(exc):
                    await self._isolate(handler, records, exc)
                    return
                if self._stopping.is_set() or time.monotonic() - started > BATCH_RETRY_S:
                    raise
                self.ctx.errors("infrastructure").inc()
                health.STALLED[self._stall_key] = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("%s: batch of %d met %s: %s; retrying in %.2fs", self.ctx.group_id, len(records),
                            type(exc).__name__, exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_PAUSE_S[1])

    async def _isolate(self, handler: BatchHandler, records: list[Record], exc: Exception) -> None:
        if len(records) == 1:
            record = records[0]
            self.ctx.errors("message").inc()
            log.error("%s: %s broke the handler: %s: %s", self.ctx.group_id, record.source, type(exc).__name__, exc)
            self.ctx.quarantine(record, "stage_error", f"{type(exc).__name__}: {exc}\n"
                                f"{''.join(traceback.format_exception(exc, limit=5))}")
            self.ctx.outcomes("error").inc()
            return
        middle = len(records) // 2  # halves in order: a partition's records stay in offset order
        await self._handle(handler, records[:middle])
        await self._handle(handler, records[middle:])

    async def _handle_batch(self, records: list[Record]) -> None:
        groups: dict[int, tuple[BatchHandler, list[Record]]] = {}
        for record in records:
            handler = self._handler_of[record.topic]
            entry = groups.get(id(handler))
            if entry is None:
                groups[id(handler)] = (handler, [record])
            else:
                entry[1].append(record)
        for handler, group in groups.values():
            await self._handle(handler, group)
        await self._settle()

    async def _settle(self) -> None:
        """Produce and acknowledge the batch's output; a broker outage is retried like any infrastructure error
        (the staged output is kept until Kafka takes it)."""
        started = time.monotonic()
        pause = RETRY_PAUSE_S[0]
        while True:
            try:
                await self.ctx.settle()
                return
            except DeliveryFailed as exc:  # what Kafka refused is staged again; the next settle produces it
                if self._stopping.is_set() or time.monotonic() - started > BATCH_RETRY_S:
                    raise
                self.ctx.errors("infrastructure").inc()
                health.STALLED[self._stall_key] = f"Kafka: {exc}"[:300]
                log.warning("%s: %s; retrying in %.2fs", self.ctx.group_id, exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_PAUSE_S[1])

    async def _run_due_timers(self) -> None:
        """Timers run between batches, on the loop: they never race a batch over tables or staged output."""
        for timer in self.stage.timers:
            now = time.monotonic()
            if now < timer.due:
                continue
            timer.due = now + timer.interval_s
            try:
                await timer.run()
                await self.ctx.settle()
            except Exception:  # a timer's failure must not end the worker: the next tick retries
                self.ctx.discard()
                self.ctx.errors("timer").inc()
                log.exception("%s: timer %s failed; retrying next tick", self.ctx.group_id, timer.name)

    def _poll_timeout(self) -> float:
        now = time.monotonic()
        timeout = POLL_TIMEOUT_S
        for timer in self.stage.timers:
            timeout = min(timeout, timer.due - now)
        if self.stage.flow is not None:
            timeout = min(timeout, self.stage.flow.poll_timeout(time.time()))
        return max(0.0, timeout)

    def _fetch(self, timeout_s: float) -> list[Message]:
        """Block until the first record (or the timeout), then take what else has already arrived, up to the batch
        size, without waiting for more; then let the tables catch up. On the consumer thread."""
        first = self._consumer.poll(timeout_s)
        messages = [] if first is None else [first, *self._consumer.consume(self.stage.batch_size - 1, 0)]
        if self._broken is not None:  # a table missing part of its partitions: nothing may be decided on it
            raise RuntimeError(f"{self.ctx.group_id}: a partition's table could not be restored: {self._broken}")
        if messages:  # a revocation inside consume(): what was fetched of those partitions is their next owner's
            owned = self._owned
            messages = [m for m in messages if m.error() is not None or (m.topic(), m.partition()) in owned]
        for table in self.stage.tables:
            table.catch_up()
        return messages

    def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Commit asynchronously: a lost commit only re-delivers a batch every stage handles idempotently, and the
        last one is committed synchronously on revoke and on close."""
        self._uncommitted.update(offsets)
        self._consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=True)

    async def run(self) -> None:
        # One thread owns the consumer and the table readers (librdkafka clients are not to be shared).
        io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"kafka-{self.ctx.stage}")
        loop = asyncio.get_running_loop()

        def on_thread(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
            return loop.run_in_executor(io, fn, *args)

        await on_thread(self._consumer.subscribe, list(self._topics),
                        self._on_assign, self._on_revoke, self._on_revoke)
        flow = self.stage.flow
        try:
            while not self._stopping.is_set():
                messages: list[Message] = await on_thread(self._fetch, self._poll_timeout())
                await self._run_due_timers()
                if not messages and flow is None:
                    continue
                started = time.monotonic()
                records = records_of(messages, self.ctx)
                if flow is not None:
                    step = flow.step(self.ctx, records, time.time())
                    await self._settle()
                    await on_thread(self._apply_flow, step)
                    continue
                offsets: dict[tuple[str, int], int] = {}
                for record in records:
                    offsets[(record.topic, record.partition)] = record.offset + 1
                self._batch_size.observe(len(messages))
                if records:
                    await self._handle_batch(records)
                health.STALLED.pop(self._stall_key, None)
                if offsets:  # everything the batch produced is acknowledged: its offsets may go
                    await on_thread(self._commit, offsets)
                self._batch_seconds.observe(time.monotonic() - started)
        finally:
            self._stopping.set()
            try:
                await self.ctx.settle()
            finally:
                await on_thread(self._close)
                io.shutdown(wait=False)
                health.STALLED.pop(self._stall_key, None)
                for close in self.stage.closers:
                    with contextlib.suppress(Exception):
                        await close()

    def _apply_flow(self, step: FlowStep) -> None:
        if step.pause:
            self._consumer.pause([TopicPartition(t, p) for t, p in step.pause])
        if step.resume:
            self._consumer.resume([TopicPartition(t, p) for t, p in step.resume])
        if step.commit:
            self._commit(dict(step.commit))

    def _close(self) -> None:
        if self._uncommitted:
            with contextlib.suppress(KafkaException):
                self._consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in self._uncommitted.items()],
                                      asynchronous=False)
        self._consumer.close()  # leaves the group at once: the partitions move without a session timeout
        for table in self.stage.tables:
            table.close()
