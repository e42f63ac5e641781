"""Holds and digest items belong to the pipeline (topic prefix) that made them: two pipelines on one database never
release each other's. Found when a rig's quiet-hours hold came due during another test module and that module's
releaser sent it to its own simulator (tests/e2e/test_replay_chaos.py saw two messages it never asked for)."""

from __future__ import annotations

import dataclasses
import datetime
import uuid

from support.harness import read_topic

from pipeline.config import Settings
from pipeline.kafka import clients, topics
from pipeline.stages import digests, holds
from pipeline.stages.context import StageContext
from pipeline.state import db


def context(settings: Settings) -> StageContext:
    return StageContext(settings=settings, stage="preferences", lane="critical", producer=clients.producer(settings))


def held(settings: Settings, hold_id: str) -> bool:
    with db.connect(settings) as conn:
        return conn.execute("SELECT 1 FROM held_messages WHERE hold_id = %s", (hold_id,)).fetchone() is not None


async def test_a_due_hold_is_released_only_by_the_pipeline_that_held_it(applied: Settings) -> None:
    other = dataclasses.replace(applied, topic_prefix=f"{applied.topic_prefix}other.")
    mine, theirs = context(applied), context(other)
    hold_id, value = f"quiet:{uuid.uuid4()}", f"held {uuid.uuid4()}".encode()
    due = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    topic = topics.accepted_topic("critical")
    pool = await db.async_pool(applied)
    async with pool.connection() as conn, conn.transaction():
        await holds.hold_all(mine, conn, [holds.Hold(hold_id, topic, "user-1", value, "quiet_hours", None, due)])
    try:
        assert await holds.release_due(theirs, [topic]) == 0  # due, but not theirs
        assert held(applied, hold_id)
        assert await holds.release_due(mine, [topic]) == 1
        assert not held(applied, hold_id)
        assert [m.value() for m in read_topic(applied, topic, 3.0) if m.value() == value] == [value]
    finally:
        with db.connect(applied) as sync, sync.transaction():
            sync.execute("DELETE FROM held_messages WHERE hold_id = %s", (hold_id,))
        await db.close_async_pools()


def test_each_pipeline_has_a_digest_releaser_lock_of_its_own() -> None:
    assert digests.lock_key("") == digests.LOCK_KEY  # the unprefixed pipeline keeps the lock it always had
    keys = {digests.lock_key(prefix) for prefix in ("", "a.", "b.", "bench1234.")}
    assert len(keys) == 4
    assert all(0 < key < 2**63 for key in keys)  # PostgreSQL's advisory locks take a signed bigint
