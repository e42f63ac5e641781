"""The one place Kafka clients are made (confluent-kafka): producer, consumer and admin factories.

Everything (the stages, the ingest API, the CLI, tests) builds its clients here, so that delivery guarantees
and partitioning are set once.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import Consumer, Producer
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


def cluster_ready(settings: Settings, timeout_s: float = 5.0) -> bool:
    """True when a broker answers a metadata request within `timeout_s`."""
    try:
        metadata = admin(settings, **{"socket.connection.setup.timeout.ms": int(timeout_s * 1000)}).list_topics(
            timeout=timeout_s
        )
    except Exception:  # KafkaException on timeout; anything else means "not ready" just the same
        return False
    return bool(metadata.brokers)
