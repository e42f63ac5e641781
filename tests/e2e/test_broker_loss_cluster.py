"""Brokers lost from a three-node cluster mid-burst, every stage running, receipts through the API's webhooks.

The cluster is this module's own (three KRaft nodes, each broker + controller, from the stack's own code on ports
and in a folder of their own: tests/support/kafka_cluster.py), its topics replicated 3 times with
min.insync.replicas 2 as topics/ declares. Two faults, one after the other:

1. the leader of the busiest partitions is SIGKILLed mid-burst and started again later: the other two take over
   its partitions (new leaders, ISRs of two), so producers and stages stall only for the leader elections;
2. two nodes are lost together: with acks=all no write can reach two in-sync replicas (and the controller quorum is
   gone with them, so no leader moves and no ISR shrinks): writes stop with an error, nothing is acknowledged on
   one replica, and all resumes when they return.

Then, as for the single broker: the simulator's ledger holds each notification once, every row is delivered, the
delivery-events topic ends each one once (by event_id), nothing went to quarantine. How long producers (a probe
that writes every 100 ms), the provider's sends (the ledger) and each stage (its events) stood still is printed.
"""

from __future__ import annotations

import collections
import datetime
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from confluent_kafka import KafkaError, Message
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]  # public, re-exported without __all__
from support.kafka_cluster import OwnCluster, busiest_leader, fully_replicated, longest_gap
from support.loop_rig import LoopRig, assert_each_once, delivered, produce_requests, start_loop, wait_until
from support.loop_rig import mixed_requests as requests

from pipeline.bench.sender_rig import states
from pipeline.config import Settings
from pipeline.kafka import clients, serde, topics

STAGES = ("intake", "preferences", "routing", "sender", "retry", "receipts")
LEADER_DOWN_S = 15
TWO_DOWN_S = 12
FIRST_BURST = 2000
SECOND_BURST = 1000


@pytest.fixture(scope="module")
def cluster(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnCluster]:
    own = OwnCluster(settings, tmp_path_factory.mktemp("cluster"), brokers=3)
    try:
        own.start()
        yield own
    finally:
        own.stop()


@pytest.fixture(scope="module")
def rig(settings: Settings, cluster: OwnCluster) -> Iterator[LoopRig]:
    yield from start_loop(cluster.client_settings, "tcluster", STAGES,
                          {"KAFKA_BOOTSTRAP_SERVERS": cluster.bootstrap})


class Probe:
    """A producer writing one small record every 100 ms to a replicated topic of its own; the times Kafka
    acknowledged them say how long producers stalled."""

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.topic("probe")
        client = clients.admin(settings)
        for future in client.create_topics([NewTopic(self.topic, 3, 3, config={"min.insync.replicas": "2"})]).values():
            future.result(30)
        self.producer = clients.producer(settings)
        self.acked: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _done(self, error: KafkaError | None, _message: Message) -> None:
        if error is None:
            self.acked.append(time.time())
        else:
            self.errors.append(str(error))

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            self.producer.produce(self.topic, str(n).encode(), callback=self._done)
            self.producer.poll(0.1)
            n += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.producer.flush(40)


def stalls(rig: LoopRig, ids: Sequence[str], since: float, probe: Probe) -> dict[str, float]:
    """Seconds each producer of the pipeline stood still after `since` (epoch s), while it still had work after:
    the probe producer's acknowledgements, the provider's sends, each stage's events."""
    codec = serde.AvroSerde()
    mine = set(ids)
    by_stage: dict[str, list[float]] = collections.defaultdict(list)
    for message in rig.events.snapshot():
        event = codec.decode(message.value(), expected=serde.DELIVERY_EVENT).value
        if str(event["notification_id"]) in mine:
            at: datetime.datetime = event["occurred_at"]
            by_stage[str(event["stage"])].append(at.timestamp())
    out = {"producer (acks=all probe)": longest_gap(probe.acked, since)[0],
           "provider sends (ledger)": longest_gap([e["accepted_at"] for e in rig.ledger_of(ids)], since)[0]}
    out.update({f"stage {stage}": longest_gap(times, since)[0] for stage, times in sorted(by_stage.items())})
    return out


def shown(figures: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in figures.items())


def pipeline_topics(rig: LoopRig) -> list[str]:
    return [rig.settings.topic(name) for name in topics.catalogue()]


def write_once(settings: Settings, topic: str, timeout_ms: int) -> str | None:
    """Produce one record with acks=all and a short delivery timeout; None if acknowledged, else Kafka's error."""
    producer = clients.producer(settings, **{"delivery.timeout.ms": timeout_ms, "request.timeout.ms": timeout_ms // 2})
    outcome: list[str | None] = []
    producer.produce(topic, b"during the outage", callback=lambda e, _m: outcome.append(None if e is None else
                                                                                        f"{e.name()}: {e.str()}"))
    producer.flush(timeout_ms / 1000 + 10)
    return outcome[0] if outcome else "no delivery report"


def settle(rig: LoopRig, ids: Sequence[str], what: str) -> dict[str, Any]:
    """Wait until every delivery was sent and answered, ask the providers about those whose receipt was lost
    (a webhook refused while Kafka could not take it), then until all are delivered; figures for the report."""
    settled_s = wait_until(f"every delivery of {what} sent and answered",
                           lambda: set(states(rig.settings, ids).values()) <= {"delivered", "accepted"}
                           and len(states(rig.settings, ids)) == len(ids), 150)
    time.sleep(3)  # past the simulated delivery of the last ones sent, and the receipts still coming
    waiting = [nid for nid, state in states(rig.settings, ids).items() if state == "accepted"]
    resolved = rig.reconcile(waiting)["resolved"] if waiting else {}
    try:
        delivered_s = wait_until(f"every notification of {what} delivered",
                                 lambda: delivered(rig, ids) == len(ids), 60)
    except AssertionError:
        left = {nid: state for nid, state in states(rig.settings, ids).items() if state != "delivered"}
        pytest.fail(f"{what}: not delivered after the reconciler ({resolved}, {len(waiting)} were waiting): "
                    f"{collections.Counter(left.values())}; e.g. {list(left.items())[:3]}")
    # only the provider's word moved them (a receipt may still have overtaken the reconciler: never a re-send)
    assert set(resolved) <= {"accepted:delivered"} and sum(resolved.values()) <= len(waiting)
    return {"settled_s": settled_s, "waiting": len(waiting), "resolved": dict(resolved), "delivered_s": delivered_s}


def test_losing_the_busiest_leader_then_two_brokers_loses_nothing_and_repeats_nothing(
        rig: LoopRig, cluster: OwnCluster) -> None:
    for provider in ("twilio", "termii", "sendgrid", "mailgun"):
        rig.sim.configure(provider, delivery_delay_ms=100)
    names = pipeline_topics(rig)
    assert {len(isr) for isr in cluster.isrs(names).values()} == {3}, "every topic replicated on the three nodes"
    probe = Probe(rig.settings)
    try:
        # ---- 1. the leader of the busiest partitions, SIGKILLed mid-burst, back after LEADER_DOWN_S
        first = produce_requests(rig.settings, requests(FIRST_BURST, "cluster-leader"))
        victim = busiest_leader(cluster.end_offsets(names), cluster.leaders(names))  # the requests' partitions
        wait_until("the first sends", lambda: len(rig.ledger_of(first)) >= 1, 90)
        killed_at = time.time()
        cluster.kill(victim)
        at_kill = len(rig.ledger_of(first))
        assert at_kill < FIRST_BURST, "the kill came after the burst"
        # two of three nodes left: once the controller has fenced the dead one (broker.session.timeout.ms, 9 s),
        # taken it out of every ISR and moved its partitions' leadership, acks=all writes go on without it
        failover_s = wait_until("acks=all writes acknowledged without the dead node",
                                lambda: any(t > killed_at + 1 for t in probe.acked), 45)
        time.sleep(max(0.0, LEADER_DOWN_S - (time.time() - killed_at)))
        assert victim not in cluster.alive()
        during = len(rig.ledger_of(first))
        assert during > at_kill + 100, "the burst must go on without the dead leader"
        restart_s = cluster.start(victim)
        caught_up_s = wait_until("the restarted node back in every ISR",
                                 lambda: fully_replicated(cluster.isrs(names), 3), 90)
        one = settle(rig, first, "the first burst")
        one_stalls = stalls(rig, first, killed_at, probe)
        print(f"\nnode {victim} (leader of the busiest partitions) SIGKILLed {LEADER_DOWN_S} s mid-burst of "
              f"{FIRST_BURST}: {at_kill} sent at the kill, acks=all writes acknowledged again {failover_s:.1f} s "
              f"after it without it, {during} sent when it restarted; it answered {restart_s:.1f} s "
              f"after its start and was back in every ISR {caught_up_s:.1f} s later; every delivery answered "
              f"{one['settled_s']:.1f} s after that, {one['waiting']} waiting for a lost receipt, resolved by the "
              f"reconciler {one['resolved']}\n  stalled: {shown(one_stalls)}")

        # ---- 2. two of three nodes lost together for TWO_DOWN_S
        second = produce_requests(rig.settings, requests(SECOND_BURST, "cluster-two"))
        lost = sorted([victim, min(n for n in cluster.nodes if n != victim)])
        wait_until("the first sends of the second burst", lambda: len(rig.ledger_of(second)) >= 1, 90)
        two_at = time.time()
        cluster.kill(*lost)
        at_two = len(rig.ledger_of(second))
        assert at_two < SECOND_BURST, "the kill came after the burst"
        refused = write_once(rig.settings, probe.topic, 5000)
        time.sleep(max(0.0, TWO_DOWN_S - (time.time() - two_at)))
        acked_during = [t for t in probe.acked if t > two_at + 1]  # past what was in flight at the kill
        restart_two_s = cluster.start(*lost)
        two = settle(rig, second, "the second burst")
        two_stalls = stalls(rig, second, two_at, probe)
        print(f"nodes {lost} SIGKILLed together for {TWO_DOWN_S} s mid-burst of {SECOND_BURST}: {at_two} sent at "
              f"the kill; an acks=all write meanwhile: {refused}; the probe got {len(acked_during)} "
              f"acknowledgements while they were down; both answered {restart_two_s:.1f} s after their start; "
              f"every delivery answered {two['settled_s']:.1f} s after that, {two['waiting']} waiting for a lost "
              f"receipt, resolved by the reconciler {two['resolved']}\n  stalled: {shown(two_stalls)}")
        # writes stopped with an error rather than being acknowledged by the one node left
        assert refused is not None, "a write was acknowledged with one of three replicas"
        assert acked_during == [], f"{len(acked_during)} writes acknowledged with two of three nodes down"
        assert two_stalls["producer (acks=all probe)"] >= TWO_DOWN_S - 2
    finally:
        probe.stop()
    assert probe.errors == [] or all("timed out" in e.lower() for e in probe.errors), probe.errors[:3]
    assert rig.settings.bootstrap_servers == cluster.bootstrap  # the rig's processes ran on the cluster
    assert_each_once(rig, [*first, *second])
