"""A COMMIT whose answer is lost, in the sender: its recording transaction (each sent delivery's outcome and the
attempt log) commits in PostgreSQL while the connection breaks before the answer comes back.

The sender retries the recording. It must find out that the first try committed (pg_xact_status of the
transaction) and finish what comes after a commit: each delivery's event once, a parked delivery's retry-tier
record once, no second attempt row, nothing sent twice. Before, the retry found the rows moved already, took them
for lost leases and emitted nothing: no `accepted` event, and a parked delivery's retry record never written.

The sender workers reach PostgreSQL through a forwarder that loses exactly one such answer when armed.
"""

from __future__ import annotations

import collections
import dataclasses
import time
import uuid
from collections.abc import Iterator

import pytest
from psycopg.conninfo import make_conninfo
from support.harness import CommitAnswerLoser, TopicReader
from support.loop_rig import SenderRig, wait_until

from pipeline.bench.rig import Workers, free_port_block
from pipeline.bench.sender_rig import SimulatorProcess, make_task
from pipeline.config import Settings
from pipeline.kafka import clients, serde, topics
from pipeline.stages import retry
from pipeline.state import db

COUNT = 20


@dataclasses.dataclass
class Rig(SenderRig):
    loser: CommitAnswerLoser
    events: TopicReader
    tier1: TopicReader

    def statuses(self, ids: list[str]) -> dict[str, list[str]]:
        codec, mine = serde.AvroSerde(), set(ids)
        seen: dict[str, list[str]] = collections.defaultdict(list)
        for message in self.events.snapshot():
            event = codec.decode(message.value(), expected=serde.DELIVERY_EVENT).value
            if str(event["notification_id"]) in mine:
                seen[str(event["notification_id"])].append(event["status"])
        return seen

    def parked(self, ids: list[str]) -> collections.Counter[str]:
        """Records on the first retry tier, per notification of `ids`."""
        mine = set(ids)
        found = (dict(m.headers() or []).get(retry.HEADER_NOTIFICATION, b"").decode() for m in self.tier1.snapshot())
        return collections.Counter(nid for nid in found if nid in mine)

    def attempts(self, ids: list[str]) -> collections.Counter[tuple[str, int, str]]:
        """Rows of the attempt log per (notification, attempt number, provider): a call logged twice counts 2."""
        with db.connect(self.settings) as conn:
            rows = conn.execute("SELECT notification_id::text, attempt_no, provider FROM notification_attempts "
                                "WHERE notification_id = ANY(%s)", (ids,)).fetchall()
        return collections.Counter((str(n), int(a), str(p)) for n, a, p in rows)


@pytest.fixture(scope="module")
def rig(settings: Settings) -> Iterator[Rig]:
    prefix = f"tlost{uuid.uuid4().hex[:8]}."
    mine = dataclasses.replace(settings, topic_prefix=prefix, metrics_port=free_port_block())
    topics.apply(mine)
    loser = CommitAnswerLoser(mine.postgres_port, marker=b"pg_current_xact_id")
    sim = SimulatorProcess.start(mine, mine.stack_dir / f"test-lost-commit-sim-{prefix.strip('.')}.log", {})
    workers = Workers.start(mine, stages=("sender",), env={
        **sim.env, "DATABASE_URL": make_conninfo(mine.dsn, port=loser.port), "NOTIFY_BREAKER_MIN_CALLS": "1000"})
    events = TopicReader(mine, topics.DELIVERY_EVENTS)
    tier1 = TopicReader(mine, topics.retry_topics("critical")[0])
    made = Rig(mine, sim, workers, loser, events, tier1)
    try:
        made.wait(made.run([make_task(notification_type="transaction")]), timeout_s=120)  # warm, nothing lost
        yield made
    finally:
        events.close()
        tier1.close()
        workers.stop()
        sim.stop()
        loser.close()
        clients.delete_prefixed(mine, groups=True)


def test_accepted_deliveries_whose_commit_answer_was_lost_get_their_events_once_and_nothing_twice(rig: Rig) -> None:
    rig.sim.reset()
    rig.loser.arm(1)
    ids = rig.run([make_task(notification_type="transaction") for _ in range(COUNT)])
    rig.wait(ids, done=("accepted", "delivered"), timeout_s=120)
    assert rig.loser.lost == 1, "the forwarder never lost a commit answer: the test did not test anything"
    ledger = collections.Counter(e["notification_id"] for e in rig.sim.ledger() if e["notification_id"] in ids)
    assert ledger == dict.fromkeys(ids, 1)
    attempts = rig.attempts(ids)  # the lost try's attempts, not a second copy of them
    assert set(attempts.values()) == {1} and {nid for nid, _, _ in attempts} == set(ids)

    def accepted_events() -> dict[str, int]:
        return {nid: statuses.count("accepted") for nid, statuses in rig.statuses(ids).items()}
    wait_until("an accepted event for each", lambda: len(accepted_events()) == COUNT, 60)
    time.sleep(2)  # and no second one behind it
    assert accepted_events() == dict.fromkeys(ids, 1)


def test_a_parked_delivery_whose_commit_answer_was_lost_still_gets_its_retry_record_once(rig: Rig) -> None:
    rig.sim.reset()
    for provider in ("twilio", "termii"):
        rig.sim.configure(provider, error_rates={"5xx": 1.0})
    lost_before = rig.loser.lost
    rig.loser.arm(1)
    ids = rig.run([make_task(notification_type="transaction") for _ in range(COUNT)])
    rig.wait(ids, done=("retry_scheduled",), timeout_s=120)
    assert rig.loser.lost == lost_before + 1

    wait_until("a retry record for each", lambda: len(rig.parked(ids)) == COUNT, 60)
    time.sleep(2)
    assert rig.parked(ids) == dict.fromkeys(ids, 1)
    assert {nid: s.count("retry_scheduled") for nid, s in rig.statuses(ids).items()} == dict.fromkeys(ids, 1)
    attempts = rig.attempts(ids)  # each provider's call logged once
    assert set(attempts.values()) == {1} and {nid for nid, _, _ in attempts} == set(ids)
    rig.sim.reset()
