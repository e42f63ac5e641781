"""The stage runtime's tables against the real broker: restore to the end, follow writes, forget tombstones."""

from __future__ import annotations

import time

from pipeline.config import Settings
from pipeline.kafka import clients, topics
from pipeline.stages.context import StageContext
from pipeline.stages.tables import Table


def context(settings: Settings) -> StageContext:
    return StageContext(settings=settings, stage="intake", lane="critical", producer=clients.producer(settings))


async def test_a_table_restores_its_partitions_follows_new_writes_and_drops_what_it_releases(
        applied: Settings) -> None:
    writer_ctx = context(applied)
    writer = Table(writer_ctx, topics.dedup_topic("critical"))
    for partition in (0, 1):
        for i in range(20):
            writer.put(f"key-{partition}-{i}", f"v{i}".encode(), partition)
    writer.put("key-0-3", None, 0)  # a tombstone: forgotten on restore
    writer.put("key-1-4", b"newer", 1)
    await writer_ctx.settle()

    reader = Table(context(applied), topics.dedup_topic("critical"))
    reader.restore([0, 1])
    assert len(reader.items(0)) == 19 and len(reader.items(1)) == 20
    assert reader.get("key-0-3", 0) is None
    assert reader.get("key-1-4", 1) == b"newer"
    assert reader.get("key-1-4", 0) is None  # partitions are apart

    writer.put("late", b"1", 1)
    await writer_ctx.settle()
    deadline = time.monotonic() + 15
    while reader.get("late", 1) is None and time.monotonic() < deadline:
        reader.catch_up()
        time.sleep(0.05)
    assert reader.get("late", 1) == b"1"

    reader.release([1])
    assert reader.owned == [0] and reader.items(1) == []
    reader.close()
    writer.close()


async def test_a_merge_rule_decides_what_a_late_write_does(applied: Settings) -> None:
    ctx = context(applied)
    newest = Table(ctx, topics.USER_SETTINGS, apply=lambda current, new: max(current or b"", new or b"") or None)
    newest.put("u", b"2", 3)
    newest.put("u", b"1", 3)  # stale: the merge keeps b"2" on restore
    await ctx.settle()
    reader = Table(context(applied), topics.USER_SETTINGS,
                   apply=lambda current, new: max(current or b"", new or b"") or None)
    reader.restore([3])
    assert reader.get("u", 3) == b"2"
    reader.close()
    newest.close()
