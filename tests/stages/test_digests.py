"""Digests on the real stack, every stage running: a user with an hourly digest gets one email listing the items
of the window instead of one per item; an item that expired before the window ended is left out and reported
expired; an OTP is never digested. Then the two things that must not send twice: a replay of accepted.bulk
(the items were answered: not held again) and a release round repeated after a crash (the same digest id: routing
sends it once). The window's end is moved to now by the test; everything else is the pipeline's own doing.
"""

from __future__ import annotations

import datetime
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from support.loop_rig import LoopRig, start_loop, wait_until

from pipeline.config import Settings
from pipeline.kafka import clients, serde, topics
from pipeline.policy import digests
from pipeline.state import db

STAGES = ("intake", "preferences", "routing", "sender", "retry", "receipts")
def outcomes(rig: LoopRig, outcome: str) -> float:
    """notify_stage_messages_total of the bulk preferences worker for outcomes starting with `outcome`."""
    from pipeline.stages.worker import metrics_port

    url = f"http://127.0.0.1:{metrics_port(rig.settings, 'preferences', 'bulk')}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("notify_stage_messages_total{") and f'outcome="{outcome}' in line)


def serving(rig: LoopRig) -> bool:
    try:
        outcomes(rig, "")
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def rig(settings: Settings) -> Iterator[LoopRig]:
    yield from start_loop(settings, "tdig", STAGES)


def put_settings(rig: LoopRig, record: dict[str, Any]) -> None:
    wait_until("the bulk preferences worker", lambda: serving(rig), 60)
    before = outcomes(rig, "settings_")
    producer = clients.producer(rig.settings)
    producer.produce(rig.settings.topic(topics.USER_SETTINGS), key=record["user_id"].encode(),
                     value=serde.AvroSerde().encode(serde.USER_SETTINGS, record))
    assert producer.flush(30) == 0
    wait_until("the settings at the bulk preferences worker", lambda: outcomes(rig, "settings_") > before, 30)


def request(user_id: str, email: str, notification_type: str, n: int, ttl_s: float = 3600) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC)
    critical = notification_type == "otp"
    return {
        "notification_id": str(uuid.uuid4()), "idempotency_key": uuid.uuid4().hex, "user_id": user_id,
        "type": notification_type, "channels": ["sms"] if critical else ["push", "email"],
        "recipient": {"phone": "+14155550123", "email": email, "device_tokens": []},
        "template_id": None,
        "content": {"subject": f"Update {n}" if not critical else None,
                    "body": f"Your code is {n:06d}" if critical else f"Your portfolio moved {n}%."},
        "created_at": now + datetime.timedelta(milliseconds=n), "expires_at": now + datetime.timedelta(seconds=ttl_s),
        "source_service": "digest-test"}


def produce(rig: LoopRig, requests: list[dict[str, Any]]) -> list[str]:
    codec = serde.AvroSerde()
    producer = clients.producer(rig.settings)
    for req in requests:
        lane = "critical" if req["type"] == "otp" else "bulk"
        producer.produce(rig.settings.topic(topics.requests_topic(lane)), key=req["user_id"].encode(),
                         value=codec.encode(serde.NOTIFICATION_REQUEST, req))
    assert producer.flush(30) == 0
    return [r["notification_id"] for r in requests]


def held(rig: LoopRig, ids: list[str]) -> list[tuple[str, datetime.datetime, bytes]]:
    with db.connect(rig.settings) as conn:
        rows = conn.execute("SELECT notification_id::text, window_end, request FROM digest_items "
                            "WHERE notification_id = ANY(%s::uuid[]) ORDER BY created_at", (ids,)).fetchall()
    return [(str(a), b, bytes(c)) for a, b, c in rows]


def deliveries(rig: LoopRig, ids: list[str]) -> dict[str, tuple[str, str, str | None]]:
    with db.connect(rig.settings) as conn:
        rows = conn.execute("SELECT notification_id::text, channel, state, last_error_code FROM deliveries "
                            "WHERE notification_id = ANY(%s::uuid[])", (ids,)).fetchall()
    return {str(r[0]): (r[1], r[2], r[3]) for r in rows}


def test_an_hourly_digest_is_one_email_for_the_window_sent_once_through_replays_and_repeated_rounds(
        rig: LoopRig) -> None:
    rig.sim.reset()
    user_id, email = f"dig-{uuid.uuid4().hex[:10]}", f"dig{uuid.uuid4().hex[:8]}@example.com"
    put_settings(rig, {"user_id": user_id, "version": 1, "updated_at": datetime.datetime.now(datetime.UTC),
                       "timezone": "Asia/Kolkata", "digest": "hourly"})
    items = [request(user_id, email, "portfolio", n) for n in (1, 2, 3)]
    stale = request(user_id, email, "portfolio", 4, ttl_s=4)  # expires before its window ends
    otp = request(user_id, email, "otp", 5)
    ids = produce(rig, [*items, stale, otp])
    item_ids, stale_id, otp_id = ids[:3], ids[3], ids[4]

    wait_until("four items held", lambda: len(held(rig, [*item_ids, stale_id])) == 4, 60)
    kept = held(rig, [*item_ids, stale_id])
    end = kept[0][1]
    assert {row[1] for row in kept} == {end}  # one window
    assert end > datetime.datetime.now(datetime.UTC) and end.minute % 30 == 0  # the next local hour in India
    wait_until("the OTP delivered at once", lambda: deliveries(rig, [otp_id]).get(otp_id, ("", ""))[1]
               == "delivered", 60)
    assert deliveries(rig, [*item_ids, stale_id]) == {}  # held: no delivery row, nothing sent
    assert rig.ledger_of([*item_ids, stale_id]) == []

    time.sleep(4)  # past the stale item's expiry
    with db.connect(rig.settings) as conn, conn.transaction():  # the window ends now
        conn.execute("UPDATE digest_items SET window_end = now() WHERE notification_id = ANY(%s::uuid[])", (ids,))
        moved = conn.execute("SELECT DISTINCT window_end FROM digest_items WHERE notification_id = ANY(%s::uuid[])",
                             (ids,)).fetchone()
    assert moved is not None
    digest_id = digests.digest_id(user_id, "portfolio", moved[0])
    wait_until("the digest delivered", lambda: deliveries(rig, [digest_id]).get(digest_id, ("", ""))[1]
               == "delivered", 60)

    [sent] = rig.ledger_of([digest_id])
    assert (sent["provider"], sent["to"]) == ("sendgrid", email)
    assert sent["subject"] == "Your hourly digest: 3 portfolio updates"
    assert [line for line in sent["body"].splitlines() if line[:2] in ("1.", "2.", "3.", "4.")] == [
        "1. Update 1: Your portfolio moved 1%.", "2. Update 2: Your portfolio moved 2%.",
        "3. Update 3: Your portfolio moved 3%."]
    answered = deliveries(rig, [*item_ids, stale_id])
    assert answered == {**{nid: ("email", "suppressed", "digested") for nid in item_ids},
                        stale_id: ("email", "expired", "expired_before_digest")}
    assert held(rig, ids) == []
    assert [s for s in rig.statuses(item_ids[0]) if s != "received"] == ["deferred", "suppressed"]
    assert rig.ledger_of([*item_ids, stale_id]) == [] and len(rig.ledger_of([otp_id])) == 1

    # A replay of accepted.bulk (ops reset the preferences group): the items were answered, none is held again.
    before = outcomes(rig, "digested")
    producer = clients.producer(rig.settings)
    for _nid, _end, raw in kept:
        producer.produce(rig.settings.topic(topics.accepted_topic("bulk")), key=user_id.encode(), value=raw)
    assert producer.flush(30) == 0
    wait_until("the replayed items decided", lambda: outcomes(rig, "digested") >= before + 4, 30)
    time.sleep(2)  # a releaser round or two
    assert held(rig, ids) == []

    # A round repeated after a crash between its produce and its delete: the same window's items come back.
    with db.connect(rig.settings) as conn, conn.transaction():
        conn.execute("DELETE FROM deliveries WHERE notification_id = ANY(%s::uuid[])", ([*item_ids, stale_id],))
        for nid, _end, raw in kept:
            conn.execute("INSERT INTO digest_items (notification_id, user_id, notification_type, frequency, "
                         "window_end, address, request, topic_prefix) "
                         "VALUES (%s, %s, 'portfolio', 'hourly', %s, %s, %s, %s)",
                         (nid, user_id, moved[0], email, raw, rig.settings.topic_prefix))
    wait_until("the repeated round done", lambda: held(rig, ids) == [], 30)
    time.sleep(3)  # whatever routing and the sender would do with the repeated digest
    assert len(rig.ledger_of([digest_id])) == 1
    assert deliveries(rig, [digest_id]) == {digest_id: ("email", "delivered", None)}
