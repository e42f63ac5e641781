"""The one place Kafka clients are made (confluent-kafka): producer, consumer and admin factories.

Everything (the stages, the ingest API, the CLI, tests) builds its clients here, so that delivery guarantees
and partitioning are set once.
"""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from pipeline.config import Settings

# Durable, ordered, never-duplicated produce: acks from every in-sync replica and the idempotent producer
# (which also bounds in-flight requests so that retries keep order per partition).
PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "enable.idempotence": True,
    "compression.type": "lz4",
    "linger.ms": 5,
    "delivery.timeout.ms": 30_000,
    "request.timeout.ms": 10_000,
    # Kafka's Java default (murmur2 of the key): a user's records land on the same partition whoever produced
    # them (Java or Python upstreams, our stages), which per-user state (settings, dedup) depends on.
    "partitioner": "murmur2_random",
}

# Offsets are committed by us, after the work is done and its output produced (at-least-once).
CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
    "isolation.level": "read_committed",
    "session.timeout.ms": 10_000,
}


def _base(settings: Settings) -> dict[str, Any]:
    return {"bootstrap.servers": settings.bootstrap_servers, "client.id": "notify"}


def producer(settings: Settings, **overrides: Any) -> Producer:
    """An idempotent, acks=all producer."""
    return Producer({**_base(settings), **PRODUCER_DEFAULTS, **overrides})


def consumer(settings: Settings, group_id: str, **overrides: Any) -> Consumer:
    """A manual-commit consumer in `group_id`."""
    return Consumer({**_base(settings), **CONSUMER_DEFAULTS, "group.id": group_id, **overrides})


def admin(settings: Settings, **overrides: Any) -> AdminClient:
    return AdminClient({**_base(settings), **overrides})


def check_cluster(settings: Settings, timeout_s: float = 5.0, client: AdminClient | None = None) -> None:
    """Return when a broker answers a metadata request within `timeout_s`; raise saying why not."""
    client = client or admin(settings, **{"socket.connection.setup.timeout.ms": int(timeout_s * 1000)})
    if not client.list_topics(timeout=timeout_s).brokers:
        raise KafkaException("no broker in the cluster metadata")


def broker_ids(settings: Settings, timeout_s: float = 5.0) -> set[int]:
    """The ids of the brokers the cluster's metadata lists (empty when nobody answers within `timeout_s`)."""
    client = admin(settings, **{"socket.connection.setup.timeout.ms": int(timeout_s * 1000)})
    try:
        return set(client.list_topics(timeout=timeout_s).brokers)
    except Exception:  # KafkaException on timeout: nobody to ask
        return set()


def cluster_ready(settings: Settings, timeout_s: float = 5.0) -> bool:
    """True when a broker answers a metadata request within `timeout_s`."""
    try:
        check_cluster(settings, timeout_s)
    except Exception:  # KafkaException on timeout; anything else means "not ready" just the same
        return False
    return True


def end_offset(consumer: Consumer, partition: TopicPartition, timeout_s: float = 20.0) -> int:
    """The partition's high watermark; retried while a freshly created partition has no leader yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return int(consumer.get_watermark_offsets(partition, timeout=10)[1])
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def read_to_end(settings: Settings, topic: str, reader: str, timeout_s: float = 10.0) -> list[Message]:
    """Every record `topic` (as named on the cluster) keeps, up to its end now, read without committing anything
    (`reader` names the group, which is never used to commit). KafkaException when the topic is missing,
    TimeoutError when the broker stops answering before the end."""
    reading = consumer(settings, reader, **{"enable.auto.commit": False})
    try:
        metadata = reading.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise KafkaException(f"topic {topic} is not on the cluster (run `notify topics apply`)")
        ends = {p: end_offset(reading, TopicPartition(topic, p)) for p in metadata.partitions}
        todo = {p for p, end in ends.items() if end > 0}
        reading.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in todo])
        found: list[Message] = []
        deadline = time.monotonic() + timeout_s  # since the last record: the broker stopped answering
        while todo:
            # consume() waits for a full batch or its timeout: short waits, or every read of a topic smaller than
            # a batch would take the whole timeout
            messages = reading.consume(500, 0.2)
            if not messages:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{topic}: no records within {timeout_s:.0f}s while {sorted(todo)} had more")
                continue
            deadline = time.monotonic() + timeout_s
            for message in messages:
                if message.error() is not None:
                    continue
                found.append(message)
                if (message.offset() or 0) + 1 >= ends[message.partition() or 0]:
                    todo.discard(message.partition() or 0)
        return found
    finally:
        reading.close()


def delete_prefixed(settings: Settings, *, groups: bool = False) -> tuple[list[str], list[str], list[str]]:
    """Delete every topic (and with `groups`, every consumer group) named with `settings.topic_prefix`, which
    must not be empty; (topics deleted, groups deleted, groups kept with why)."""
    prefix = settings.topic_prefix
    if not prefix:
        raise ValueError("refusing to delete without a topic prefix")
    client = admin(settings)
    names = [n for n in client.list_topics(timeout=10).topics if n.startswith(prefix)]
    for future in (client.delete_topics(names, operation_timeout=30).values() if names else []):
        future.result(timeout=60)
    deleted: list[str] = []
    kept: list[str] = []
    if groups:
        listed = client.list_consumer_groups(request_timeout=10).result(timeout=30)
        mine = [g.group_id for g in listed.valid if g.group_id.startswith(prefix)]
        for group, future in (client.delete_consumer_groups(mine, request_timeout=30).items() if mine else []):
            try:
                future.result(timeout=60)
                deleted.append(group)
            except KafkaException as exc:  # e.g. still has members (a SIGKILLed worker): the broker expires it
                kept.append(f"{group} ({exc})")
    return names, deleted, kept
