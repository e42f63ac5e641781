"""The loop every stage runs on: one batch loop with offsets we commit ourselves, timers, flow control, metrics.

What a stage stages and reports through is its context (pipeline/stages/context.py), what it reads are records
(records.py), and its per-partition state is in tables (tables.py).

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
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from pipeline import metrics
from pipeline.kafka import clients
from pipeline.process import health
from pipeline.stages.context import StageContext
from pipeline.stages.records import DeliveryFailed, Record, is_infrastructure
from pipeline.stages.tables import Table

log = logging.getLogger("notify.stage")

STAGE_BATCH_SECONDS = metrics.histogram(
    "notify_stage_batch_seconds", "Time a stage spent on one consumed batch, from handing it over to the commit.",
    ["stage", "lane"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0))
STAGE_BATCH = metrics.histogram(
    "notify_stage_batch_size", "Records per consumed batch.", ["stage", "lane"],
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000))
STAGE_ASSIGNED = metrics.gauge("notify_stage_assigned_partitions", "Partitions this worker owns.", ["stage", "lane"])

BATCH_SIZE = 500
ASSIGNMENT_STRATEGY = "cooperative-sticky"
POLL_TIMEOUT_S = 0.5  # the longest a stage blocks with nothing arriving (timers cut it shorter)
BATCH_RETRY_S = 120.0  # well under max.poll.interval.ms (300 s): the group must not think we died
RETRY_PAUSE_S = (0.25, 10.0)  # first and longest pause between retries of a batch that met an infrastructure error


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


# A stage's work on the records of one input topic (or several, when they share a handler) in one consumed batch,
# each partition's records in offset order. It stages its output through ctx.send/emit/quarantine; what it raises
# is sorted by the runner (see the module docstring).
BatchHandler = Callable[[StageContext, list[Record]], Awaitable[None]]


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
