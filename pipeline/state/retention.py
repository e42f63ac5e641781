"""The retention sweep: delete what `policy.retention` says is old enough, in bounded batches.

Each batch is one statement in its own transaction, so no lock is held for long and a sweep interrupted halfway
has deleted whole notifications only (a notification goes with its deliveries, attempts and transitions in the
same statement). A round stops after `max_batches` per table; the next round goes on. One sweeper at a time per
database, elected by an advisory lock like the reconciler.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from pipeline import metrics
from pipeline.domain import FINAL_DELIVERY_STATES
from pipeline.policy.retention import Cutoffs

LOCK_KEY = 0x6E6F74696679FF  # pg advisory lock id of the retention sweep
BATCH = 5000  # rows per statement
MAX_BATCHES = 100  # per table and round: a round stays bounded however much is due

# A notification goes when it was received before the cut-off, none of its deliveries is in flight or changed
# since the cut-off, and nothing waits on it (a digest item, a held message). Its rows in every table go in the
# same statement; the foreign keys' cascades then find nothing left.
_FINISHED = """
SELECT n.notification_id FROM notifications n
WHERE n.received_at < %(before)s
  AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.notification_id = n.notification_id
                  AND (d.state <> ALL(%(final)s::text[]) OR d.updated_at >= %(before)s))
  AND NOT EXISTS (SELECT 1 FROM digest_items i WHERE i.notification_id = n.notification_id)
  AND NOT EXISTS (SELECT 1 FROM held_messages h WHERE h.notification_id = n.notification_id)
"""
NOTIFICATIONS = f"""
WITH doomed AS ({_FINISHED} LIMIT %(batch)s FOR UPDATE OF n SKIP LOCKED),
attempts AS (DELETE FROM notification_attempts a USING doomed WHERE a.notification_id = doomed.notification_id
             RETURNING 1),
transitions AS (DELETE FROM delivery_transitions t USING doomed WHERE t.notification_id = doomed.notification_id
                RETURNING 1),
delivery_rows AS (DELETE FROM deliveries d USING doomed WHERE d.notification_id = doomed.notification_id
                  RETURNING 1),
gone AS (DELETE FROM notifications n USING doomed WHERE n.notification_id = doomed.notification_id RETURNING 1)
SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM delivery_rows), (SELECT count(*) FROM attempts),
       (SELECT count(*) FROM transitions)
"""
NOTIFICATION_TABLES = ("notifications", "deliveries", "notification_attempts", "delivery_transitions")
# The other tables: one id-ordered batch of old rows each (table, statement, what a dry run counts).
OTHERS: Mapping[str, tuple[str, str]] = {
    "shadow_results": (
        "DELETE FROM shadow_results WHERE shadow_id IN (SELECT shadow_id FROM shadow_results "
        "WHERE created_at < %(before)s ORDER BY created_at LIMIT %(batch)s)",
        "SELECT count(*) FROM shadow_results WHERE created_at < %(before)s"),
    "settings_outbox": (
        "DELETE FROM settings_outbox WHERE id IN (SELECT id FROM settings_outbox "
        "WHERE published_at < %(before)s ORDER BY id LIMIT %(batch)s)",
        "SELECT count(*) FROM settings_outbox WHERE published_at < %(before)s"),
    "quarantine_redrives": (
        "DELETE FROM quarantine_redrives WHERE entry IN (SELECT entry FROM quarantine_redrives "
        "WHERE redriven_at < %(before)s LIMIT %(batch)s)",
        "SELECT count(*) FROM quarantine_redrives WHERE redriven_at < %(before)s"),
}

PRUNED = metrics.counter("notify_retention_pruned_rows_total", "Rows the retention sweep deleted, by table.",
                         ["table"])
LAST_SWEEP = metrics.gauge("notify_retention_last_sweep_timestamp_seconds",
                           "When the retention sweep last finished a round (0: never in this process).")


@dataclass
class Swept:
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows deleted (or, in a dry run, due)
    complete: bool = True  # False: a table had more than max_batches batches due; the next round goes on
    seconds: float = 0.0

    def add(self, table: str, count: int) -> None:
        self.rows[table] = self.rows.get(table, 0) + count


def _before(cutoffs: Cutoffs, table: str) -> Any:
    return cutoffs.notifications if table in NOTIFICATION_TABLES else getattr(cutoffs, table)


async def sweep(conn: AsyncConnection[TupleRow], cutoffs: Cutoffs, *, batch: int = BATCH,
                max_batches: int = MAX_BATCHES) -> Swept:
    """Delete every due row, at most `max_batches` batches of `batch` per table. `conn` is in autocommit mode;
    each batch commits on its own."""
    begun = time.monotonic()
    swept = Swept(rows=dict.fromkeys((*NOTIFICATION_TABLES, *OTHERS), 0))
    final = sorted(FINAL_DELIVERY_STATES)
    for _ in range(max_batches):
        async with conn.transaction():
            row = await (await conn.execute(NOTIFICATIONS, {"before": cutoffs.notifications, "final": final,
                                                            "batch": batch})).fetchone()
        counts = dict(zip(NOTIFICATION_TABLES, row or (0, 0, 0, 0), strict=True))
        for table, count in counts.items():
            swept.add(table, count)
            PRUNED.labels(table).inc(count)
        if counts["notifications"] < batch:
            break
    else:
        swept.complete = False
    for table, (delete, _count) in OTHERS.items():
        for _ in range(max_batches):
            async with conn.transaction():
                deleted = (await conn.execute(delete, {"before": _before(cutoffs, table), "batch": batch})).rowcount
            swept.add(table, deleted)
            PRUNED.labels(table).inc(deleted)
            if deleted < batch:
                break
        else:
            swept.complete = False
    swept.seconds = time.monotonic() - begun
    LAST_SWEEP.set(time.time())
    return swept


async def due(conn: AsyncConnection[TupleRow], cutoffs: Cutoffs) -> Swept:
    """What a sweep would delete now, counted without deleting (`notify prune --dry-run`)."""
    begun = time.monotonic()
    final = sorted(FINAL_DELIVERY_STATES)
    counted = f"""
    WITH doomed AS ({_FINISHED})
    SELECT (SELECT count(*) FROM doomed),
           (SELECT count(*) FROM deliveries d JOIN doomed USING (notification_id)),
           (SELECT count(*) FROM notification_attempts a JOIN doomed USING (notification_id)),
           (SELECT count(*) FROM delivery_transitions t JOIN doomed USING (notification_id))
    """
    row = await (await conn.execute(counted, {"before": cutoffs.notifications, "final": final})).fetchone()
    swept = Swept(rows=dict(zip(NOTIFICATION_TABLES, row or (0, 0, 0, 0), strict=True)))
    for table, (_delete, count) in OTHERS.items():
        found = await (await conn.execute(count, {"before": _before(cutoffs, table)})).fetchone()
        swept.rows[table] = int(found[0]) if found else 0
    swept.seconds = time.monotonic() - begun
    return swept
