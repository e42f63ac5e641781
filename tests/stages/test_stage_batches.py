"""The batch runtime on the real broker and database: a record whose data breaks the batch's statement is
quarantined alone and the rest of the batch goes on; an infrastructure error retries the batch, quarantines nothing,
and produces every output once; output of a failed attempt is never produced.

The stage under test is a toy of our own (one INSERT ... SELECT FROM unnest per batch, one forward per record), run
by the real StageRunner in the test's loop on topics of the test's own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest
from support.harness import topic_records

from pipeline.config import Settings
from pipeline.kafka import clients, topics
from pipeline.process import health
from pipeline.stages.context import StageContext
from pipeline.stages.records import HEADER_REASON, Record, is_infrastructure
from pipeline.stages.runtime import Stage, StageRunner
from pipeline.state import db

IN_SESSION_LOOP = pytest.mark.asyncio(loop_scope="session")  # the runner is a task of the fixture's loop

INPUT = topics.requests_topic("critical")
OUTPUT = topics.accepted_topic("critical")
TABLE = "stage_batch_test"
INSERT = f"INSERT INTO {TABLE} (run, body) SELECT %s, b FROM unnest(%s::text[]) AS b"


@pytest.fixture(scope="module")
def table(settings: Settings) -> Iterator[str]:
    with db.connect(settings) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (run text NOT NULL, body text NOT NULL)")
        conn.commit()
    yield TABLE
    with db.connect(settings) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.commit()


def rows(settings: Settings, run: str) -> list[str]:
    with db.connect(settings) as conn:
        return [r[0] for r in conn.execute(f"SELECT body FROM {TABLE} WHERE run = %s ORDER BY body", (run,))]


def toy_stage(ctx: StageContext, run: str, fail: Callable[[list[Record]], None] | None = None) -> Stage:
    """Inserts every record's text in one statement, then forwards every record; `fail` may raise first."""
    calls: list[int] = []

    async def handle(ctx: StageContext, records: list[Record]) -> None:
        calls.append(len(records))
        for record in records:  # staged before the statement: a failed attempt must not produce them
            ctx.send(OUTPUT, record.key, record.value)
        if fail is not None:
            fail(records)
        pool = await db.async_pool(ctx.settings)
        async with pool.connection() as conn:
            await conn.execute(INSERT, (run, [(r.value or b"").decode() for r in records]))

    stage = Stage(ctx, {INPUT: handle})
    stage.closers.append(lambda: db.close_async_pools())
    setattr(stage, "calls", calls)  # noqa: B010 (the test reads how the batch was split)
    return stage


@dataclasses.dataclass
class Running:
    runner: StageRunner
    task: asyncio.Task[None]


@pytest.fixture
async def run_stage(applied: Settings) -> AsyncIterator[Callable[[Stage], Any]]:
    started: list[Running] = []

    async def start(stage: Stage) -> StageRunner:
        runner = StageRunner(stage)
        started.append(Running(runner, asyncio.create_task(runner.run())))
        await asyncio.wait_for(runner.ready.wait(), 60)
        return runner

    yield start
    for running in started:
        running.runner.stop()
        await asyncio.wait_for(running.task, 30)


def produce(settings: Settings, values: list[bytes], partition: int = 0) -> None:
    producer = clients.producer(settings)
    for value in values:
        producer.produce(settings.topic(INPUT), value, b"user-1", partition=partition)
    assert producer.flush(10) == 0


async def wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


def context(settings: Settings) -> StageContext:
    return StageContext(settings=settings, stage="intake", lane="critical", producer=clients.producer(settings))


def committed(settings: Settings, group: str, partition: int = 0) -> int:
    consumer = clients.consumer(settings, group)
    try:
        from confluent_kafka import TopicPartition

        (tp,) = consumer.committed([TopicPartition(settings.topic(INPUT), partition)], timeout=10)
        return int(tp.offset)
    finally:
        consumer.close()


@IN_SESSION_LOOP
async def test_one_record_whose_data_breaks_the_statement_is_quarantined_alone_and_the_batch_goes_on(
        applied: Settings, table: str, run_stage: Callable[[Stage], Any]) -> None:
    run = uuid.uuid4().hex[:8]
    values = [f"good-{i:02d}".encode() for i in range(40)]
    values[17] = b"bad-\x00-nul"  # PostgreSQL text cannot hold NUL: the whole INSERT fails with a DataError
    await asyncio.to_thread(produce, applied, values)  # before the stage starts: one batch holds all forty
    ctx = context(applied)
    stage = toy_stage(ctx, run)
    await run_stage(stage)

    await wait_until(lambda: len(rows(applied, run)) == 39)
    await wait_until(lambda: committed(applied, ctx.group_id) == 40)
    assert rows(applied, run) == sorted(v.decode() for i, v in enumerate(values) if i != 17)
    quarantined = await asyncio.to_thread(topic_records, applied, topics.INVALID)
    assert [m.value() for m in quarantined] == [b"bad-\x00-nul"]
    headers = dict(quarantined[0].headers())
    assert headers[HEADER_REASON] == b"stage_error"
    assert b"DataError" in headers["notify-detail"]
    assert headers["notify-source"].decode() == f"{applied.topic(INPUT)}/0/17"
    forwarded = await asyncio.to_thread(topic_records, applied, OUTPUT)
    # every good record forwarded exactly once, in order; nothing of the failed attempts
    assert [m.value() for m in forwarded] == [v for i, v in enumerate(values) if i != 17]
    assert getattr(stage, "calls")[0] == 40, "the first attempt took the whole batch"  # noqa: B009


@IN_SESSION_LOOP
async def test_an_infrastructure_error_retries_the_batch_quarantines_nothing_and_produces_once(
        applied: Settings, table: str, run_stage: Callable[[Stage], Any]) -> None:
    run = uuid.uuid4().hex[:8]
    failures = {"left": 3}
    stalled_seen: list[bool] = []

    def fail(records: list[Record]) -> None:
        stalled_seen.append(bool(health.STALLED))
        if failures["left"]:
            failures["left"] -= 1
            raise psycopg.OperationalError("connection to server lost (simulated)")

    values = [f"row-{i:02d}".encode() for i in range(10)]
    await asyncio.to_thread(produce, applied, values)
    ctx = context(applied)
    await run_stage(toy_stage(ctx, run, fail))
    await wait_until(lambda: len(rows(applied, run)) == 10)
    await wait_until(lambda: committed(applied, ctx.group_id) == 10)
    assert failures["left"] == 0
    assert stalled_seen[1:4] == [True, True, True], "the worker reports not-ready while it retries"
    await wait_until(lambda: not health.STALLED)
    forwarded = await asyncio.to_thread(topic_records, applied, OUTPUT)
    assert [m.value() for m in forwarded] == values  # once each, though the handler ran four times
    assert await asyncio.to_thread(topic_records, applied, topics.INVALID) == []


def test_errors_are_sorted_into_infrastructure_and_data() -> None:
    import redis.exceptions
    from confluent_kafka import KafkaException

    from pipeline.errors import DecodeError
    from pipeline.stages.records import DeliveryFailed

    for infra in (psycopg.OperationalError("down"), psycopg.errors.AdminShutdown("restart"),
                  redis.exceptions.ConnectionError("refused"), KafkaException("broker"), DeliveryFailed("x"),
                  TimeoutError(), ConnectionRefusedError()):
        assert is_infrastructure(infra), infra
    for data in (psycopg.DataError("NUL"), psycopg.errors.CheckViolation("check"), ValueError("bad"),
                 KeyError("field"), DecodeError("malformed_body")):
        assert not is_infrastructure(data), data
