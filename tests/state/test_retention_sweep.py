"""The retention sweep against the real PostgreSQL, on a database of its own (its counts are then exact):
what goes, what stays however old, batches, the dry run, the one-sweeper lock and `notify prune`."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pipeline.config import REPO_ROOT, Settings
from pipeline.ops import prune
from pipeline.state import db, migrate
from pipeline.state import retention as sweeper

NOW = datetime.datetime.now(datetime.UTC)
OLD = NOW - datetime.timedelta(days=400)
RECENT = NOW - datetime.timedelta(days=10)  # past a 1-day retention, inside the 30-day replay window


@pytest.fixture
def own_database(settings: Settings, unique: str) -> Iterator[Settings]:
    name = f"notify_test_retention_{unique}"
    with db.connect(settings, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    mine = dataclasses.replace(settings, database_url=make_conninfo(settings.dsn, dbname=name), retention_days=1,
                               shadow_retention_days=30)
    try:
        migrate.migrate(mine)
        yield mine
    finally:
        db.close_pools()
        with db.connect(settings, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def notification(conn: object, received_at: datetime.datetime, states: tuple[str, ...] = ("delivered",),
                 *, updated_at: datetime.datetime | None = None) -> str:
    """A notification received at `received_at` with one delivery per state (channels in order), an attempt
    each, and the transitions the triggers record."""
    nid = str(uuid.uuid4())
    conn.execute(  # type: ignore[attr-defined]
        "INSERT INTO notifications (notification_id, user_id, notification_type, idempotency_key, lane, "
        "source_service, created_at, received_at) VALUES (%s, %s, 'transaction', %s, 'critical', 'test', %s, %s)",
        (nid, f"u-{nid[:8]}", nid, received_at, received_at))
    for channel, state in zip(("sms", "email", "push"), states, strict=False):
        final = state in ("delivered", "failed", "dead_lettered", "suppressed", "expired")
        conn.execute(  # type: ignore[attr-defined]
            "INSERT INTO deliveries (notification_id, channel, state, provider, created_at, updated_at, final_at) "
            "VALUES (%s, %s, %s, 'twilio', %s, %s, %s)",
            (nid, channel, state, received_at, updated_at or received_at, received_at if final else None))
        conn.execute(  # type: ignore[attr-defined]
            "INSERT INTO notification_attempts (notification_id, channel, attempt_no, provider, outcome, started_at, "
            "finished_at) VALUES (%s, %s, 1, 'twilio', 'accepted', %s, %s)", (nid, channel, received_at, received_at))
    return nid


def rows(settings: Settings, nid: str) -> tuple[int, int, int, int]:
    with db.connect(settings) as conn:
        found = conn.execute(
            "SELECT (SELECT count(*) FROM notifications WHERE notification_id = %(n)s), "
            "(SELECT count(*) FROM deliveries WHERE notification_id = %(n)s), "
            "(SELECT count(*) FROM notification_attempts WHERE notification_id = %(n)s), "
            "(SELECT count(*) FROM delivery_transitions WHERE notification_id = %(n)s)", {"n": nid}).fetchone()
    assert found is not None
    return found


def run(settings: Settings, **kwargs: object) -> prune.Outcome:
    async def once() -> prune.Outcome:
        try:
            return await prune.prune_once(settings, **kwargs)  # type: ignore[arg-type]
        finally:
            await db.close_async_pools()
    return asyncio.run(once())


def test_finished_notifications_past_the_window_go_whole_and_everything_in_flight_or_awaited_stays(
        own_database: Settings) -> None:
    with db.connect(own_database) as conn, conn.transaction():
        gone = [notification(conn, OLD, ("delivered", "failed")), notification(conn, OLD, ("dead_lettered",)),
                notification(conn, OLD, ())]  # no delivery at all: suppressed before routing
        in_flight = notification(conn, OLD, ("delivered", "accepted"))  # one channel still waits for its receipt
        touched = notification(conn, OLD, ("delivered",), updated_at=NOW)  # a late receipt moved it just now
        recent = notification(conn, RECENT, ("delivered",))  # retention 1 day, but inside the replay window
        in_digest = notification(conn, OLD, ("suppressed",))
        held = notification(conn, OLD, ("suppressed",))
        conn.execute("INSERT INTO digest_items (notification_id, user_id, notification_type, frequency, window_end, "
                     "address, request) VALUES (%s, 'u', 'portfolio', 'daily', now(), 'a@example.com', '\\x00')",
                     (in_digest,))
        conn.execute("INSERT INTO held_messages (hold_id, topic, message_value, reason, notification_id, due_at) "
                     "VALUES ('h1', 'routed.bulk', '\\x00', 'quiet_hours', %s, now())", (held,))
    assert rows(own_database, gone[0]) == (1, 2, 2, 2)

    outcome = run(own_database, now=NOW)

    assert outcome.cutoffs.raised and outcome.cutoffs.notifications == NOW - datetime.timedelta(days=31)
    assert outcome.swept is not None and outcome.swept.complete
    assert outcome.swept.rows == {"notifications": 3, "deliveries": 3, "notification_attempts": 3,
                                  "delivery_transitions": 3, "shadow_results": 0, "settings_outbox": 0,
                                  "quarantine_redrives": 0}
    for nid in gone:
        assert rows(own_database, nid) == (0, 0, 0, 0)
    assert rows(own_database, in_flight) == (1, 2, 2, 2)
    for nid in (touched, recent, in_digest, held):
        assert rows(own_database, nid)[:3] == (1, 1, 1), nid
    assert "raised to the replay window" in outcome.render(dry_run=False)


def test_old_shadow_results_published_settings_and_redrive_marks_go_and_unpublished_settings_stay(
        own_database: Settings) -> None:
    with db.connect(own_database) as conn, conn.transaction():
        for created in (OLD, NOW - datetime.timedelta(days=31), NOW):
            conn.execute(
                "INSERT INTO shadow_results (created_at, notification_id, channel, lane, primary_provider, "
                "primary_outcome, primary_latency_ms, primary_length, candidate_provider, candidate_outcome, "
                "candidate_latency_ms, candidate_length) VALUES (%s, %s, 'sms', 'critical', 'twilio', 'accepted', "
                "1, 10, 'termii', 'accepted', 1, 10)", (created, uuid.uuid4()))
        for user, published in (("old", NOW - datetime.timedelta(days=2)), ("stuck", None), ("new", NOW)):
            conn.execute("INSERT INTO settings_outbox (topic, user_id, version, payload, created_at, published_at) "
                         "VALUES ('user-settings', %s, 1, '\\x00', %s, %s)", (user, OLD, published))
        for entry, at in (("invalid:0:1", NOW - datetime.timedelta(days=16)), ("invalid:0:2", NOW)):
            conn.execute("INSERT INTO quarantine_redrives (entry, source, redriven_at) VALUES (%s, 'intake', %s)",
                         (entry, at))

    dry = run(own_database, now=NOW, dry_run=True)
    assert dry.swept is not None
    assert {t: n for t, n in dry.swept.rows.items() if n} == {
        "shadow_results": 2, "settings_outbox": 1, "quarantine_redrives": 1}
    outcome = run(own_database, now=NOW)
    assert outcome.swept is not None and outcome.swept.rows == {**dict.fromkeys(dry.swept.rows, 0),
                                                                "shadow_results": 2, "settings_outbox": 1,
                                                                "quarantine_redrives": 1}
    with db.connect(own_database) as conn:
        assert conn.execute("SELECT count(*) FROM shadow_results").fetchone() == (1,)
        assert sorted(r[0] for r in conn.execute("SELECT user_id FROM settings_outbox")) == ["new", "stuck"]
        assert conn.execute("SELECT entry FROM quarantine_redrives").fetchall() == [("invalid:0:2",)]


def test_a_round_deletes_at_most_its_batches_and_the_next_goes_on(own_database: Settings) -> None:
    with db.connect(own_database) as conn, conn.transaction():
        made = [notification(conn, OLD) for _ in range(5)]
    first = run(own_database, now=NOW, batch=2, max_batches=2)
    assert first.swept is not None and not first.swept.complete
    assert first.swept.rows["notifications"] == 4
    assert "the next round goes on" in first.render(dry_run=False)
    second = run(own_database, now=NOW, batch=2, max_batches=2)
    assert second.swept is not None and second.swept.complete and second.swept.rows["notifications"] == 1
    assert all(rows(own_database, nid) == (0, 0, 0, 0) for nid in made)


def test_a_dry_run_deletes_nothing_and_only_one_process_sweeps_a_database(own_database: Settings) -> None:
    with db.connect(own_database) as conn, conn.transaction():
        nid = notification(conn, OLD)
    dry = run(own_database, now=NOW, dry_run=True)
    assert dry.swept is not None and dry.swept.rows["notifications"] == 1 and dry.swept.rows["deliveries"] == 1
    assert rows(own_database, nid) == (1, 1, 1, 1)
    with db.connect(own_database, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (sweeper.LOCK_KEY,))
        busy = run(own_database, now=NOW)
        assert busy.swept is None and "another process is sweeping" in busy.render(dry_run=False)
    assert rows(own_database, nid) == (1, 1, 1, 1)
    assert run(own_database, now=NOW).swept is not None
    assert rows(own_database, nid) == (0, 0, 0, 0)


def test_the_schedule_sweeps_once_per_interval_and_again_soon_while_rows_are_left(own_database: Settings) -> None:
    with db.connect(own_database) as conn, conn.transaction():
        notification(conn, OLD)

    async def twice() -> tuple[prune.Outcome | None, prune.Outcome | None]:
        schedule = prune.RetentionSchedule(own_database)
        try:
            return await schedule.maybe_sweep(), await schedule.maybe_sweep()
        finally:
            await db.close_async_pools()
    first, second = asyncio.run(twice())
    assert first is not None and first.swept is not None and first.swept.rows["notifications"] == 1
    assert second is None  # the interval (an hour by default) has not passed


def test_notify_prune_prints_each_table(own_database: Settings) -> None:
    with db.connect(own_database) as conn, conn.transaction():
        nid = notification(conn, OLD)
    env = {**os.environ, "DATABASE_URL": own_database.dsn, "NOTIFY_RETENTION_DAYS": "90"}
    dry = subprocess.run([sys.executable, "-m", "pipeline", "prune", "--dry-run"], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert dry.returncode == 0, dry.stderr
    assert "retention: notifications finished and received before" in dry.stdout
    assert [line.split()[:2] for line in dry.stdout.splitlines()[1:5]] == [
        ["notifications", "1"], ["deliveries", "1"], ["notification_attempts", "1"], ["delivery_transitions", "1"]]
    assert rows(own_database, nid) == (1, 1, 1, 1)
    done = subprocess.run([sys.executable, "-m", "pipeline", "prune"], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert ["notifications", "1", "deleted"] in [line.split() for line in done.stdout.splitlines()], done.stdout
    assert rows(own_database, nid) == (0, 0, 0, 0)
