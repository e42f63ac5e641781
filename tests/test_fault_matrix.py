"""Infrastructure faults mid-burst on the real stack, every stage running, receipts through the API's webhooks.

The workers and the API reach PostgreSQL and Redis through loopback forwarders that this test cuts: to them it is
the database or Redis going away (every connection reset, every new one refused), while the stack the rest of the
suite shares keeps running. After each fault: the simulator's ledger holds each notification once, every row is
final, the delivery-events topic ends each one once, and nothing went to quarantine (an infrastructure error
pauses and retries; only bad data is quarantined). Bounded: a few hundred notifications, every wait timed.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
from harness import TcpForwarder, read_topic
from loop_rig import LoopRig, produce_requests, start_loop
from loop_rig import mixed_requests as requests

from pipeline import serde, topics
from pipeline.bench.sender_rig import states
from pipeline.config import Settings

STAGES = ("intake", "preferences", "routing", "sender", "retry", "receipts")
# Longer than the pool's wait for a connection (psycopg_pool's 30 s): every stage exhausts its wait at least once.
DATABASE_OUTAGE_S = 35
REDIS_OUTAGE_S = 30


@pytest.fixture(scope="module")
def forwarders(settings: Settings) -> Iterator[tuple[TcpForwarder, TcpForwarder]]:
    database, redis = TcpForwarder(settings.postgres_port), TcpForwarder(settings.redis_port)
    try:
        yield database, redis
    finally:
        database.close()
        redis.close()


@pytest.fixture(scope="module")
def loop(settings: Settings, forwarders: tuple[TcpForwarder, TcpForwarder]) -> Iterator[LoopRig]:
    database, redis = forwarders
    env = {"DATABASE_URL": f"postgresql://notify:notify@127.0.0.1:{database.port}/notify",
           "REDIS_URL": f"redis://127.0.0.1:{redis.port}/0"}
    yield from start_loop(settings, "tfault", STAGES, env)


@pytest.fixture
def rig(loop: LoopRig, forwarders: tuple[TcpForwarder, TcpForwarder]) -> LoopRig:
    for forwarder in forwarders:
        forwarder.mend()
    loop.sim.reset()
    for provider in ("twilio", "termii", "sendgrid", "mailgun"):
        loop.sim.configure(provider, error_rates={}, outage_s=0, delivery_delay_ms=100)
    return loop


def wait_until(what: str, done: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until `done()` held."""
    started = time.monotonic()
    while not done():
        assert time.monotonic() - started < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.5)
    return time.monotonic() - started


def delivered(rig: LoopRig, ids: Sequence[str]) -> int:
    return sum(1 for state in states(rig.settings, ids).values() if state == "delivered")


def final_events(rig: LoopRig, ids: Sequence[str]) -> collections.Counter[tuple[str, str]]:
    codec = serde.AvroSerde()
    finals: collections.Counter[tuple[str, str]] = collections.Counter()
    mine = set(ids)
    for message in rig.events.snapshot():
        event = codec.decode(message.value(), expected=serde.DELIVERY_EVENT).value
        if str(event["notification_id"]) in mine and event["status"] in ("delivered", "failed", "dead_lettered"):
            finals[str(event["notification_id"]), event["status"]] += 1
    return finals


def assert_each_once(rig: LoopRig, ids: Sequence[str]) -> None:
    """Ledger, rows and final events agree: each notification sent once, delivered, ended once; none quarantined."""
    sent = collections.Counter(e["notification_id"] for e in rig.ledger_of(ids))
    assert set(sent) == set(ids) and set(sent.values()) == {1}, sent.most_common(3)
    assert collections.Counter(states(rig.settings, ids).values()) == {"delivered": len(ids)}
    expected = {(nid, "delivered"): 1 for nid in ids}
    deadline = time.monotonic() + 30  # the events reader follows the topic a little behind
    while (finals := final_events(rig, ids)) != expected and time.monotonic() < deadline:
        time.sleep(1)
    assert finals == expected
    assert read_topic(rig.settings, topics.INVALID, 2) == []


def test_postgresql_gone_for_longer_than_the_pool_timeout_mid_burst_loses_nothing_and_repeats_nothing(
        rig: LoopRig, forwarders: tuple[TcpForwarder, TcpForwarder]) -> None:
    database, _ = forwarders
    ids = produce_requests(rig.settings, requests(800, "fault-db"))
    wait_until("a first share sent", lambda: len(rig.ledger_of(ids)) >= 40, 90)
    database.cut()  # mid-burst: requests queued, sends in flight, receipts arriving
    ledger_at_cut = len(rig.ledger_of(ids))
    time.sleep(DATABASE_OUTAGE_S)
    ledger_during = len(rig.ledger_of(ids))
    database.mend()
    recovery_s = wait_until("every notification delivered", lambda: delivered(rig, ids) == len(ids), 180)
    print(f"database outage {DATABASE_OUTAGE_S} s: {ledger_at_cut} sent at the cut, {ledger_during} by its end, "
          f"all {len(ids)} delivered {recovery_s:.1f} s after it ended")
    assert_each_once(rig, ids)


def test_redis_gone_for_thirty_seconds_critical_keeps_flowing_bulk_waits_and_nothing_is_lost(
        rig: LoopRig, forwarders: tuple[TcpForwarder, TcpForwarder]) -> None:
    _, redis = forwarders
    redis.cut()
    batch = requests(200, "fault-redis")  # even: transaction SMS (critical), odd: portfolio email (bulk)
    ids = produce_requests(rig.settings, batch)
    critical = [r["notification_id"] for r in batch if r["type"] == "transaction"]
    bulk = [r["notification_id"] for r in batch if r["type"] != "transaction"]
    flowing_s = wait_until("critical delivered without Redis", lambda: delivered(rig, critical) == len(critical),
                           REDIS_OUTAGE_S)
    bulk_during = delivered(rig, bulk)
    time.sleep(max(0.0, REDIS_OUTAGE_S - flowing_s))
    redis.mend()
    recovery_s = wait_until("bulk delivered", lambda: delivered(rig, bulk) == len(bulk), 180)
    print(f"redis outage {REDIS_OUTAGE_S} s: all {len(critical)} critical delivered {flowing_s:.1f} s in; "
          f"{bulk_during} of {len(bulk)} bulk during it, all {recovery_s:.1f} s after it ended")
    assert bulk_during < len(bulk)  # bulk waits for its rate limits (it is held durably, not dropped)
    assert_each_once(rig, ids)
