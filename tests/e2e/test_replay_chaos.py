"""Replay and chaos, end to end: requests in, every stage running, receipts through the API's webhooks.

- Replay: a run to completion, workers stopped, every consumer group reset to the beginning of every topic it
  reads, the run again: the simulator's ledger gains nothing. Then with the email providers down during the first
  run: the replay finishes what was unfinished, and still nobody gets anything twice.
- Chaos: 10% of Twilio requests failing and the critical sender SIGKILLed mid-run: every notification ends final,
  once, and the ledger, `deliveries` and the delivery-events topic agree.
Bounded: a few thousand notifications, every wait with a timeout.
"""

from __future__ import annotations

import collections
import os
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from support.loop_rig import FINAL, LoopRig, produce_requests, start_loop
from support.loop_rig import mixed_requests as requests

from pipeline.bench.sender_rig import states, wait_states
from pipeline.config import Settings
from pipeline.kafka import clients, serde
from pipeline.ops import replay

STAGES = ("intake", "preferences", "routing", "sender", "retry", "receipts")


@pytest.fixture(scope="module")
def loop(settings: Settings) -> Iterator[LoopRig]:
    # tiers long enough that a stopped run leaves deliveries waiting in them
    yield from start_loop(settings, "trpl", STAGES, {"NOTIFY_RETRY_DELAYS_BULK": "4,30,60"})


@pytest.fixture
def rig(loop: LoopRig) -> LoopRig:
    loop.sim.reset()
    for provider in ("twilio", "termii", "sendgrid", "mailgun"):
        loop.sim.configure(provider, error_rates={}, outage_s=0, delivery_delay_ms=100)
    if not loop.workers.alive():
        loop.start_workers()
    return loop


def groups_of(settings: Settings) -> dict[str, list[str]]:
    """Every consumer group of this run (by prefix) -> the topics it has committed offsets on."""
    admin = clients.admin(settings)
    listed = admin.list_consumer_groups().result(timeout=15)
    names = [g.group_id for g in listed.valid if g.group_id.startswith(f"{settings.topic_prefix}notify-")]
    out: dict[str, list[str]] = {}
    for name in names:
        answer = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(name)])[name].result(timeout=15)
        out[name] = sorted({tp.topic for tp in answer.topic_partitions if tp.offset >= 0})
    return out


def caught_up(settings: Settings, groups: dict[str, list[str]]) -> bool:
    """Every group has committed the end of every topic it reads."""
    for group, names in groups.items():
        consumer = clients.consumer(settings, group)
        try:
            for name in names:
                partitions = consumer.list_topics(name, timeout=10).topics[name].partitions
                tps = [TopicPartition(name, p) for p in partitions]
                committed = {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=10)}
                for tp in tps:
                    if committed[tp.partition] < clients.end_offset(consumer, tp) and (
                            clients.end_offset(consumer, tp) > 0):
                        return False
        finally:
            consumer.close()
    return True


def wait_caught_up(settings: Settings, groups: dict[str, list[str]], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not caught_up(settings, groups):
        assert time.monotonic() < deadline, "the replay did not catch up"
        time.sleep(1)


def replay_everything(rig: LoopRig) -> dict[str, list[str]]:
    """Workers stopped, every group reset to the beginning of every topic it read (`notify replay`), restarted."""
    groups = groups_of(rig.settings)
    assert {g.rsplit("notify-", 1)[1] for g in groups} >= {"intake-critical", "sender-critical", "receipts",
                                                            "routing-bulk", "retry-bulk"}
    rig.workers.stop()
    for group, names in groups.items():
        for name in names:
            replay.replay(rig.settings, group, name, to_offset=0, out=lambda _line: None)
    rig.start_workers()
    return groups


def ledger_counts(rig: LoopRig, ids: Sequence[str]) -> collections.Counter[str]:
    return collections.Counter(e["notification_id"] for e in rig.ledger_of(ids))


def test_a_replay_of_every_group_from_the_beginning_sends_nothing_twice(rig: LoopRig) -> None:
    ids = produce_requests(rig.settings, requests(2000))
    rows = rig.wait(ids, timeout_s=240)
    assert collections.Counter(rows.values()) == {"delivered": 2000}
    assert set(ledger_counts(rig, ids).values()) == {1} and len(ledger_counts(rig, ids)) == 2000
    ledger_before = len(rig.sim.ledger())

    groups = replay_everything(rig)
    wait_caught_up(rig.settings, groups)
    time.sleep(3)
    gained = rig.sim.ledger()[ledger_before:]
    assert gained == [], f"the replay sent {len(gained)} more: {gained}"  # the ledger gained zero messages
    assert collections.Counter(rig.wait(ids).values()) == {"delivered": 2000}


def test_a_replay_after_an_outage_finishes_what_was_unfinished_and_sends_nothing_twice(rig: LoopRig) -> None:
    rig.sim.configure("sendgrid", outage_s=600)
    rig.sim.configure("mailgun", outage_s=600)
    batch = requests(1000)
    ids = produce_requests(rig.settings, batch)
    sms = [r["notification_id"] for r in batch if r["type"] == "transaction"]
    email = [r["notification_id"] for r in batch if r["type"] == "portfolio"]
    rig.wait(sms, timeout_s=180)
    rig.wait(email, done=("retry_scheduled",), timeout_s=180)  # waiting in the bulk tiers

    rig.sim.configure("sendgrid", outage_s=0)
    rig.sim.configure("mailgun", outage_s=0)
    groups = replay_everything(rig)
    rows = rig.wait(ids, timeout_s=240)
    assert collections.Counter(rows.values()) == {"delivered": 1000}
    wait_caught_up(rig.settings, groups)
    time.sleep(3)
    counts = ledger_counts(rig, ids)
    assert len(counts) == 1000 and set(counts.values()) == {1}


def worker_pid(rig: LoopRig, stage: str, lane: str) -> int:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = [a for a in (proc / "cmdline").read_bytes().decode().split("\0") if a]
        except OSError:
            continue
        if int(proc.name) in rig.workers.pids() and ["--stage", stage, "--lane", lane] == argv[-4:]:
            return int(proc.name)
    raise AssertionError(f"no {stage}/{lane} worker")


def test_chaos_a_tenth_of_twilio_failing_and_a_sender_killed_mid_run_loses_nothing_and_repeats_nothing(
        rig: LoopRig) -> None:
    rig.sim.configure("twilio", error_rates={"5xx": 0.1}, latency_ms=100)
    batch = requests(3000)
    ids = produce_requests(rig.settings, batch)
    deadline = time.monotonic() + 60
    while sum(1 for s in states(rig.settings, ids).values() if s == "delivered") < 300:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(worker_pid(rig, "sender", "critical"), signal.SIGKILL)  # the supervisor restarts it

    deadline = time.monotonic() + 240
    while True:  # ops' `notify reconcile --once` until everything is final (rows a dead lease left `sending`)
        rows = wait_states(rig.settings, ids, FINAL, timeout_s=10)
        if set(rows.values()) <= set(FINAL) and len(rows) == len(ids):
            break
        assert time.monotonic() < deadline, collections.Counter(rows.values())
        # lease grace: receipts of what the killed worker did send have landed by then
        rig.reconcile([i for i, s in rows.items() if s not in FINAL], reconcile_lease_grace_s=5.0)
    assert collections.Counter(rows.values()) == {"delivered": 3000}  # none lost
    counts = ledger_counts(rig, ids)
    assert len(counts) == 3000 and set(counts.values()) == {1}  # none twice
    time.sleep(2)
    # The events agree: each notification has exactly one final event, the row's state. (Working-state events of
    # different stages can interleave: a receipt may overtake the sender's `accepted`, as with real providers.)
    codec = serde.AvroSerde()
    finals: dict[str, list[str]] = collections.defaultdict(list)
    for message in rig.events.snapshot():
        event = codec.decode(message.value(), expected=serde.DELIVERY_EVENT).value
        if event["status"] in FINAL:
            finals[str(event["notification_id"])].append(event["status"])
    assert collections.Counter(tuple(finals[nid]) for nid in ids) == {("delivered",): 3000}
