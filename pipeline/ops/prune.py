"""Retention in operation: `notify prune [--dry-run]`, and the sweep the reconciler's worker runs every
NOTIFY_PRUNE_INTERVAL_S.

The cut-offs come from `policy.retention` with the replay window read from topics/topics.toml (the topics as
declared, which `notify topics apply` makes the cluster's), so raising a topic's retention keeps notifications
longer with no second setting to remember. One sweeper per database: a PostgreSQL advisory lock, as for the
reconciler; a process that does not win it does nothing this time.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from dataclasses import dataclass

import psycopg

from pipeline.config import Settings
from pipeline.kafka import topics
from pipeline.policy import retention
from pipeline.state import db
from pipeline.state import retention as sweeper

log = logging.getLogger("notify.retention")


def plan(settings: Settings, now: datetime.datetime | None = None) -> retention.Cutoffs:
    catalogue = topics.catalogue()
    return retention.cutoffs(
        now or datetime.datetime.now(datetime.UTC), retention_days=settings.retention_days,
        shadow_retention_days=settings.shadow_retention_days,
        replay=retention.replay_window(spec.configs for spec in catalogue.values()),
        quarantine_retention=retention.time_retention(catalogue[topics.INVALID].configs))


@dataclass
class Outcome:
    cutoffs: retention.Cutoffs
    swept: sweeper.Swept | None  # None: another process holds the sweeper's lock

    def render(self, *, dry_run: bool) -> str:
        lines = [f"retention: {self.cutoffs.describe()}"]
        if self.swept is None:
            lines.append("another process is sweeping this database now: nothing done")
            return "\n".join(lines)
        verb = "due" if dry_run else "deleted"
        lines += [f"  {table:22} {count:>10,} {verb}" for table, count in self.swept.rows.items()]
        if not self.swept.complete:
            lines.append("  more is due than one round deletes: the next round goes on")
        lines.append(f"  in {self.swept.seconds:.2f} s")
        return "\n".join(lines)


async def prune_once(settings: Settings, *, dry_run: bool = False, now: datetime.datetime | None = None,
                     batch: int = sweeper.BATCH, max_batches: int = sweeper.MAX_BATCHES) -> Outcome:
    cutoffs = plan(settings, now)
    pool = await db.async_pool(settings)
    async with pool.connection() as conn:
        await conn.set_autocommit(True)
        try:
            if dry_run:
                return Outcome(cutoffs, await sweeper.due(conn, cutoffs))
            won = await (await conn.execute("SELECT pg_try_advisory_lock(%s)", (sweeper.LOCK_KEY,))).fetchone()
            if not won or not won[0]:
                return Outcome(cutoffs, None)
            try:
                return Outcome(cutoffs, await sweeper.sweep(conn, cutoffs, batch=batch, max_batches=max_batches))
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (sweeper.LOCK_KEY,))
        finally:
            with contextlib.suppress(psycopg.Error):  # a broken connection: the pool discards it anyway
                await conn.set_autocommit(False)


class RetentionSchedule:
    """Runs a sweep when one is due (the first soon after start); called from the reconciler's loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.next_at = 0.0

    async def maybe_sweep(self) -> Outcome | None:
        """A sweep if one is due. One that raised (the database is away) or left rows due is due again at the next
        call; a finished one, after the interval."""
        if time.monotonic() < self.next_at:
            return None
        outcome = await prune_once(self.settings)
        unfinished = outcome.swept is not None and not outcome.swept.complete
        self.next_at = 0.0 if unfinished else time.monotonic() + self.settings.prune_interval_s
        if outcome.swept is not None and any(outcome.swept.rows.values()):
            log.info("%s", outcome.render(dry_run=False).replace("\n", ";"))
        return outcome
