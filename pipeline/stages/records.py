"""What a stage reads and stages: the consumed Record, the Output staged for producing, the headers a stage sets on
what it quarantines or releases, and how a failure is sorted (`is_infrastructure`: retry the batch, or quarantine
the record that broke it)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass

import psycopg
import redis.exceptions
from confluent_kafka import KafkaException, Message

from pipeline.kafka import serde

HEADER_REASON = "notify-reason"
HEADER_DETAIL = "notify-detail"
HEADER_SOURCE = "notify-source"  # topic/partition/offset the quarantined bytes came from
HEADER_STAGE = "notify-stage"  # the stage that quarantined them
HEADER_RELEASED = "notify-released"  # a held message coming back; its hold is not applied again

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


def header(record: Record, name: str) -> bytes | None:
    return record.headers.get(name)
