"""Push per device on the real stack: the sender and the retry tiers as processes, the simulator as FCM and APNs.

A retry of a push goes only to the devices that did not accept, each device's outcome is in the attempt log, and
the row keeps the reduced task. The simulator's ledger (accepted pushes) and its answer counts are the ground truth.
"""

from __future__ import annotations

import collections
import dataclasses
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from support.loop_rig import SenderRig

from pipeline.bench.rig import Workers, free_port_block
from pipeline.bench.sender_rig import SimulatorProcess, make_task, produce, seed
from pipeline.config import Settings
from pipeline.kafka import clients, serde, topics
from pipeline.policy.push import fingerprint
from pipeline.state import db

ANDROID = "dXk3:APA91bH-accepting-phone"
GONE = "unregistered-old-tablet"  # the simulator's FCM answers 404 UNREGISTERED


class Rig(SenderRig):
    def attempts(self, nid: str) -> list[tuple[int, str, str | None, str, str | None, str | None]]:
        """(attempt_no, provider, platform, outcome, error code, fingerprint) of each call, in order."""
        with db.connect(self.settings) as conn:
            rows = conn.execute(
                "SELECT attempt_no, provider, device_platform, outcome, error_code, device_fingerprint "
                "FROM notification_attempts WHERE notification_id = %s ORDER BY attempt_id", (nid,)).fetchall()
        return [tuple(r) for r in rows]

    def row(self, nid: str) -> dict[str, Any]:
        with db.connect(self.settings) as conn:
            cursor = conn.execute("SELECT state, provider, provider_message_id, accepted_at, attempt_count, task "
                                  "FROM deliveries WHERE notification_id = %s", (nid,))
            names = [c.name for c in cursor.description or []]
            found = cursor.fetchone()
        assert found is not None
        return dict(zip(names, found, strict=True))

    def stored_devices(self, nid: str) -> list[str]:
        task = serde.AvroSerde().decode(bytes(self.row(nid)["task"]), expected=serde.DELIVERY_TASK).value
        return [d["token"] for d in task["device_tokens"]]

    def pushes(self, nid: str) -> collections.Counter[str]:
        """Accepted pushes per device token."""
        return collections.Counter(e["to"] for e in self.sim.ledger_of(nid))


@pytest.fixture(scope="module")
def rig(settings: Settings) -> Iterator[Rig]:
    prefix = f"tpush{uuid.uuid4().hex[:8]}."
    mine = dataclasses.replace(settings, topic_prefix=prefix, metrics_port=free_port_block())
    topics.apply(mine)
    sim = SimulatorProcess.start(mine, mine.stack_dir / f"test-push-sim-{prefix.strip('.')}.log")
    workers = Workers.start(mine, stages=("sender", "retry"), env={
        **sim.env, "NOTIFY_RETRY_DELAYS_CRITICAL": "1,2,3", "NOTIFY_RETRY_DELAYS_BULK": "1,2,3",
        "NOTIFY_BREAKER_MIN_CALLS": "100000", "NOTIFY_PROVIDER_TIMEOUT_S": "2", "NOTIFY_LOG_LEVEL": "INFO"})
    made = Rig(mine, sim, workers)
    try:
        warm = made.run([push_task(ANDROID)])  # the lane's groups joined and the FCM connector has its token
        made.wait(warm, ("accepted",), timeout_s=120)
        yield made
    finally:
        workers.stop()
        sim.stop()
        clients.delete_prefixed(mine, groups=True)


@pytest.fixture
def fresh(rig: Rig) -> Rig:
    rig.sim.reset()
    return rig


def push_task(*tokens: str) -> dict[str, Any]:
    """A security push to these devices (64 hex digits: an APNs device token of an iPhone; else FCM's Android)."""
    return make_task(notification_type="security", channel="push", to=None, device_tokens=[
        {"platform": "ios" if len(t) == 64 else "android", "token": t} for t in tokens])


def test_a_push_retry_goes_only_to_the_device_that_failed_and_each_devices_outcome_is_logged(fresh: Rig) -> None:
    iphone = uuid.uuid4().hex * 2  # fails once with APNs' 503 ServiceUnavailable, then accepts
    fresh.sim.configure("apns", device_faults={iphone: ["outage"]})
    [nid] = fresh.run([push_task(ANDROID, iphone, GONE)])
    assert fresh.wait([nid], ("accepted",)) == {nid: "accepted"}

    # one push per device that takes them: the phone once (no duplicate from the retry), the iPhone once, at its
    # second try; the unregistered tablet never
    assert fresh.pushes(nid) == {ANDROID: 1, iphone: 1}
    assert fresh.sim.stats()["apns"] == {"503": 1, "200": 1, "accepted": 1}
    assert fresh.attempts(nid) == [
        (1, "fcm", "android", "accepted", None, fingerprint(ANDROID)),
        (1, "apns", "ios", "transient", "ServiceUnavailable", fingerprint(iphone)),
        (1, "fcm", "android", "permanent", "UNREGISTERED", fingerprint(GONE)),
        (2, "apns", "ios", "accepted", None, fingerprint(iphone)),
    ]
    row = fresh.row(nid)
    assert (row["state"], row["attempt_count"], row["accepted_at"] is not None) == ("accepted", 2, True)
    assert fresh.stored_devices(nid) == [iphone]  # what a re-injection would send: never the phone or the tablet
    with db.connect(fresh.settings) as conn:  # no raw token anywhere in the attempt log
        logged = conn.execute("SELECT count(*) FROM notification_attempts WHERE notification_id = %s AND "
                              "(error_payload::text LIKE %s OR device_fingerprint = %s)",
                              (nid, f"%{iphone}%", iphone)).fetchone()
    assert logged == (0,)


def test_a_push_that_reached_one_device_ends_accepted_when_the_others_run_out_of_retries(fresh: Rig) -> None:
    iphone = uuid.uuid4().hex * 2
    fresh.sim.configure("apns", device_faults={iphone: ["outage"] * 10})
    [nid] = fresh.run([push_task(ANDROID, iphone)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(fresh.attempts(nid)) < 5:
        time.sleep(0.25)
    assert fresh.wait([nid], ("accepted",)) == {nid: "accepted"}  # not dead-lettered: the user has it

    assert fresh.pushes(nid) == {ANDROID: 1}
    assert [(no, provider, outcome) for no, provider, _, outcome, _, _ in fresh.attempts(nid)] == [
        (1, "fcm", "accepted"), (1, "apns", "transient"),
        (2, "apns", "transient"), (3, "apns", "transient"), (4, "apns", "transient")]  # three tiers, then done


def test_a_send_record_read_again_after_a_partial_push_never_reaches_the_device_that_accepted(fresh: Rig) -> None:
    """As a crash before the offset commit (or a replay) leaves it: the row holds the reduced task and is due, and
    the original record, which lists every device, comes again."""
    iphone = uuid.uuid4().hex * 2
    task = push_task(ANDROID, iphone)
    nid = task["notification_id"]
    seed(fresh.settings, [task])
    reduced = serde.AvroSerde().encode(serde.DELIVERY_TASK, {**task, "device_tokens": [
        {"platform": "ios", "token": iphone}]})
    with db.connect(fresh.settings) as conn, conn.transaction():
        conn.execute("UPDATE deliveries SET state = 'retry_scheduled', next_attempt_at = now(), attempt_count = 1, "
                     "retry_tier = 1, provider = 'fcm', provider_message_id = %s, accepted_at = now(), task = %s "
                     "WHERE notification_id = %s", (f"projects/p/messages/earlier-{nid}", reduced, nid))
    produce(fresh.settings, [task])
    assert fresh.wait([nid], ("accepted",)) == {nid: "accepted"}

    assert fresh.pushes(nid) == {iphone: 1}  # the phone had it from the first attempt
    assert [(no, provider, outcome) for no, provider, _, outcome, _, _ in fresh.attempts(nid)] == [
        (2, "apns", "accepted")]
    row = fresh.row(nid)  # the first device's acceptance stands
    assert (row["provider"], row["provider_message_id"]) == ("fcm", f"projects/p/messages/earlier-{nid}")
