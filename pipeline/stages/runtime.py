"""What every stage shares: its consumer loop with offsets we commit ourselves, tables, timers, output, metrics.

A stage of a lane is one consumer group (`<prefix>notify-<stage>-<lane>`), so stages and lanes lag and scale
apart. The loop is at-least-once by construction: consume a batch, run the handler on every record (records
of one partition in order, partitions side by side), wait until Kafka acknowledged everything the batch
produced, and only then commit the batch's offsets. A crash anywhere re-delivers the uncommitted batch, and
every stage is idempotent, so nothing is lost and nothing is done twice.

Why not Faust agents: faust-streaming 0.15.3 lost requests in our SIGKILL-and-restart test (its fetcher
delivers records before it seeks to the committed offsets after a rebalance, then drops them as "already read":
the log showed `DROPPED MESSAGE ROFF n` for records no agent ever saw; see faust-streaming issues #216, #596).
The model is the same (an agent per stage, per-partition state in changelog-backed tables, timers), with
offsets under our control.

Every handler runs under `guarded`: whatever it raises, the record goes to quarantine with the reason; if not
even quarantine takes it, the worker stops without committing, so the record is redelivered.
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
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer, TopicPartition

from pipeline import kafka, metrics, serde, topics
from pipeline.config import Settings
from pipeline.domain import Lane
from pipeline.errors import DecodeError

log = logging.getLogger("notify.stage")

STAGE_MESSAGES = metrics.counter(
    "notify_stage_messages_total", "Messages a stage finished, by outcome.", ["stage", "lane", "outcome"])
STAGE_SECONDS = metrics.histogram(
    "notify_stage_processing_seconds", "Time a stage spent on one message.", ["stage", "lane"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
STAGE_QUEUE_SECONDS = metrics.histogram(
    "notify_stage_queue_latency_seconds", "Time from a notification's creation to this stage picking it up.",
    ["stage", "lane"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
STAGE_BATCH = metrics.histogram(
    "notify_stage_batch_size", "Records per consumed batch.", ["stage", "lane"],
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000))
STAGE_ASSIGNED = metrics.gauge("notify_stage_assigned_partitions", "Partitions this worker owns.", ["stage", "lane"])
QUARANTINED = metrics.counter(
    "notify_quarantined_total", "Messages sent to the invalid topic, by reason.", ["stage", "lane", "reason"])
ERRORS = metrics.counter(
    "notify_stage_errors_total", "Failures a worker caught and routed, by kind: message (the handler raised; the "
    "message was quarantined), batch (a batch handler failed and is retried), timer, consumer (Kafka reported an "
    "error), round (a releaser or reconciler round failed).", ["stage", "lane", "kind"])
EVENTS = metrics.counter(
    "notify_delivery_events_total", "Delivery events emitted, by status.", ["stage", "lane", "status"])

HEADER_REASON = "notify-reason"
HEADER_DETAIL = "notify-detail"
HEADER_SOURCE = "notify-source"  # topic/partition/offset the quarantined bytes came from
HEADER_RELEASED = "notify-released"  # a held message coming back; its hold is not applied again

BATCH_SIZE = 500
# Stages that serve both lanes from one consumer group (the receipts topic and the deliveries table are shared);
# they run once, in the critical lane's process slot.
LANE_FREE_STAGES = frozenset({"receipts", "reconcile"})
POLL_TIMEOUT_S = 0.2
FLUSH_TIMEOUT_S = 30.0
BATCH_RETRY_S = 120.0  # well under max.poll.interval.ms (300 s): the group must not think we died


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
        raw = message.headers() or []
        pairs = raw.items() if isinstance(raw, dict) else raw
        headers = {name: value.encode() if isinstance(value, str) else bytes(value or b"") for name, value in pairs}
        return cls(topic=message.topic() or "", partition=message.partition() or 0, offset=message.offset() or 0,
                   key=message.key(), value=message.value(), headers=headers, timestamp_ms=message.timestamp()[1])

    @property
    def source(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


def records_of(messages: Iterable[Message], ctx: StageContext) -> list[Record]:
    """The records of a consumed batch; errors are logged, counted and skipped (end-of-partition is not one)."""
    records = []
    for message in messages:
        error = message.error()
        if error is None:
            records.append(Record.of(message))
        elif error.code() != KafkaError._PARTITION_EOF:
            ERRORS.labels(ctx.stage, ctx.lane, "consumer").inc()
            log.warning("%s: consumer error %s", ctx.group_id, error)
    return records


class DeliveryFailed(RuntimeError):
    """Kafka did not acknowledge something a batch produced: the batch is not committed."""


@dataclass
class StageContext:
    """One stage of one lane: its producer, the serializer, and how it reports (events, quarantine, metrics)."""

    settings: Settings
    stage: str
    lane: Lane
    producer: Producer
    codec: serde.AvroSerde = field(default_factory=serde.AvroSerde)
    pending: list[concurrent.futures.Future[None]] = field(default_factory=list)

    @property
    def group_id(self) -> str:
        if self.stage in LANE_FREE_STAGES:
            return f"{self.settings.topic_prefix}notify-{self.stage}"
        return f"{self.settings.topic_prefix}notify-{self.stage}-{self.lane}"

    def send(self, logical_name: str, key: str | bytes | None, value: bytes | None,
             headers: Mapping[str, bytes] | None = None, partition: int | None = None,
             ) -> concurrent.futures.Future[None]:
        """Produce without waiting; the returned future (also kept in `pending`) completes when Kafka acks."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(DeliveryFailed(f"{logical_name}: {error}"))

        extra: dict[str, Any] = {} if partition is None else {"partition": partition}
        while True:
            try:
                self.producer.produce(self.settings.topic(logical_name), value=value,
                                      key=key.encode() if isinstance(key, str) else key,
                                      headers=list((headers or {}).items()), on_delivery=on_delivery, **extra)
                break
            except BufferError:  # the local queue is full: let deliveries drain, then try again
                self.producer.poll(0.1)
        self.pending.append(done)
        return done

    async def settle(self, futures: Sequence[concurrent.futures.Future[None]] | None = None) -> None:
        """Wait until Kafka acknowledged `futures` (default: everything produced so far); raise if any failed."""
        waiting = list(self.pending if futures is None else futures)
        if futures is None:
            self.pending = []
        if not waiting:
            return
        remaining = await asyncio.to_thread(self.producer.flush, FLUSH_TIMEOUT_S)
        if remaining:
            raise DeliveryFailed(f"{remaining} messages not acknowledged within {FLUSH_TIMEOUT_S:.0f}s")
        for future in waiting:
            future.result(timeout=0)  # raises DeliveryFailed

    async def emit(self, request: Mapping[str, Any], status: str, *, channel: str | None = None,
                   provider: str | None = None, attempt: int = 0, error_code: str | None = None,
                   error_message: str | None = None, lane: str | None = None) -> None:
        """One DeliveryEvent on delivery-events for a state change of `request` (a request or a task); `lane`
        for stages that serve both lanes (default: this stage's)."""
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
            "occurred_at": utcnow(),
            "created_at": request.get("created_at"),
            "correlation_id": request.get("correlation_id"),
        }
        self.send(topics.DELIVERY_EVENTS, request["user_id"], self.codec.encode(serde.DELIVERY_EVENT, event))
        EVENTS.labels(self.stage, lane or self.lane, status).inc()

    async def quarantine(self, record: Record, reason: str, detail: str) -> None:
        """The original bytes to `invalid`, with why and where from in headers."""
        headers = {
            HEADER_REASON: reason.encode(),
            HEADER_DETAIL: detail[:2000].encode(errors="replace"),
            HEADER_SOURCE: record.source.encode(),
            "notify-stage": self.stage.encode(),
        }
        self.send(topics.INVALID, record.key, record.value, headers)
        QUARANTINED.labels(self.stage, self.lane, reason).inc()
        log.warning("quarantined %s: %s %s", record.source, reason, detail)

    async def decode_or_quarantine(self, record: Record, name: str) -> dict[str, Any] | None:
        """The record `record` carries, or None after sending undecodable bytes to quarantine."""
        try:
            if record.value is None:
                raise DecodeError("empty", "a null value (tombstone) where a record was expected")
            value: dict[str, Any] = self.codec.decode(record.value, expected=name).value
        except DecodeError as exc:
            await self.quarantine(record, exc.reason, str(exc))
            return None
        self.observe_queue_latency(value.get("created_at"))
        return value

    def observe_queue_latency(self, created_at: datetime.datetime | None) -> None:
        if created_at is not None:
            STAGE_QUEUE_SECONDS.labels(self.stage, self.lane).observe(
                max(0.0, (utcnow() - created_at).total_seconds()))


Handler = Callable[[StageContext, Record], Awaitable[str]]
# A stage that handles a whole batch at once (the sender: one claim query for the batch, every send in flight
# together). It routes bad records itself (quarantine); what it raises is an infrastructure failure, and the runner
# retries the batch (see StageRunner._handle_batch).
BatchHandler = Callable[[StageContext, list[Record]], Awaitable[None]]


async def guarded(ctx: StageContext, record: Record, handle: Handler) -> None:
    """Run `handle` on one record; whatever it raises, the record is routed (quarantine), never dropped."""
    started = time.perf_counter()
    try:
        outcome = await handle(ctx, record)
    except Exception as exc:  # the last line of defence: the message must go somewhere
        outcome = "error"
        ERRORS.labels(ctx.stage, ctx.lane, "message").inc()
        log.exception("%s/%s failed on %s", ctx.stage, ctx.lane, record.source)
        await ctx.quarantine(record, "stage_error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}")
    STAGE_MESSAGES.labels(ctx.stage, ctx.lane, outcome).inc()
    STAGE_SECONDS.labels(ctx.stage, ctx.lane).observe(time.perf_counter() - started)


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
        self._reader: Consumer = kafka.consumer(ctx.settings, f"{ctx.group_id}-table-{uuid.uuid4().hex[:8]}")
        self._owned: set[int] = set()

    @property
    def owned(self) -> list[int]:
        return sorted(self._owned)

    def get(self, key: str, partition: int) -> bytes | None:
        return self._data[partition].get(key)

    def items(self, partition: int) -> list[tuple[str, bytes]]:
        return list(self._data[partition].items())

    def put(self, key: str, value: bytes | None, partition: int) -> concurrent.futures.Future[None]:
        """Set (or, with None, delete) `key` in `partition`: in memory now, in the backing topic when acked."""
        if value is None:
            self._data[partition].pop(key, None)
        else:
            self._data[partition][key] = value
        return self.ctx.send(self.logical_topic, key, value, partition=partition)

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
        ends = {}
        for p in new:
            low, high = self._reader.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)
            if high > low:
                ends[p] = high
            self._data[p] = {}
        self._reader.incremental_assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in new])
        self._owned.update(new)
        deadline = time.monotonic() + timeout_s
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

    def release(self, partitions: Iterable[int]) -> None:
        gone = sorted(set(partitions) & self._owned)
        if not gone:
            return
        self._reader.incremental_unassign([TopicPartition(self.topic, p) for p in gone])
        for p in gone:
            self._owned.discard(p)
            self._data.pop(p, None)

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


@dataclass
class Stage:
    """What a stage consists of: handlers per input topic, tables that follow the input's partitions, timers."""

    ctx: StageContext
    handlers: dict[str, Handler]  # logical input topic -> handler
    tables: list[Table] = field(default_factory=list)
    timers: list[Timer] = field(default_factory=list)
    batch_handler: BatchHandler | None = None  # instead of per-record handlers, when set ...
    inputs: list[str] = field(default_factory=list)  # ... reading these logical topics
    batch_size: int = BATCH_SIZE
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # run once when the runner ends

    def every(self, interval_s: float, name: str) -> Callable[[Callable[[], Awaitable[None]]],
                                                             Callable[[], Awaitable[None]]]:
        def register(run: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
            self.timers.append(Timer(interval_s, run, name))
            return run
        return register


class StageRunner:
    """Runs one Stage until `stop()`: consume, handle, settle, commit; tables follow the assignment."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.ctx = stage.ctx
        self._stopping = asyncio.Event()
        self._consumer: Consumer = kafka.consumer(self.ctx.settings, self.ctx.group_id, **{
            "max.poll.interval.ms": 300_000,
            "client.id": f"notify-{self.ctx.stage}-{self.ctx.lane}",
        })
        self._topics = {self.ctx.settings.topic(name): name for name in [*stage.handlers, *stage.inputs]}
        if stage.batch_handler is not None and stage.handlers:
            raise ValueError("a stage has per-record handlers or a batch handler, not both")
        self.ready = asyncio.Event()

    # librdkafka calls these from inside consume(), on our consumer thread, between batches: nothing is in
    # flight then (each batch is committed before the next consume), so an eager rebalance loses nothing.
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = {tp.partition for tp in partitions}
        for table in self.stage.tables:
            table.restore(numbers)
        STAGE_ASSIGNED.labels(self.ctx.stage, self.ctx.lane).set(len(partitions))
        log.info("%s: assigned %s", self.ctx.group_id, sorted((tp.topic, tp.partition) for tp in partitions))
        self.ready.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = {tp.partition for tp in partitions}
        for table in self.stage.tables:
            table.release(numbers)
        STAGE_ASSIGNED.labels(self.ctx.stage, self.ctx.lane).set(0)
        log.info("%s: revoked %s", self.ctx.group_id, sorted((tp.topic, tp.partition) for tp in partitions))

    def stop(self) -> None:
        self._stopping.set()

    async def _handle_partition(self, records: list[Record]) -> None:
        for record in records:
            await guarded(self.ctx, record, self.stage.handlers[self._topics[record.topic]])

    async def _handle_batch(self, records: list[Record]) -> None:
        """The batch handler, retried while it fails (a database or Redis outage) with growing pauses.

        Nothing is committed meanwhile. If it still fails after BATCH_RETRY_S, or the worker is stopping, the error
        propagates: the worker ends without committing and the batch is redelivered to whoever owns it next.
        """
        assert self.stage.batch_handler is not None
        started = time.monotonic()
        pause = 0.5
        while True:
            try:
                await self.stage.batch_handler(self.ctx, records)
                return
            except Exception:
                if self._stopping.is_set() or time.monotonic() - started > BATCH_RETRY_S:
                    raise
                ERRORS.labels(self.ctx.stage, self.ctx.lane, "batch").inc()
                log.exception("%s: batch of %d failed; retrying in %.1fs", self.ctx.group_id, len(records), pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 10.0)

    async def _run_due_timers(self) -> None:
        """Timers run between batches, on the loop: they never race a batch over tables or pending sends."""
        for timer in self.stage.timers:
            now = time.monotonic()
            if now < timer.due:
                continue
            timer.due = now + timer.interval_s
            try:
                await timer.run()
                await self.ctx.settle()
            except Exception:  # a timer's failure must not end the worker: the next tick retries
                ERRORS.labels(self.ctx.stage, self.ctx.lane, "timer").inc()
                log.exception("%s: timer %s failed; retrying next tick", self.ctx.group_id, timer.name)

    async def run(self) -> None:
        # One thread owns the consumer and the table readers (librdkafka clients are not to be shared).
        io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"kafka-{self.ctx.stage}")
        loop = asyncio.get_running_loop()

        def on_thread(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
            return loop.run_in_executor(io, fn, *args)

        await on_thread(self._consumer.subscribe, list(self._topics),
                        self._on_assign, self._on_revoke, self._on_revoke)
        try:
            while not self._stopping.is_set():
                messages: list[Message] = await on_thread(self._consumer.consume, self.stage.batch_size,
                                                          POLL_TIMEOUT_S)
                for table in self.stage.tables:
                    await on_thread(table.catch_up)
                await self._run_due_timers()
                if not messages:
                    continue
                by_partition: dict[tuple[str, int], list[Record]] = defaultdict(list)
                offsets: dict[tuple[str, int], int] = {}
                for record in records_of(messages, self.ctx):
                    by_partition[(record.topic, record.partition)].append(record)
                    offsets[(record.topic, record.partition)] = record.offset + 1
                STAGE_BATCH.labels(self.ctx.stage, self.ctx.lane).observe(len(messages))
                if self.stage.batch_handler is not None:
                    await self._handle_batch([r for rs in by_partition.values() for r in rs])
                else:
                    await asyncio.gather(*(self._handle_partition(rs) for rs in by_partition.values()))
                await self.ctx.settle()  # everything the batch produced is acknowledged ...
                if offsets:  # ... before its offsets are committed
                    await on_thread(self._commit, [TopicPartition(t, p, o) for (t, p), o in offsets.items()])
        finally:
            self._stopping.set()
            try:
                await self.ctx.settle()
            finally:
                await on_thread(self._close)
                io.shutdown(wait=False)
                for close in self.stage.closers:
                    with contextlib.suppress(Exception):
                        await close()

    def _commit(self, offsets: list[TopicPartition]) -> None:
        self._consumer.commit(offsets=offsets, asynchronous=False)

    def _close(self) -> None:
        self._consumer.close()  # leaves the group at once: the partitions move without a session timeout
        for table in self.stage.tables:
            table.close()
