"""What a bench phase measures beside its timeline: the drain (until the provider accepted and the receipts
delivered everything, with the peak memory per role), PostgreSQL's activity counters and the workers' batch sizes."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from tqdm import tqdm

from pipeline.bench.pipeline_rig import Rig
from pipeline.bench.procs import Box, BoxSample
from pipeline.config import Settings
from pipeline.domain import STAGES
from pipeline.state import db

SAMPLE_EVERY_S = 1.0


def batch_sizes(settings: Settings) -> dict[str, float]:
    """Mean records per consumed batch of each stage worker so far (from its /metrics)."""
    import urllib.request

    from pipeline.stages.worker import metrics_port, processes

    sizes: dict[str, float] = {}
    for stage, lane in processes(("critical", "bulk"), STAGES):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port(settings, stage, lane)}/metrics",
                                        timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            continue
        total = count = 0.0
        for line in text.splitlines():
            if line.startswith("notify_stage_batch_size_sum{"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith("notify_stage_batch_size_count{"):
                count += float(line.rsplit(" ", 1)[1])
        if count:
            sizes[f"{stage}/{lane}"] = total / count
    return sizes


PG_STATS = """
SELECT xact_commit + xact_rollback, tup_inserted, tup_updated, tup_deleted, tup_fetched, tup_returned, blks_hit,
       blks_read
FROM pg_stat_database WHERE datname = current_database()
"""
PG_STAT_NAMES = ("transactions", "rows inserted", "rows updated", "rows deleted", "rows fetched", "rows returned",
                 "blocks hit", "blocks read")


def pg_stats(settings: Settings) -> dict[str, int]:
    """The database's activity counters (PostgreSQL reports them with a delay of up to a second: take them after a
    pause)."""
    with db.connect(settings) as conn:
        row = conn.execute(PG_STATS).fetchone()
    return dict(zip(PG_STAT_NAMES, (int(v or 0) for v in (row or ())), strict=False))


def pg_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {name: after.get(name, 0) - before.get(name, 0) for name in PG_STAT_NAMES}


PG_TABLE_STATS = """
SELECT relname, seq_scan, seq_tup_read, COALESCE(idx_scan, 0), COALESCE(idx_tup_fetch, 0)
FROM pg_stat_user_tables
"""
PG_TABLE_NAMES = ("seq scans", "rows read by seq scans", "index scans", "rows fetched by index")


def pg_tables(settings: Settings) -> dict[str, tuple[int, ...]]:
    """Per table of the run's database: how it was read (which table a plan scans whole shows here)."""
    with db.connect(settings) as conn:
        rows = conn.execute(PG_TABLE_STATS).fetchall()
    return {str(row[0]): tuple(int(v or 0) for v in row[1:]) for row in rows}


def pg_tables_delta(before: Mapping[str, tuple[int, ...]], after: Mapping[str, tuple[int, ...]]
                    ) -> dict[str, dict[str, int]]:
    """What each table's reads were over a phase, for the tables read at all."""
    out = {}
    for table, now in sorted(after.items()):
        was = before.get(table, (0,) * len(now))
        delta = dict(zip(PG_TABLE_NAMES, (a - b for a, b in zip(now, was, strict=True)), strict=True))
        if any(delta.values()):
            out[table] = delta
    return out


DELIVERED = """
SELECT count(*) FROM deliveries d JOIN notifications n USING (notification_id)
WHERE d.state = 'delivered' AND n.user_id LIKE %s
"""


def drain(made: Rig, box: Box, count: int, accepted_before: int, users: Sequence[str], timeout_s: float,
          alive: Callable[[], bool] | None = None, database: Settings | None = None,
          ) -> tuple[bool, dict[str, int], BoxSample]:
    """Until the simulator accepted `count` more messages and their receipts made the rows of `users` (LIKE
    patterns) `delivered`; a progress bar meanwhile. Whether all got there, the peak memory per role, and the box
    sampled at the end."""
    deadline = time.monotonic() + timeout_s
    peak: dict[str, int] = {}
    next_sample = 0.0
    patterns = list(users)
    alive = alive or made.alive

    def sample() -> BoxSample:
        taken = box.sample()
        by_role: dict[str, int] = {}
        for process in taken.processes.values():
            by_role[process.role] = by_role.get(process.role, 0) + process.rss_kib
        for role, kib in by_role.items():
            peak[role] = max(peak.get(role, 0), kib)
        return taken

    with tqdm(total=count, desc="  provider accepted", unit="msg", smoothing=0.1, mininterval=1.0) as bar:
        while True:
            done = made.accepted() - accepted_before
            bar.update(done - bar.n)
            if time.monotonic() > next_sample:
                sample()
                next_sample = time.monotonic() + SAMPLE_EVERY_S
            if done >= count or time.monotonic() > deadline or not alive():
                break
            time.sleep(0.5)
    complete = made.accepted() - accepted_before >= count
    while complete and time.monotonic() < deadline and alive():
        with db.connect(database or made.settings) as conn:
            delivered = 0
            for pattern in patterns:
                row = conn.execute(DELIVERED, (pattern,)).fetchone()
                delivered += int(row[0]) if row else 0
        if delivered >= count:
            break
        time.sleep(1.0)
    return complete, peak, sample()
