"""The lag exporter: queue depth of every consumer group of the pipeline, read from Kafka itself.

Every `NOTIFY_EXPORTER_INTERVAL_S` it reads, through the AdminClient, the committed offset of each of our groups
(`{prefix}notify-...`) on each partition and the high watermark of each declared topic, and serves:

- `notify_consumer_lag_messages{group,stage,lane,topic,partition}`: high watermark - committed offset;
- `notify_topic_end_offset{topic,logical_topic,partition}`: the high watermark, so the DLQ and quarantine topics
  show how much they hold (and how fast they grow) without any consumer;
- `notify_exporter_last_success_timestamp_seconds` and `notify_exporter_errors_total`, so a stale exporter alerts.

It reads committed offsets, not the workers' own view, so it sees a group whose workers are all dead (the lag
that matters most). It runs as `notify exporter` and as a child of `notify worker --all`; its metrics and health
are on the port after the workers'. When Kafka does not answer, the last figures stay served and the error
counter and the staleness timestamp tell the alert rules.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._listoffsets import OffsetSpec
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline import metrics
from pipeline.config import Settings
from pipeline.domain import LANES, STAGES
from pipeline.kafka import clients, topics

log = logging.getLogger("notify.exporter")

REQUEST_TIMEOUT_S = 10.0
LAST_SUCCESS = metrics.gauge("notify_exporter_last_success_timestamp_seconds",
                             "When the lag exporter last read every group's offsets (Unix time).")
ERRORS = metrics.counter("notify_exporter_errors_total", "Lag exporter rounds that failed, by what failed.",
                         ["kind"])


LAG_LABELS = ("group", "stage", "lane", "topic", "partition")
END_LABELS = ("topic", "logical_topic", "partition")
metrics.declare("notify_consumer_lag_messages", "gauge", LAG_LABELS)
metrics.declare("notify_topic_end_offset", "gauge", END_LABELS)


@dataclass(frozen=True)
class GroupLabels:
    stage: str
    lane: str


def group_labels(group: str, prefix: str) -> GroupLabels | None:
    """The stage and lane of one of our consumer groups (`{prefix}notify-{stage}[-{lane}]`), or None if it is not
    a stage's group (another prefix, a table reader's private group, a tool's group)."""
    head = f"{prefix}notify-"
    if not group.startswith(head):
        return None
    rest = group[len(head):]
    for stage in STAGES:
        if rest == stage:
            return GroupLabels(stage, "")
        for lane in LANES:
            if rest == f"{stage}-{lane}":
                return GroupLabels(stage, lane)
    return None


def lag(committed: int, end: int) -> int | None:
    """Messages behind: end - committed; None when the group has no commit there (librdkafka's negative
    sentinels), since "how far behind" is then a matter of auto.offset.reset, not a fact."""
    if committed < 0 or end < 0:
        return None
    return max(0, end - committed)


@dataclass
class Snapshot:
    # (group, stage, lane, topic, partition) -> lag
    lags: dict[tuple[str, str, str, str, int], int] = field(default_factory=dict)
    # (topic, logical topic, partition) -> high watermark
    ends: dict[tuple[str, str, int], int] = field(default_factory=dict)


def build_snapshot(ends: Mapping[tuple[str, int], int], logical: Mapping[str, str],
                   committed: Mapping[str, Iterable[tuple[str, int, int]]], prefix: str) -> Snapshot:
    """Plain data in, metric values out: `ends` (topic, partition) -> high watermark, `logical` topic -> its
    name in topics/, `committed` group -> (topic, partition, offset)..."""
    snapshot = Snapshot(ends={(t, logical[t], p): end for (t, p), end in ends.items() if t in logical})
    for group, offsets in committed.items():
        labels = group_labels(group, prefix)
        if labels is None:
            continue
        for topic, partition, offset in offsets:
            behind = lag(offset, ends.get((topic, partition), -1))
            if behind is not None:
                snapshot.lags[(group, labels.stage, labels.lane, topic, partition)] = behind
    return snapshot


class LagCollector(Collector):
    """Serves the latest snapshot at scrape time: series of partitions or groups that went away go with it."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self.snapshot
        lags = GaugeMetricFamily("notify_consumer_lag_messages",
                                 "Messages a consumer group has not committed yet: high watermark - committed offset.",
                                 labels=list(LAG_LABELS))
        for (group, stage, lane, topic, partition), value in sorted(snapshot.lags.items()):
            lags.add_metric([group, stage, lane, topic, str(partition)], value)
        yield lags
        ends = GaugeMetricFamily("notify_topic_end_offset", "High watermark of a partition of a declared topic.",
                                 labels=list(END_LABELS))
        for (topic, name, partition), value in sorted(snapshot.ends.items()):
            ends.add_metric([topic, name, str(partition)], value)
        yield ends


class LagExporter:
    """Reads offsets every interval (on a thread: the AdminClient blocks) into the collector."""

    def __init__(self, settings: Settings, collector: LagCollector | None = None) -> None:
        self.settings = settings
        self.collector = collector or LagCollector()
        self._admin: AdminClient = clients.admin(settings)
        self._stopping = threading.Event()

    def read(self) -> Snapshot:
        prefix = self.settings.topic_prefix
        logical = {self.settings.topic(name): name for name in topics.catalogue()}
        metadata = self._admin.list_topics(timeout=REQUEST_TIMEOUT_S)
        partitions = [TopicPartition(name, p) for name, topic in metadata.topics.items()
                      if name in logical and topic.error is None for p in topic.partitions]
        ends: dict[tuple[str, int], int] = {}
        if partitions:
            latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
            futures = self._admin.list_offsets({tp: latest for tp in partitions},
                                               request_timeout=REQUEST_TIMEOUT_S)
            for tp, future in futures.items():
                try:
                    ends[(tp.topic, tp.partition)] = future.result().offset
                except KafkaException as exc:  # e.g. a leader moving: that partition waits for the next round
                    ERRORS.labels("partition").inc()
                    log.info("no high watermark for %s/%d this round: %s", tp.topic, tp.partition, exc)
        listed = self._admin.list_consumer_groups(request_timeout=REQUEST_TIMEOUT_S).result()
        committed: dict[str, list[tuple[str, int, int]]] = {}
        for listing in listed.valid:
            group = listing.group_id
            if group_labels(group, prefix) is None:
                continue
            # one group per request (librdkafka's rule for this call)
            result = self._admin.list_consumer_group_offsets(
                [ConsumerGroupTopicPartitions(group)], request_timeout=REQUEST_TIMEOUT_S)[group].result()
            committed[group] = [(tp.topic, tp.partition, tp.offset) for tp in result.topic_partitions or []
                                if tp.error is None]
        return build_snapshot(ends, logical, committed, prefix)

    def round(self) -> bool:
        try:
            self.collector.snapshot = self.read()
        except Exception as exc:  # Kafka away or slow: keep the last figures, count it, try next round
            ERRORS.labels(type(exc).__name__).inc()
            log.warning("lag exporter round failed: %s", exc)
            return False
        LAST_SUCCESS.set(time.time())
        return True

    async def run(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            await asyncio.to_thread(self.round)
            remaining = self.settings.exporter_interval_s - (time.monotonic() - started)
            await asyncio.to_thread(self._stopping.wait, max(0.0, remaining))

    def stop(self) -> None:
        self._stopping.set()


def build(settings: Settings) -> LagExporter:
    """The exporter, its collector registered in the default registry (served at /metrics)."""
    exporter = LagExporter(settings)
    REGISTRY.register(exporter.collector)
    return exporter
