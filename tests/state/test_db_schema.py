"""The schema's guarantees, on the shared database (migrated as `notify stack up` does): each test uses a user
id of its own and deletes its rows afterwards. The last section covers pipeline.state.db's connection factories."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from pipeline.config import Settings
from pipeline.state import db, migrate

Conn = psycopg.Connection[TupleRow]

WORKING_STATES = ["queued", "sending", "accepted", "retry_scheduled", "unknown"]
FINAL_STATES = ["delivered", "failed", "dead_lettered", "suppressed", "expired"]

# The sender's claim-before-send: only a queued or retry_scheduled row can be taken, and taking it is one
# atomic statement, so two workers (or a replay) can never both get it.
CLAIM = """
UPDATE deliveries
   SET state = 'sending', lease_owner = %(owner)s, claimed_at = now(),
       lease_expires_at = now() + interval '30 seconds', attempt_count = attempt_count + 1
 WHERE notification_id = %(id)s AND channel = %(channel)s AND state IN ('queued', 'retry_scheduled')
RETURNING lease_owner, attempt_count
"""


@pytest.fixture(scope="module")
def migrated(settings: Settings) -> Settings:
    migrate.migrate(settings)
    return settings


@pytest.fixture
def conn(migrated: Settings) -> Iterator[Conn]:
    with db.connect(migrated, autocommit=True) as connection:
        yield connection


@pytest.fixture
def user_id(migrated: Settings, unique: str) -> Iterator[str]:
    user = f"test-user-{unique}"
    yield user
    with db.connect(migrated) as connection:  # deliveries and attempts go with their notification
        connection.execute("DELETE FROM notifications WHERE user_id = %s", (user,))
        connection.execute("DELETE FROM user_notification_settings WHERE user_id = %s", (user,))


def insert_notification(conn: Conn, user_id: str, *, key: str = "key-1", notification_type: str = "otp",
                        on_conflict_do_nothing: bool = False) -> uuid.UUID | None:
    """Insert a notification as intake does; the id, or None when the dedup key already existed."""
    statement = """
        INSERT INTO notifications (notification_id, user_id, notification_type, idempotency_key, lane,
                                   source_service, correlation_id, requested_channels, created_at, expires_at)
        VALUES (%s, %s, %s, %s, 'critical', 'auth-service', 'corr-1', ARRAY['sms'],
                now(), now() + interval '5 min')
    """ + (" ON CONFLICT DO NOTHING" if on_conflict_do_nothing else "") + " RETURNING notification_id"
    row = conn.execute(statement.encode(), (uuid.uuid4(), user_id, notification_type, key)).fetchone()
    return None if row is None else uuid.UUID(str(row[0]))


def new_notification(conn: Conn, user_id: str) -> uuid.UUID:
    notification_id = insert_notification(conn, user_id, key=uuid.uuid4().hex)
    assert notification_id is not None
    return notification_id


def insert_delivery(conn: Conn, notification_id: uuid.UUID, channel: str = "sms", state: str = "queued",
                    **columns: Any) -> None:
    """A delivery row in `state`, with what the state requires (lease, due time, provider, final_at)."""
    values: dict[str, Any] = {"notification_id": notification_id, "channel": channel, "state": state}
    if state == "sending":
        values |= {"lease_owner": "worker-0", "claimed_at": "now", "lease_expires_at": "now"}
    if state == "retry_scheduled":
        values["next_attempt_at"] = "now"
    if state in ("accepted", "delivered", "unknown"):
        values |= {"provider": "twilio", "accepted_at": "now"}
    if state in FINAL_STATES:
        values["final_at"] = "now"
    values |= columns
    names = ", ".join(values)
    placeholders = ", ".join(["%s"] * len(values))
    conn.execute(f"INSERT INTO deliveries ({names}) VALUES ({placeholders})".encode(), list(values.values()))


def claim(conn: Conn, notification_id: uuid.UUID, owner: str, channel: str = "sms") -> tuple[Any, ...] | None:
    return conn.execute(CLAIM, {"owner": owner, "id": notification_id, "channel": channel}).fetchone()


# notifications: the dedup key -------------------------------------------------------------------------------

def test_a_second_notification_with_the_same_user_type_and_key_is_rejected(conn: Conn, user_id: str) -> None:
    insert_notification(conn, user_id, key="pay-42")

    with pytest.raises(errors.UniqueViolation, match="notifications_dedup_key"):
        insert_notification(conn, user_id, key="pay-42")


def test_insert_on_conflict_do_nothing_inserts_zero_rows_the_second_time(conn: Conn, user_id: str) -> None:
    first = insert_notification(conn, user_id, key="pay-43", on_conflict_do_nothing=True)
    second = insert_notification(conn, user_id, key="pay-43", on_conflict_do_nothing=True)

    assert first is not None
    assert second is None
    rows = conn.execute("SELECT notification_id FROM notifications WHERE user_id = %s", (user_id,)).fetchall()
    assert rows == [(first,)]


def test_the_same_key_for_another_type_or_another_user_is_a_different_notification(
        conn: Conn, user_id: str) -> None:
    other_user = f"{user_id}-other"
    try:
        assert insert_notification(conn, user_id, key="k", notification_type="otp") is not None
        assert insert_notification(conn, user_id, key="k", notification_type="transaction") is not None
        assert insert_notification(conn, other_user, key="k", notification_type="otp") is not None
    finally:
        conn.execute("DELETE FROM notifications WHERE user_id = %s", (other_user,))


@pytest.mark.parametrize("column, value", [
    ("notification_type", "newsletter"),
    ("lane", "urgent"),
    ("requested_channels", ["sms", "fax"]),
])
def test_notifications_reject_values_outside_the_contract(conn: Conn, user_id: str, column: str,
                                                          value: object) -> None:
    notification_id = new_notification(conn, user_id)

    with pytest.raises(errors.CheckViolation):
        conn.execute(f"UPDATE notifications SET {column} = %s WHERE notification_id = %s".encode(),
                     (value, notification_id))


# deliveries: states, one row per channel, the claim ---------------------------------------------------------

@pytest.mark.parametrize("state", WORKING_STATES + FINAL_STATES)
def test_every_delivery_state_of_the_state_machine_is_accepted(conn: Conn, user_id: str, state: str) -> None:
    notification_id = new_notification(conn, user_id)
    insert_delivery(conn, notification_id, state=state)

    assert conn.execute("SELECT state FROM deliveries WHERE notification_id = %s",
                        (notification_id,)).fetchone() == (state,)


def test_the_state_check_rejects_an_unknown_state(conn: Conn, user_id: str) -> None:
    notification_id = new_notification(conn, user_id)

    with pytest.raises(errors.CheckViolation):
        insert_delivery(conn, notification_id, state="pending")
    insert_delivery(conn, notification_id, state="queued")
    with pytest.raises(errors.CheckViolation):
        conn.execute("UPDATE deliveries SET state = 'sent' WHERE notification_id = %s", (notification_id,))


def test_a_notification_has_one_delivery_row_per_channel(conn: Conn, user_id: str) -> None:
    notification_id = new_notification(conn, user_id)
    insert_delivery(conn, notification_id, "sms")
    insert_delivery(conn, notification_id, "email")

    with pytest.raises(errors.UniqueViolation, match="deliveries_pkey"):
        insert_delivery(conn, notification_id, "sms")


def test_a_delivery_of_an_unknown_notification_is_rejected(conn: Conn, user_id: str) -> None:
    with pytest.raises(errors.ForeignKeyViolation):
        insert_delivery(conn, uuid.uuid4())


def test_a_claim_succeeds_once_and_a_second_claim_gets_no_row(conn: Conn, user_id: str) -> None:
    notification_id = new_notification(conn, user_id)
    insert_delivery(conn, notification_id)

    assert claim(conn, notification_id, "worker-a") == ("worker-a", 1)
    assert claim(conn, notification_id, "worker-b") is None
    row = conn.execute("SELECT state, lease_owner, lease_expires_at > claimed_at FROM deliveries "
                       "WHERE notification_id = %s", (notification_id,)).fetchone()
    assert row == ("sending", "worker-a", True)


def test_a_claim_racing_an_uncommitted_claim_waits_and_then_gets_no_row(
        migrated: Settings, conn: Conn, user_id: str) -> None:
    notification_id = new_notification(conn, user_id)
    insert_delivery(conn, notification_id)
    second_result: list[tuple[Any, ...] | None] = []

    with db.connect(migrated) as first, db.connect(migrated) as second:
        assert claim(first, notification_id, "worker-a") is not None  # row locked, not committed yet
        racer = threading.Thread(
            target=lambda: second_result.append(claim(second, notification_id, "worker-b")))
        racer.start()
        wait_until_blocked_on_a_lock(conn, second.info.backend_pid)
        first.commit()
        racer.join(timeout=10)
        second.commit()

    assert second_result == [None]
    assert conn.execute("SELECT lease_owner, attempt_count FROM deliveries WHERE notification_id = %s",
                        (notification_id,)).fetchone() == ("worker-a", 1)


def wait_until_blocked_on_a_lock(observer: Conn, backend_pid: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = observer.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                               (backend_pid,)).fetchone()
        if row == ("Lock",):
            return
        time.sleep(0.02)
    pytest.fail(f"backend {backend_pid} never waited on a lock")


@pytest.mark.parametrize("state", [s for s in WORKING_STATES + FINAL_STATES
                                   if s not in ("queued", "retry_scheduled")])
def test_a_row_that_is_claimed_in_flight_or_final_cannot_be_claimed(conn: Conn, user_id: str,
                                                                    state: str) -> None:
    notification_id = new_notification(conn, user_id)
    insert_delivery(conn, notification_id, state=state)

    assert claim(conn, notification_id, "worker-b") is None


def test_a_retry_scheduled_row_is_claimed_as_the_next_attempt(conn: Conn, user_id: str) -> None:
    notification_id = new_notification(conn, user_id)
    insert_delivery(conn, notification_id, state="retry_scheduled", attempt_count=1)

    assert claim(conn, notification_id, "worker-a") == ("worker-a", 2)


@pytest.mark.parametrize("state, missing", [
    ("sending", {"lease_owner": None}),
    ("sending", {"lease_expires_at": None}),
    ("retry_scheduled", {"next_attempt_at": None}),
    ("accepted", {"provider": None}),
    ("delivered", {"final_at": None}),
    ("suppressed", {"final_at": None}),
])
def test_a_state_without_what_it_requires_is_rejected(conn: Conn, user_id: str, state: str,
                                                      missing: dict[str, Any]) -> None:
    notification_id = new_notification(conn, user_id)

    with pytest.raises(errors.CheckViolation):
        insert_delivery(conn, notification_id, state=state, **missing)


def test_a_provider_message_id_identifies_one_delivery(conn: Conn, user_id: str) -> None:
    first, second = new_notification(conn, user_id), new_notification(conn, user_id)
    insert_delivery(conn, first, state="accepted", provider_message_id=f"SM-{user_id}")

    with pytest.raises(errors.UniqueViolation, match="deliveries_provider_message_uq"):
        insert_delivery(conn, second, state="accepted", provider_message_id=f"SM-{user_id}")
    insert_delivery(conn, second, state="accepted", provider="termii", provider_message_id=f"SM-{user_id}")


def test_updated_at_is_stamped_by_the_database_on_every_update(conn: Conn, user_id: str) -> None:
    notification_id = new_notification(conn, user_id)
    insert_delivery(conn, notification_id)

    conn.execute("UPDATE deliveries SET attempt_count = 1, updated_at = '2000-01-01' "
                 "WHERE notification_id = %s", (notification_id,))
    row = conn.execute("SELECT updated_at > created_at FROM deliveries WHERE notification_id = %s",
                       (notification_id,)).fetchone()
    assert row == (True,)


# The reconciliation and receipt queries each find an index made for them (sequential scans off, so the plan
# shows whether an index can serve the query at all, whatever the table's current size).
@pytest.mark.parametrize("query, index", [
    ("SELECT * FROM deliveries WHERE state = 'sending' AND lease_expires_at < now()",
     "deliveries_sending_lease_idx"),
    ("SELECT * FROM deliveries WHERE state = 'accepted' AND accepted_at < now() - interval '15 minutes'",
     "deliveries_accepted_idx"),
    ("SELECT * FROM deliveries WHERE state = 'unknown' ORDER BY updated_at LIMIT 100",
     "deliveries_unknown_idx"),
    ("SELECT * FROM deliveries WHERE state = 'retry_scheduled' AND next_attempt_at <= now()",
     "deliveries_retry_due_idx"),
    ("SELECT * FROM deliveries WHERE provider = 'twilio' AND provider_message_id = 'SM1'",
     "deliveries_provider_message_uq"),
    ("SELECT * FROM notifications WHERE user_id = 'u' ORDER BY created_at DESC LIMIT 20",
     "notifications_user_created_idx"),
    ("SELECT * FROM notification_attempts WHERE notification_id = gen_random_uuid() AND channel = 'sms'",
     "notification_attempts_delivery_idx"),
])
def test_the_queries_of_stages_and_reconciliation_are_served_by_an_index(conn: Conn, query: str,
                                                                         index: str) -> None:
    conn.execute("SET enable_seqscan = off")
    plan = conn.execute(f"EXPLAIN {query}".encode()).fetchall()

    assert index in "\n".join(row[0] for row in plan)


# notification_attempts --------------------------------------------------------------------------------------

def test_every_attempt_is_logged_with_the_providers_error_body(conn: Conn, user_id: str) -> None:
    notification_id = new_notification(conn, user_id)
    insert_delivery(conn, notification_id, state="retry_scheduled", attempt_count=1)
    payload = {"code": 20429, "message": "Too Many Requests", "more_info": "https://example.invalid/20429"}
    conn.execute("""
        INSERT INTO notification_attempts (notification_id, channel, attempt_no, provider, outcome,
                                           response_status, error_code, error_payload, started_at,
                                           finished_at, latency_ms)
        VALUES (%s, 'sms', 1, 'twilio', 'transient', 429, '20429', %s, now() - interval '80 ms', now(), 80),
               (%s, 'sms', 1, 'termii', 'accepted', 200, NULL, NULL, now(), now(), 12)
    """, (notification_id, Jsonb(payload), notification_id))

    rows = conn.execute("SELECT provider, outcome, error_payload FROM notification_attempts "
                        "WHERE notification_id = %s ORDER BY attempt_id", (notification_id,)).fetchall()
    assert rows == [("twilio", "transient", payload), ("termii", "accepted", None)]


def test_an_attempt_outcome_outside_the_four_classes_is_rejected(conn: Conn, user_id: str) -> None:
    notification_id = new_notification(conn, user_id)
    insert_delivery(conn, notification_id)

    with pytest.raises(errors.CheckViolation):
        conn.execute("""
            INSERT INTO notification_attempts (notification_id, channel, attempt_no, provider, outcome,
                                               started_at, finished_at)
            VALUES (%s, 'sms', 1, 'twilio', 'timeout', now(), now())
        """, (notification_id,))


def test_a_push_attempt_names_its_device_by_platform_and_fingerprint_never_by_the_raw_token(
        conn: Conn, user_id: str) -> None:
    notification_id = new_notification(conn, user_id)
    insert_delivery(conn, notification_id, channel="push", state="retry_scheduled", attempt_count=1)
    attempt = """
        INSERT INTO notification_attempts (notification_id, channel, attempt_no, provider, outcome, error_code,
                                           started_at, finished_at, device_platform, device_fingerprint)
        VALUES (%s, 'push', 1, 'apns', %s, %s, now(), now(), %s, %s)
    """
    conn.execute(attempt, (notification_id, "transient", "ServiceUnavailable", "ios", "0123456789abcdef"))
    conn.execute(attempt, (notification_id, "accepted", None, "android", "fedcba9876543210"))
    rows = conn.execute("SELECT device_platform, device_fingerprint, outcome FROM notification_attempts "
                        "WHERE notification_id = %s ORDER BY attempt_id", (notification_id,)).fetchall()
    assert rows == [("ios", "0123456789abcdef", "transient"), ("android", "fedcba9876543210", "accepted")]
    for platform, fingerprint in (("ios", "ab" * 32), ("ios", None), (None, "0123456789abcdef"),
                                  ("blackberry", "0123456789abcdef")):
        with pytest.raises(errors.CheckViolation):
            conn.execute(attempt, (notification_id, "accepted", None, platform, fingerprint))


def test_an_attempt_of_a_delivery_that_does_not_exist_is_rejected(conn: Conn, user_id: str) -> None:
    notification_id = new_notification(conn, user_id)  # a notification, but no sms delivery row

    with pytest.raises(errors.ForeignKeyViolation):
        conn.execute("""
            INSERT INTO notification_attempts (notification_id, channel, attempt_no, provider, outcome,
                                               started_at, finished_at)
            VALUES (%s, 'sms', 1, 'twilio', 'accepted', now(), now())
        """, (notification_id,))


# user_notification_settings ---------------------------------------------------------------------------------

def test_user_settings_default_to_utc_no_quiet_hours_no_digest(conn: Conn, user_id: str) -> None:
    conn.execute("INSERT INTO user_notification_settings (user_id) VALUES (%s)", (user_id,))

    row = conn.execute("""
        SELECT timezone, channel_preference, category_settings, quiet_hours_start, digest, device_tokens,
               version
          FROM user_notification_settings WHERE user_id = %s""", (user_id,)).fetchone()
    assert row == ("UTC", [], {}, None, "none", [], 1)


@pytest.mark.parametrize("column, value", [
    ("quiet_hours_start", "22:00"),  # without an end
    ("digest", "monthly"),
    ("channel_preference", ["push", "pager"]),
    ("phone_e164", "0801 234 5678"),
    ("category_settings", Jsonb(["marketing"])),
])
def test_user_settings_reject_values_outside_the_contract(conn: Conn, user_id: str, column: str,
                                                          value: object) -> None:
    with pytest.raises(errors.CheckViolation):
        conn.execute(f"INSERT INTO user_notification_settings (user_id, {column}) VALUES (%s, %s)".encode(),
                     (user_id, value))


def test_quiet_hours_may_span_midnight(conn: Conn, user_id: str) -> None:
    conn.execute("INSERT INTO user_notification_settings (user_id, timezone, quiet_hours_start, "
                 "quiet_hours_end) VALUES (%s, 'Africa/Lagos', '22:00', '07:00')", (user_id,))


# pipeline.state.db: the connection factories ----------------------------------------------------------------------

def test_ready_is_true_for_the_running_database(migrated: Settings) -> None:
    assert db.ready(migrated, 5) is True


def test_ready_is_false_within_about_the_timeout_when_nothing_listens(migrated: Settings) -> None:
    nowhere = dataclasses.replace(migrated, database_url="postgresql://notify:notify@127.0.0.1:1/notify")
    started = time.monotonic()

    assert db.ready(nowhere, 1) is False
    assert time.monotonic() - started < 3


def test_a_connection_has_timeouts_and_explicit_transactions(migrated: Settings) -> None:
    with db.connect(migrated) as connection:
        assert connection.autocommit is False
        assert connection.execute("SHOW statement_timeout").fetchone() == ("30s",)
        assert connection.execute("SHOW idle_in_transaction_session_timeout").fetchone() == ("1min",)


def test_the_pool_is_one_per_dsn_sized_by_the_settings(migrated: Settings) -> None:
    pool = db.pool(migrated)

    assert db.pool(migrated) is pool
    assert pool.max_size == migrated.db_pool_size
    with pool.connection() as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)


async def test_the_async_pool_is_one_per_dsn_and_loop_and_serves_queries(migrated: Settings) -> None:
    pool = await db.async_pool(migrated)
    try:
        assert await db.async_pool(migrated) is pool
        assert pool.max_size == migrated.db_pool_size

        async def one() -> object:
            async with pool.connection() as connection:
                cursor = await connection.execute("SELECT 1")
                return await cursor.fetchone()

        assert list(await asyncio.gather(one(), one(), one())) == [(1,), (1,), (1,)]
    finally:
        await db.close_async_pools()
    assert pool.closed
