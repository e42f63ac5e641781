"""More than one worker per stage: `worker --all --replicas` runs several processes in a stage's consumer group, and
workers join and leave during a burst (cooperative rebalancing: only the partitions that change owner move).

The rig starts with two processes of intake, preferences and sender per lane; mid-burst three more join (intake
and preferences of the bulk lane, a third critical sender), then two of them leave with SIGTERM (they commit and
leave the group) and a supervised replica is SIGKILLed (its partitions move after the session timeout; the
supervisor starts it again). Requests that arrive after the moves need the tables on their new owners: users whose
settings opt out of email get no email, and a request repeated under the same idempotency key is a duplicate.
Then: each notification sent once, delivered, ended once (ledger, rows, final events by event_id), every opted-out
one suppressed and never sent, each repeat a duplicate once and never sent, and in every group the partitions and
the table partitions its live workers hold are exactly the topic's partitions, each worker's table holding the
partitions it owns.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from support.loop_rig import LoopRig, assert_each_once, delivered, produce_requests, start_loop, wait_until
from support.loop_rig import mixed_requests as requests

from pipeline.bench.sender_rig import states
from pipeline.config import REPO_ROOT, Settings
from pipeline.domain import Lane
from pipeline.kafka import clients, serde, topics
from pipeline.stack import prometheus
from pipeline.stages.runtime import ASSIGNMENT_STRATEGY
from pipeline.stages.worker import metrics_port

STAGES = ("intake", "preferences", "routing", "sender", "retry", "receipts")
REPLICAS = "intake=2,preferences=2,sender=2"
MAX_REPLICAS = 3
BURST = 1600
FIRST = 600  # before the joins; the rest after them, while two leave and one dies
OPTED_OUT = 40
REPEATS = 40
PARTITIONS = topics.spec("requests.critical").partitions


@pytest.fixture(scope="module")
def rig(settings: Settings) -> Iterator[LoopRig]:
    yield from start_loop(settings, "treplicas", STAGES, replicas=REPLICAS, max_replicas=MAX_REPLICAS)


def metric(rig: LoopRig, stage: str, lane: Lane, replica: int, name: str) -> float | None:
    """The sum of a metric's series at one worker process, None when the process does not answer."""
    port = metrics_port(rig.settings, stage, lane, replica)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3).read().decode()
    except OSError:
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(name + "{"))


def spawn(rig: LoopRig, stage: str, lane: Lane, replica: int, log: Path) -> subprocess.Popen[bytes]:
    """One more process of a stage's group, as `worker --all --replicas` starts each of its own."""
    env = {**os.environ, **rig.env, "NOTIFY_TOPIC_PREFIX": rig.settings.topic_prefix,
           "NOTIFY_METRICS_PORT": str(rig.settings.metrics_port)}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "worker", "--stage", stage, "--lane", lane,
                             "--replica", str(replica)], env=env, cwd=REPO_ROOT, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def supervised(rig: LoopRig, argv_tail: Sequence[str]) -> int:
    """The pid of the supervisor's child whose command line ends with `argv_tail`."""
    for pid in rig.workers.pids():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        if argv[-len(argv_tail):] == list(argv_tail):
            return pid
    raise AssertionError(f"no worker {' '.join(argv_tail)}")


def opted_out_requests(count: int) -> list[dict[str, Any]]:
    """Bulk portfolio emails to users whose settings opt portfolio out of email."""
    batch = requests(2 * count, "replicas-opted-out")[1::2]  # the bulk (email) half
    for request in batch:
        request["user_id"] = f"ro-{uuid.uuid4().hex[:10]}"
    return batch


def put_opt_outs(settings: Settings, batch: Sequence[dict[str, Any]]) -> None:
    codec = serde.AvroSerde()
    producer = clients.producer(settings)
    for request in batch:
        producer.produce(settings.topic(topics.USER_SETTINGS), key=request["user_id"].encode(),
                         value=codec.encode(serde.USER_SETTINGS, {
                             "user_id": request["user_id"], "version": 1,
                             "updated_at": datetime.datetime.now(datetime.UTC),
                             "categories": {"portfolio": {"opted_in_channels": [], "opted_out_channels": ["email"]}}}))
    assert producer.flush(30) == 0


def repeats_of(batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same requests again (user, type, idempotency key) under new notification ids: an upstream resend."""
    return [{**request, "notification_id": str(uuid.uuid4())} for request in batch]


def events_by_status(rig: LoopRig, ids: Sequence[str]) -> dict[str, collections.Counter[str]]:
    codec = serde.AvroSerde()
    mine = set(ids)
    seen: dict[str, dict[str, set[str]]] = collections.defaultdict(lambda: collections.defaultdict(set))
    for message in rig.events.snapshot():
        event = codec.decode(message.value(), expected=serde.DELIVERY_EVENT).value
        if str(event["notification_id"]) in mine:
            seen[str(event["notification_id"])][event["status"]].add(str(event["event_id"]))
    return {nid: collections.Counter({status: len(ids) for status, ids in by.items()}) for nid, by in seen.items()}


def holdings(rig: LoopRig, stage: str, lane: Lane) -> list[tuple[int, float, float | None]]:
    """(replica, partitions owned, table partitions held) of every live process of a stage's group."""
    out = []
    for replica in range(MAX_REPLICAS):
        owned = metric(rig, stage, lane, replica, "notify_stage_assigned_partitions")
        if owned is not None:
            table = metric(rig, stage, lane, replica, "notify_stage_table_partitions")
            out.append((replica, owned, table))
    return out


def test_the_stacks_prometheus_scrapes_every_replica_the_supervisor_runs(rig: LoopRig) -> None:
    """Its committed targets list replica 0 of each stage; the supervisor adds a file for the others."""
    path = prometheus.config_dir(rig.settings) / "targets" / f"workers-replicas-{rig.settings.metrics_port}.json"
    wait_until("the supervisor's targets file", path.exists, 60)  # written once it has started every replica
    listed = json.loads(path.read_text())
    replicas = {(metrics_port(rig.settings, stage, lane, 1), stage, lane)
                for stage in ("intake", "preferences", "sender") for lane in ("critical", "bulk")}
    assert {(int(t["targets"][0].rpartition(":")[2]), t["labels"]["stage"], t["labels"]["lane"])
            for t in listed} == replicas
    assert {t["labels"]["replica"] for t in listed} == {"1"}
    ports = {port for port, _stage, _lane in replicas}

    def scraped_up() -> set[int]:
        url = f"http://127.0.0.1:{rig.settings.prometheus_port}/api/v1/targets?state=active"
        with urllib.request.urlopen(url, timeout=10) as response:
            active = json.loads(response.read())["data"]["activeTargets"]
        return {int(t["labels"]["instance"].rpartition(":")[2]) for t in active
                if t["labels"].get("replica") == "1" and t["health"] == "up"} & ports

    wait_until("Prometheus to scrape every replica", lambda: scraped_up() == ports, 60)


def test_workers_joining_and_leaving_mid_burst_lose_nothing_repeat_nothing_and_tables_follow(
        rig: LoopRig, tmp_path: Path) -> None:
    for provider in ("twilio", "termii", "sendgrid", "mailgun"):
        rig.sim.configure(provider, delivery_delay_ms=100)
    assert ASSIGNMENT_STRATEGY == "cooperative-sticky"
    lanes: tuple[Lane, ...] = ("critical", "bulk")
    wait_until("both processes of each replicated group owning partitions", lambda: all(
        (metric(rig, stage, lane, replica, "notify_stage_assigned_partitions") or 0) > 0
        for stage in ("intake", "preferences", "sender") for lane in lanes for replica in (0, 1)), 90)
    opted_out = opted_out_requests(OPTED_OUT)
    put_opt_outs(rig.settings, opted_out)
    burst = requests(BURST, "replicas")
    first = produce_requests(rig.settings, burst[:FIRST])
    wait_until("the first sends", lambda: len(rig.ledger_of(first)) >= 1, 90)

    # three workers join mid-burst
    joining: list[tuple[str, Lane]] = [("intake", "bulk"), ("preferences", "bulk"), ("sender", "critical")]
    added = {(stage, lane): spawn(rig, stage, lane, 2, tmp_path / f"{stage}-{lane}.log") for stage, lane in joining}
    try:
        joined_s = wait_until("the new workers owning partitions", lambda: all(
            (metric(rig, stage, lane, 2, "notify_stage_assigned_partitions") or 0) > 0
            for stage, lane in added), 60)
        second = produce_requests(rig.settings, burst[FIRST:])
        out_ids = produce_requests(rig.settings, opted_out)
        repeats = repeats_of(burst[:REPEATS])  # of the first half: intake saw them before the moves
        repeat_ids = produce_requests(rig.settings, repeats)
        at_moves = len(rig.ledger_of(second))
        # two leave gracefully (commit, leave the group); a supervised replica dies and is started again
        leaving: list[tuple[str, Lane]] = [("sender", "critical"), ("intake", "bulk")]
        for key in leaving:
            added[key].send_signal(signal.SIGTERM)
        killed = supervised(rig, ["--stage", "preferences", "--lane", "critical", "--replica", "1"])
        os.kill(killed, signal.SIGKILL)
        for key in leaving:
            assert added[key].wait(30) == 0, f"{key} did not leave cleanly"
        ids = [*first, *second]
        settled_s = wait_until("every delivery sent and answered",
                               lambda: set(states(rig.settings, ids).values()) <= {"delivered", "accepted"}
                               and len(states(rig.settings, ids)) == len(ids), 150)
        delivered_s = wait_until("every notification delivered", lambda: delivered(rig, ids) == len(ids), 60)
        wait_until("the opted-out ones suppressed",
                   lambda: set(states(rig.settings, out_ids).values()) == {"suppressed"}
                   and len(states(rig.settings, out_ids)) == len(out_ids), 60)
        wait_until("the repeats answered", lambda: all(
            events_by_status(rig, repeat_ids).get(nid, collections.Counter())["duplicate"] for nid in repeat_ids), 60)
        wait_until("the killed replica back", lambda: (metric(rig, "preferences", "critical", 1,
                                                               "notify_stage_assigned_partitions") or 0) > 0, 60)
        print(f"\n{BURST} notifications, workers added {joined_s:.1f} s after the first sends, removed and killed "
              f"with {at_moves} of the last {BURST - FIRST} sent: all answered {settled_s:.1f} s after, delivered "
              f"{delivered_s:.1f} s later; "
              f"{len(out_ids)} opted out suppressed, {len(repeat_ids)} repeats duplicates")

        # every group's live workers hold each partition once, and each worker's tables exactly what it owns
        for stage in ("intake", "preferences", "sender"):
            for lane in lanes:
                held = holdings(rig, stage, lane)
                inputs = len(topics.CHANNELS) if stage == "sender" else 1  # the sender reads send.<channel>.<lane>
                assert sum(owned for _, owned, _ in held) == inputs * PARTITIONS, (stage, lane, held)
                if stage != "sender":  # intake's dedup table, preferences' settings table
                    assert all(table == owned for _, owned, table in held), (stage, lane, held)
                print(f"  {stage}/{lane}: {len(held)} workers holding {[int(owned) for _, owned, _ in held]}")
    finally:
        for process in added.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)

    # opted out: suppressed, never sent, ended once; repeats: a duplicate once, no row, never sent
    assert rig.ledger_of([*out_ids, *repeat_ids]) == []
    out_events = events_by_status(rig, out_ids)
    assert all(out_events[nid]["suppressed"] == 1 for nid in out_ids), out_events
    repeat_events = events_by_status(rig, repeat_ids)
    assert {nid: dict(c) for nid, c in repeat_events.items()} == {nid: {"duplicate": 1} for nid in repeat_ids}
    assert states(rig.settings, repeat_ids) == {}
    assert_each_once(rig, ids)
