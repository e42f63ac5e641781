"""`notify replay` against the real broker: plans, resets, refusals. The offset arithmetic is also unit-tested."""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]  # public, re-exported without __all__

from pipeline.config import Settings
from pipeline.kafka import clients
from pipeline.ops import replay
from pipeline.ops.replay import Move, ReplayError, targets


def test_the_three_modes_clamp_to_what_the_partition_keeps() -> None:
    current = [(0, 10, 0, 12), (1, None, 5, 9)]
    assert targets(current, to_offset=7) == [Move(0, 10, 7, 0, 12), Move(1, None, 7, 5, 9)]
    assert targets(current, to_offset=0) == [Move(0, 10, 0, 0, 12), Move(1, None, 5, 5, 9)]
    assert targets(current, shift_by=-4) == [Move(0, 10, 6, 0, 12), Move(1, None, 5, 5, 9)]
    assert targets(current, shift_by=100) == [Move(0, 10, 12, 0, 12), Move(1, None, 9, 5, 9)]
    assert targets(current, by_time={0: 3, 1: -1}) == [Move(0, 10, 3, 0, 12), Move(1, None, 9, 5, 9)]
    with pytest.raises(ReplayError, match="exactly one"):
        targets(current, to_offset=1, shift_by=1)
    with pytest.raises(ReplayError, match="ISO 8601"):
        replay.parse_datetime("yesterday")
    assert replay.parse_datetime("2026-11-21T09:00:00").tzinfo == datetime.UTC


@pytest.fixture
def topic(settings: Settings, unique: str) -> Iterator[tuple[str, list[int]]]:
    """A one-partition topic of this test with 10 records, 50 ms apart; their timestamps."""
    name = f"t{unique}.replay"
    admin = clients.admin(settings)
    admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])[name].result(timeout=30)
    producer = clients.producer(settings)
    stamps = []
    for i in range(10):
        stamps.append(int(time.time() * 1000))
        producer.produce(name, value=str(i).encode(), timestamp=stamps[-1])
        producer.flush(10)
        time.sleep(0.05)
    yield name, stamps
    admin.delete_topics([name])[name].result(timeout=30)


def committed(settings: Settings, group: str, topic: str) -> int:
    consumer = clients.consumer(settings, group)
    try:
        [tp] = consumer.committed([TopicPartition(topic, 0)], timeout=10)
        return int(tp.offset)
    finally:
        consumer.close()


def commit_at(settings: Settings, group: str, topic: str, offset: int) -> None:
    consumer = clients.consumer(settings, group)
    try:
        consumer.commit(offsets=[TopicPartition(topic, 0, offset)], asynchronous=False)
    finally:
        consumer.close()


def test_reset_by_offset_shift_and_time_and_a_dry_run_changes_nothing(
        settings: Settings, unique: str, topic: tuple[str, list[int]]) -> None:
    name, stamps = topic
    group = f"t{unique}.group"
    commit_at(settings, group, name, 10)
    lines: list[str] = []
    replay.replay(settings, group, name, to_offset=3, dry_run=True, out=lines.append)
    assert committed(settings, group, name) == 10 and "dry run" in lines[-1]
    replay.replay(settings, group, name, to_offset=3, out=lines.append)
    assert committed(settings, group, name) == 3
    replay.replay(settings, group, name, shift_by=-2, out=lines.append)
    assert committed(settings, group, name) == 1
    moment = datetime.datetime.fromtimestamp(stamps[6] / 1000, datetime.UTC).isoformat()
    replay.replay(settings, group, name, to_datetime=moment, out=lines.append)
    assert committed(settings, group, name) == 6
    replay.replay(settings, group, name, to_offset=1000, out=lines.append)
    assert committed(settings, group, name) == 10  # clamped to the end


def test_a_group_with_active_members_is_refused_by_name_and_the_cli_says_why(
        settings: Settings, unique: str, topic: tuple[str, list[int]]) -> None:
    name, _ = topic
    group = f"t{unique}.busy"
    member: Consumer = clients.consumer(settings, group, **{"client.id": "stage-worker-7"})
    member.subscribe([name])
    deadline = time.monotonic() + 30
    while not member.assignment() and time.monotonic() < deadline:
        member.poll(0.2)
    try:
        with pytest.raises(ReplayError, match=r"1 active member.*stage-worker-7.*stop its workers first"):
            replay.replay(settings, group, name, to_offset=0)
        done = subprocess.run([sys.executable, "-m", "pipeline", "replay", "--group", group, "--topic", name,
                               "--to-offset", "0"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and "active member" in done.stderr
    finally:
        member.close()
    done = subprocess.run([sys.executable, "-m", "pipeline", "replay", "--group", group, "--topic", name,
                           "--shift-by", "-1", "--dry-run"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "dry run" in done.stdout, done.stdout + done.stderr
    with pytest.raises(ReplayError, match="no topic"):
        replay.replay(settings, group, f"t{unique}.missing", to_offset=0)


def test_kafkas_own_reset_offsets_tool_from_the_stack_moves_the_group_the_same_way(
        settings: Settings, unique: str, topic: tuple[str, list[int]]) -> None:
    name, stamps = topic
    mine, theirs = f"t{unique}.ours", f"t{unique}.kafkas"
    for group in (mine, theirs):
        commit_at(settings, group, name, 10)
    replay.replay(settings, mine, name, to_offset=4, out=lambda _line: None)
    done = subprocess.run([sys.executable, "-m", "pipeline", "kafka", "consumer-groups", "--group", theirs,
                           "--topic", name, "--reset-offsets", "--to-offset", "4", "--execute"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert committed(settings, theirs, name) == committed(settings, mine, name) == 4
    moment = datetime.datetime.fromtimestamp(stamps[7] / 1000, datetime.UTC)
    replay.replay(settings, mine, name, to_datetime=moment.isoformat(), out=lambda _line: None)
    done = subprocess.run([sys.executable, "-m", "pipeline", "kafka", "consumer-groups", "--group", theirs,
                           "--topic", name, "--reset-offsets", "--to-datetime",
                           moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}", "--execute"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert committed(settings, theirs, name) == committed(settings, mine, name) == 7
