"""`notify replay`: move a consumer group's committed offsets back (or forward) so its stage re-reads a topic.

    notify replay --group notify-sender-critical --topic send.sms.critical --to-datetime 2026-11-21T09:00:00Z --dry-run
    notify replay --group notify-routing-bulk --topic routed.bulk --shift-by -5000
    notify replay --group notify-intake-critical --topic requests.critical --to-offset 0

When to use it: a provider outage or a bug made a stage mishandle a stretch of a topic, and you want the stage to
process that stretch again once the cause is fixed. Every stage is idempotent (the dedup table and PostgreSQL's
unique key at intake, final delivery rows at preferences and routing, the claim at the sender), so a replay
re-drives only what never reached a final state and sends nothing twice.

The reset goes through the AdminClient (what `kafka-consumer-groups --reset-offsets` does, and that tool works
the same way: `notify kafka consumer-groups ...`). Kafka only accepts new offsets for a group without active
members, so this refuses while the group's workers run, naming them: stop the stage's workers first, reset,
start them again. Targets are clamped to what the partition still holds (retention may have deleted the start).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition

from pipeline.config import Settings
from pipeline.errors import NotifyError
from pipeline.kafka import clients


class ReplayError(NotifyError):
    """The reset cannot be done (active members, unknown topic, bad arguments): the message says why."""


@dataclass(frozen=True)
class Move:
    partition: int
    committed: int | None  # None: the group has no offset for it yet
    target: int
    low: int
    high: int


def clamp(offset: int, low: int, high: int) -> int:
    return max(low, min(high, offset))


def targets(moves_from: Sequence[tuple[int, int | None, int, int]], *, to_offset: int | None = None,
            shift_by: int | None = None, by_time: dict[int, int] | None = None) -> list[Move]:
    """Pure: the new offset of each (partition, committed, low, high) for exactly one of the three modes.

    `by_time` holds the offsets Kafka found for the timestamp (-1: no record at or after it, i.e. the end).
    A shift from a partition the group never committed starts from its low watermark.
    """
    if sum(x is not None for x in (to_offset, shift_by, by_time)) != 1:
        raise ReplayError("give exactly one of --to-datetime, --to-offset, --shift-by")
    out = []
    for partition, committed, low, high in moves_from:
        if to_offset is not None:
            wanted = to_offset
        elif shift_by is not None:
            wanted = (low if committed is None or committed < 0 else committed) + shift_by
        else:
            assert by_time is not None
            found = by_time.get(partition, -1)
            wanted = high if found < 0 else found
        out.append(Move(partition, committed, clamp(wanted, low, high), low, high))
    return out


def parse_datetime(raw: str) -> datetime.datetime:
    """ISO 8601; a time without a zone is UTC (as Kafka's tool reads it in the broker's zone, say it explicitly)."""
    try:
        moment = datetime.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ReplayError(f"{raw!r} is not an ISO 8601 date-time such as 2026-11-21T09:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


@dataclass(frozen=True)
class Plan:
    """What a reset would do: each partition's move, and the group's active members (Kafka refuses the reset of a
    group in use, so a plan with members cannot be applied yet)."""

    group: str
    topic: str
    moves: list[Move]
    members: list[str]


def plan(settings: Settings, group: str, topic: str, *, to_datetime: str | None = None,
         to_offset: int | None = None, shift_by: int | None = None) -> Plan:
    """The moves of a reset, read from the cluster, changing nothing (the ops console's replay planner shows it)."""
    admin = clients.admin(settings)
    description = admin.describe_consumer_groups([group])[group].result(timeout=15)
    members = sorted(f"{m.client_id}@{m.host}" for m in description.members)
    consumer = clients.consumer(settings, group)  # never subscribes: reads watermarks and the committed offsets
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            raise ReplayError(f"no topic {topic!r} on the cluster")
        partitions = sorted(metadata.partitions)
        committed = {tp.partition: tp.offset for tp in consumer.committed(
            [TopicPartition(topic, p) for p in partitions], timeout=15)}
        current = []
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
            current.append((p, committed[p] if committed[p] >= 0 else None, low, high))
        by_time = None
        if to_datetime is not None:
            ms = int(parse_datetime(to_datetime).timestamp() * 1000)
            found = consumer.offsets_for_times([TopicPartition(topic, p, ms) for p in partitions], timeout=15)
            by_time = {tp.partition: tp.offset for tp in found}
        moves = targets(current, to_offset=to_offset, shift_by=shift_by, by_time=by_time)
    finally:
        consumer.close()
    return Plan(group, topic, moves, members)


def replay(settings: Settings, group: str, topic: str, *, to_datetime: str | None = None,
           to_offset: int | None = None, shift_by: int | None = None, dry_run: bool = False,
           out: Callable[[str], None] = print) -> list[Move]:
    planned = plan(settings, group, topic, to_datetime=to_datetime, to_offset=to_offset, shift_by=shift_by)
    if planned.members:
        raise ReplayError(f"group {group} has {len(planned.members)} active member(s) ({', '.join(planned.members)}); "
                          "stop its workers first, then reset, then start them again (Kafka refuses to move the "
                          "offsets of a group in use)")
    moves = planned.moves
    admin = clients.admin(settings)
    out(f"{'partition':>9} {'committed':>10} {'new':>10} {'low':>10} {'high':>10}")
    for move in moves:
        shown = "-" if move.committed is None else str(move.committed)
        out(f"{move.partition:>9} {shown:>10} {move.target:>10} {move.low:>10} {move.high:>10}")
    if dry_run:
        out(f"dry run: group {group} on {topic} left as it is")
        return moves
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, m.partition, m.target) for m in moves])
    try:
        admin.alter_consumer_group_offsets([request])[group].result(timeout=15)
    except KafkaException as exc:
        raise ReplayError(f"the broker refused the reset of {group}: {exc}") from exc
    out(f"group {group} on {topic}: {len(moves)} partition(s) reset")
    return moves
