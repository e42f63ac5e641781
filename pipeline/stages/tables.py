"""Tables: a stage's per-partition state, in memory and backed by a compacted topic co-partitioned with its input;
they follow the stage's assignment (restored on assign, released on revoke, caught up between batches)."""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from pipeline import metrics
from pipeline.kafka import clients
from pipeline.stages.context import StageContext

log = logging.getLogger("notify.stage")

TABLE_PARTITIONS = metrics.gauge(
    "notify_stage_table_partitions", "Partitions of a table (its backing topic) this worker holds: those of the input "
    "partitions it owns.", ["stage", "lane", "logical_topic"])


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
