"""The retry-tier releaser on the real broker: never early, about on time, one waiting partition holds nothing else.

The releaser runs in the test's loop on topics of the test's own; records are written straight into the tiers
with due-time headers, as the sender writes them. A released record's broker timestamp (CreateTime, stamped by
the releaser's producer) is when it was released.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from support.harness import TopicReader

from pipeline.config import Settings
from pipeline.kafka import clients, topics
from pipeline.stages import retry
from pipeline.stages.context import StageContext
from pipeline.stages.records import HEADER_REASON
from pipeline.stages.runtime import StageRunner

# The releaser runs as a task of the fixture's loop: tests must run in that same (session) loop.
pytestmark = pytest.mark.asyncio(loop_scope="session")

TIER1, TIER2 = topics.retry_topics("critical")[:2]
SEND = topics.send_topic("sms", "critical")


@pytest.fixture
async def releaser(applied: Settings) -> AsyncIterator[StageRunner]:
    settings = dataclasses.replace(applied, retry_delays_critical=(0.2, 0.4, 0.6))
    made = StageRunner(retry.build(StageContext(settings=settings, stage="retry", lane="critical",
                                                producer=clients.producer(settings))))
    running = asyncio.create_task(made.run())
    await asyncio.wait_for(made.ready.wait(), 60)
    yield made
    made.stop()
    await asyncio.wait_for(running, 30)


async def put(settings: Settings, topic: str, partition: int, due_in_s: float, send_topic: str = SEND,
              key: str | None = None) -> tuple[str, int]:
    """One retry record due `due_in_s` from now: its notification id and due time (epoch ms). Written from a
    thread: the releaser runs on this loop and must not be held up by the test."""
    return await asyncio.to_thread(_put, settings, topic, partition, due_in_s, send_topic, key)


def _put(settings: Settings, topic: str, partition: int, due_in_s: float, send_topic: str,
         key: str | None) -> tuple[str, int]:
    nid = str(uuid.uuid4())
    base = retry.delivery_headers(nid, "sms", "critical", send_topic, [{"attempt": 1, "provider": "twilio",
                                                                        "outcome": "transient", "code": "500"}])
    due_ms = int((time.time() + due_in_s) * 1000)
    headers = {**base, retry.HEADER_DUE: str(due_ms).encode(), retry.HEADER_TIER: b"1"}
    producer = clients.producer(settings)
    producer.produce(settings.topic(topic), key=(key or f"u-{nid[:8]}").encode(), value=nid.encode(),
                     headers=list(headers.items()), partition=partition)
    assert producer.flush(10) == 0
    return nid, due_ms


def released(reader: TopicReader) -> dict[str, Any]:
    """notification id -> the released message."""
    return {dict(m.headers())[retry.HEADER_NOTIFICATION].decode(): m for m in reader.snapshot()}


async def wait_for(condition: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


def committed(settings: Settings, group: str, topic: str, partition: int) -> int:
    consumer = clients.consumer(settings, group)
    try:
        (tp,) = consumer.committed([TopicPartition(settings.topic(topic), partition)], timeout=10)
        return int(tp.offset)
    finally:
        consumer.close()


async def test_a_retry_is_never_released_before_its_due_time_and_at_most_a_second_after(
        applied: Settings, releaser: StageRunner) -> None:
    reader = TopicReader(applied, SEND)
    try:
        due_ms = dict([await put(applied, TIER1, n % 3, 1.0 + n * 0.25) for n in range(12)])
        await wait_for(lambda: len(released(reader)) == 12, 30)
        out = released(reader)
    finally:
        reader.close()
    for nid, message in out.items():
        headers = dict(message.headers())
        assert retry.HEADER_DUE not in headers  # the send topic gets the history, not the due time
        assert retry.decode_history({retry.HEADER_ATTEMPTS: headers[retry.HEADER_ATTEMPTS]})[0]["code"] == "500"
        released_ms = message.timestamp()[1]  # CreateTime: stamped by the releaser's producer as it released
        assert released_ms >= due_ms[nid], f"released {due_ms[nid] - released_ms} ms early"
        assert released_ms - due_ms[nid] <= 1000, f"released {released_ms - due_ms[nid]} ms late"


async def test_a_partition_waiting_for_its_head_holds_no_other_partition_or_tier(
        applied: Settings, releaser: StageRunner) -> None:
    reader = TopicReader(applied, SEND)
    try:
        # one user's two retries (one key: one send partition, where their order shows)
        head, _ = await put(applied, TIER1, 0, 8.0, key="u-same")
        behind, _ = await put(applied, TIER1, 0, 0.0, key="u-same")  # due now, but behind a head that is not
        others = ([(await put(applied, TIER1, 1, 0.0))[0] for _ in range(5)]
                  + [(await put(applied, TIER2, 0, 0.0))[0] for _ in range(3)])
        started = time.monotonic()
        await wait_for(lambda: set(others) <= set(released(reader)), 5)
        assert time.monotonic() - started < 3
        assert head not in released(reader) and behind not in released(reader)
        group = releaser.ctx.group_id
        await wait_for(lambda: committed(applied, group, TIER1, 1) == 5, 5)
        assert await asyncio.to_thread(committed, applied, group, TIER1, 0) < 0  # nothing forwarded: no commit
        assert await asyncio.to_thread(committed, applied, group, TIER2, 0) == 3

        await wait_for(lambda: {head, behind} <= set(released(reader)), 12)
        out = released(reader)
        assert out[head].partition() == out[behind].partition()
        assert out[head].offset() < out[behind].offset()  # the head first, as the tier holds them
        await wait_for(lambda: committed(applied, group, TIER1, 0) == 2, 5)
    finally:
        reader.close()


async def test_a_retry_record_that_names_no_send_topic_goes_to_the_dlq_with_why(
        applied: Settings, releaser: StageRunner) -> None:
    reader = TopicReader(applied, topics.DLQ)
    try:
        nid, _ = await put(applied, TIER1, 2, 0.0, send_topic="no-such-topic")
        await wait_for(lambda: len(reader.snapshot()) == 1, 10)
        (message,) = reader.snapshot()
    finally:
        reader.close()
    headers = dict(message.headers())
    assert headers[HEADER_REASON] == b"unreleasable"
    assert headers[retry.HEADER_NOTIFICATION] == nid.encode()
    assert headers["notify-source"].decode().startswith(applied.topic(TIER1) + "/2/")
