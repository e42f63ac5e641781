"""Infrastructure faults mid-burst on the real stack, every stage running, receipts through the API's webhooks.

The workers and the API reach PostgreSQL and Redis through loopback forwarders that this test cuts: to them it is
the database or Redis going away (every connection reset, every new one refused), while the stack the rest of the
suite shares keeps running. After each fault: the simulator's ledger holds each notification once, every row is
final, the delivery-events topic ends each one once, and nothing went to quarantine (an infrastructure error
pauses and retries; only bad data is quarantined). Bounded: a few hundred notifications, every wait timed.
"""

from __future__ import annotations

import collections
import datetime
import json
import time
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from psycopg.conninfo import make_conninfo
from support.harness import TcpForwarder, read_topic
from support.loop_rig import LoopRig, assert_each_once, delivered, produce_requests, start_loop, wait_until
from support.loop_rig import mixed_requests as requests

from pipeline.bench.sender_rig import states
from pipeline.config import Settings
from pipeline.domain import MAX_USER_ID_LENGTH
from pipeline.kafka import serde, topics
from pipeline.state import db

STAGES = ("intake", "preferences", "routing", "sender", "retry", "receipts")
# Longer than the pool's wait for a connection (psycopg_pool's 30 s): every stage exhausts its wait at least once.
DATABASE_OUTAGE_S = 35
REDIS_OUTAGE_S = 30
RECEIPT_DELAY_MS = 8000  # long enough for a burst of 200 to be accepted before the first receipt comes
RECEIPTS_OUTAGE_S = 20
HANG_SHARE = 0.2
FINAL_STATES = ("delivered", "failed", "dead_lettered", "expired", "suppressed")


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
    env = {"DATABASE_URL": make_conninfo(settings.dsn, port=database.port),
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


def receipts_taken(rig: LoopRig, ids: Sequence[str]) -> int:
    """Ledger entries whose receipt the API answered 2xx (Kafka holds it)."""
    return sum(1 for e in rig.ledger_of(ids) if any(200 <= c.get("status", 0) < 300 for c in e["callbacks"]))


def post(rig: LoopRig, key: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(rig.api_url + path, data=json.dumps(body).encode(), method="POST", headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 202
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def hostile_requests(unique: str) -> list[dict[str, Any]]:
    """Requests the schema accepts that try what they can: markup, SQL, format strings and template syntax in
    parameters; emoji, right-to-left overrides, zero-width and combining characters in ids; a long multi-part
    SMS; a subject that tries to add a mail header; a channel with nowhere to go; edge-of-limit lengths."""
    later = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=300)).isoformat()
    tricky = "'; DROP TABLE deliveries;-- {code} {{7*7}} ${7*7} %s %(x)s %n \\ \" ` <b>"
    phone, email = "+2348012345678", "a.b+tag@sub.example.co.uk"

    def request(n: int, kind: str, channels: list[str], **fields: Any) -> dict[str, Any]:
        return {"idempotency_key": f"hostile-{unique}-{n}", "user_id": f"h{n}-{unique}", "type": kind,
                "channels": channels, "recipient": {"phone": phone, "email": email}, **fields}

    return [
        request(0, "otp", ["sms"], template_id="otp.login", template_params={"code": "<script>alert(1)</script>"},
                locale="fr-FR"),
        request(1, "transaction", ["sms", "email"], template_id="transaction.debit", template_params={
            "amount": "1,000,000.00", "currency": "\u20a6", "account": tricky, "merchant": "{merchant}",
            "__class__": "x", "unused.key with spaces": "y"}),
        request(2, "otp", ["sms"], content={"body": ("Code 424242 \U0001f984\u200d\u0301 " * 40)[:1530]},
                user_id=f"\u30e6\u30fc\u30b6\u30fc-\U0001f984-\u202e-\u200b-{unique}"),
        request(3, "security", ["email"], content={"subject": "Hello\r\nBcc: victim@example.com",
                                                   "body": "<html><body onload=alert(1)>hi</body></html>"}),
        request(4, "transaction", ["sms", "push"], template_id="transaction.default",
                correlation_id="\u202etxen\u202c-" + "z" * 200,
                source_service="\u0645\u062f\u0641\u0648\u0639\u0627\u062a"),
        request(5, "price_alert", ["email"], template_id="price_alert.default", expires_at=later,
                locale="zh-Hant-TW-u-ca-chinese"),
        request(6, "portfolio", ["email"], template_id="portfolio.default",
                template_params={f"k{i}": "v" * 100 for i in range(200)}),
        request(7, "otp", ["sms"], template_id="otp.default", template_params={"code": "0" * 1500},
                user_id=("u\u0308" * 64)[:MAX_USER_ID_LENGTH - 6] + unique[:6]),
        request(8, "transaction", ["email"], template_id="transaction.default",
                recipient={"phone": None, "email": "\u00fc\u00f1\u00ee@example.com", "device_tokens": []}),
        request(9, "security", ["sms"], template_id="security.default", idempotency_key="\U0001f511" * 60 + unique),
    ]


def final_outcomes(rig: LoopRig, ids: Sequence[str]) -> dict[str, str]:
    """Each id at its end: `duplicate`, or its deliveries' ends joined by + (`delivered`, `suppressed:<reason>`,
    or any other final state, which the caller counts as wrong). Ids still on their way are left out."""
    codec = serde.AvroSerde()
    mine = set(ids)
    duplicates = {str(event["notification_id"]) for event in (
        codec.decode(m.value(), expected=serde.DELIVERY_EVENT).value for m in rig.events.snapshot())
        if event["status"] == "duplicate" and str(event["notification_id"]) in mine}
    with db.connect(rig.settings) as conn:
        rows = conn.execute("SELECT notification_id::text, state, last_error_code FROM deliveries "
                            "WHERE notification_id = ANY(%s)", (list(ids),)).fetchall()
    ends: dict[str, set[str]] = collections.defaultdict(set)
    for nid, state, code in rows:
        ends[nid].add("on its way" if state not in FINAL_STATES else f"suppressed:{code}"
                      if state == "suppressed" else state)
    outcomes = {nid: "duplicate" for nid in duplicates}
    outcomes.update({nid: "+".join(sorted(parts)) for nid, parts in ends.items() if "on its way" not in parts})
    return outcomes


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


def test_receipts_that_arrive_while_postgresql_is_down_wait_in_kafka_and_deliver_once(
        rig: LoopRig, forwarders: tuple[TcpForwarder, TcpForwarder]) -> None:
    database, _ = forwarders
    for provider in ("twilio", "sendgrid"):
        rig.sim.configure(provider, delivery_delay_ms=RECEIPT_DELAY_MS)
    ids = produce_requests(rig.settings, requests(200, "fault-receipts"))
    wait_until("every one accepted", lambda: collections.Counter(states(rig.settings, ids).values())
               == {"accepted": len(ids)}, 90)
    database.cut()  # the receipts are still on their way: each comes RECEIPT_DELAY_MS after its send
    cut_at = time.monotonic()
    delivered_at_cut = delivered(rig, ids)
    # The API takes each receipt (200 once Kafka holds it: no database needed) and the receipts stage waits.
    posted_s = wait_until("every receipt posted and taken", lambda: receipts_taken(rig, ids) == len(ids), 60)
    time.sleep(max(0.0, RECEIPTS_OUTAGE_S - (time.monotonic() - cut_at)))
    delivered_during = delivered(rig, ids)  # read through the real port: the stage's own connections are cut
    database.mend()
    recovery_s = wait_until("every receipt applied", lambda: delivered(rig, ids) == len(ids), 120)
    print(f"receipts during a {RECEIPTS_OUTAGE_S} s database outage: {len(ids)} accepted before it, "
          f"{delivered_at_cut} delivered at the cut, every receipt taken by the API {posted_s:.1f} s in, "
          f"{delivered_during} delivered during it, all {len(ids)} delivered {recovery_s:.1f} s after it ended")
    assert delivered_during == delivered_at_cut < len(ids)
    assert_each_once(rig, ids)


def test_a_provider_that_accepts_then_hangs_during_a_burst_sends_each_notification_once(rig: LoopRig) -> None:
    # Twilio takes a fifth of the requests and never answers them; it delivers each message 3 s after taking it
    # (past the sender's 1.5 s timeout) and loses half of the receipts.
    rig.sim.configure("twilio", accept_then_hang=HANG_SHARE, delivery_delay_ms=3000, lost_receipts=0.5)
    batch = requests(300, "fault-hang")  # even: transaction SMS through Twilio, odd: portfolio email
    ids = produce_requests(rig.settings, batch)
    # A hung request times out: the provider may have it, so the row is `unknown` and nothing re-sends it (a
    # receipt that comes later delivers it); the other sends go on around it.
    answered_s = wait_until("every send answered or timed out",
                            lambda: set(states(rig.settings, ids).values()) <= {"delivered", "unknown", "accepted"}
                            and len(states(rig.settings, ids)) == len(ids), 120)
    rig.sim.configure("twilio", accept_then_hang=0.0)
    time.sleep(4)  # past the simulated delivery, and the receipts that come, of the last ones
    timed_out = {nid for nid in ids if "unknown" in rig.statuses(nid)}
    stuck = {nid: state for nid, state in states(rig.settings, ids).items() if state != "delivered"}
    resolved = rig.reconcile(list(stuck))["resolved"] if stuck else {}
    recovery_s = wait_until("every notification delivered", lambda: delivered(rig, ids) == len(ids), 60)
    print(f"Twilio accepting then hanging {HANG_SHARE:.0%} of a burst of {len(ids)}: every send answered or timed "
          f"out {answered_s:.1f} s in, {len(timed_out)} timed out (unknown), "
          f"{len(timed_out) - sum(1 for s in stuck.values() if s == 'unknown')} of them delivered by a later "
          f"receipt; the reconciler resolved {resolved}; all delivered {recovery_s:.1f} s later")
    assert timed_out and resolved == dict(collections.Counter(f"{state}:delivered" for state in stuck.values()))
    assert any(state == "unknown" for state in stuck.values())
    assert_each_once(rig, ids)


def test_hostile_but_valid_requests_through_the_api_each_end_delivered_suppressed_or_duplicate(
        rig: LoopRig, api_key: str, unique: str) -> None:
    accepted = [post(rig, api_key, "/v1/notifications", body) for body in hostile_requests(unique)]
    again = hostile_requests(unique)[0]  # the same idempotency key once more: the same notification, a duplicate
    repeated = post(rig, api_key, "/v1/notifications", again)
    in_batch = post(rig, api_key, "/v1/notifications:batch", {"notifications": hostile_requests(f"b{unique}")[:5]})
    ids = [r["notification_id"] for r in [*accepted, repeated]] + in_batch["notification_ids"]
    assert len(set(ids)) == len(ids)
    try:
        wait_until("every hostile request at its end", lambda: len(final_outcomes(rig, ids)) == len(ids), 90)
    except AssertionError:
        ended = final_outcomes(rig, ids)
        pytest.fail("not ended as they should: " + "; ".join(
            f"{nid}: {[(e['status'], e['error_code'], e['error_message']) for e in rig.events_of(nid)]}"
            for nid in ids if nid not in ended))
    outcome = final_outcomes(rig, ids)
    assert outcome[repeated["notification_id"]] == "duplicate"
    # request 4 asks for push without a device token: that channel has nowhere to go, its SMS is sent
    assert outcome[accepted[4]["notification_id"]] == "delivered+suppressed:no_recipient"
    assert collections.Counter(outcome.values()) == {"delivered": len(ids) - 3, "duplicate": 1,
                                                     "delivered+suppressed:no_recipient": 2}, outcome
    sent = collections.Counter((e["notification_id"], e["provider"]) for e in rig.ledger_of(ids))
    assert set(sent.values()) == {1}
    injected = [e for e in rig.ledger_of(ids) if e.get("subject") and "Bcc" in e["subject"]]
    assert injected and all("\n" not in e["subject"] and "\r" not in e["subject"] for e in injected)
    assert read_topic(rig.settings, topics.INVALID, 2) == []
