"""The whole after-send loop as processes: simulator -> receipts webhooks on the API -> workers (sender, retry,
receipts). Shared by the recovery, replay and chaos tests; the simulator's ledger is the ground truth."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pipeline import config
from pipeline.bench.rig import Workers, free_port_block
from pipeline.bench.sender_rig import SimulatorProcess, produce, seed, states, wait_states
from pipeline.config import REPO_ROOT, Settings
from pipeline.domain import CRITICAL_TYPES
from pipeline.kafka import clients, serde, topics
from pipeline.ops.reconcile import reconcile_once
from pipeline.state import db
from support.harness import TopicReader, read_topic

LOOP_STAGES = ("sender", "retry", "receipts")
# Short tiers, a short lease, breakers out of the way (tests fail providers on purpose), quick provider timeouts.
LOOP_ENV = {"NOTIFY_RETRY_DELAYS_CRITICAL": "1,2,3", "NOTIFY_RETRY_DELAYS_BULK": "1,2,3",
            "NOTIFY_SENDER_LEASE_S": "5", "NOTIFY_BREAKER_MIN_CALLS": "100000", "NOTIFY_PROVIDER_TIMEOUT_S": "1.5",
            "NOTIFY_PROVIDER_MAX_CONCURRENCY": "128", "NOTIFY_LOG_LEVEL": "INFO"}
FINAL = ("delivered", "failed", "dead_lettered", "expired", "suppressed")


@dataclasses.dataclass
class SenderRig:
    """Workers of the sending side and the simulator they send to: tasks seeded and produced, rows waited for."""

    settings: Settings
    sim: SimulatorProcess
    workers: Workers

    def run(self, tasks: Sequence[dict[str, Any]]) -> list[str]:
        seed(self.settings, tasks)
        produce(self.settings, tasks)
        return [t["notification_id"] for t in tasks]

    def wait(self, ids: Sequence[str], done: Sequence[str] = ("accepted",), timeout_s: float = 60) -> dict[str, str]:
        seen = wait_states(self.settings, ids, done, timeout_s)
        assert set(seen.values()) <= set(done), collections.Counter(seen.values())
        return seen


@dataclasses.dataclass
class LoopRig:
    settings: Settings
    sim: SimulatorProcess
    api: subprocess.Popen[bytes]
    workers: Workers
    env: dict[str, str]
    events: TopicReader
    stages: Sequence[str] = LOOP_STAGES
    exporter: bool = False
    api_url: str = ""
    replicas: str | None = None  # `worker --all --replicas`

    # ------------------------------------------------------------------ driving
    def run(self, tasks: Sequence[dict[str, Any]]) -> list[str]:
        seed(self.settings, tasks)
        produce(self.settings, tasks)
        return [t["notification_id"] for t in tasks]

    def wait(self, ids: Sequence[str], done: Sequence[str] = ("delivered",), timeout_s: float = 60) -> dict[str, str]:
        seen = wait_states(self.settings, ids, done, timeout_s)
        assert set(seen.values()) <= set(done), collections.Counter(seen.values())
        return seen

    def start_workers(self) -> None:
        self.workers = Workers.start(self.settings, stages=self.stages, env=self.env, exporter=self.exporter,
                                     replicas=self.replicas)

    def scrape_targets(self) -> dict[str, list[tuple[int, dict[str, str]]]]:
        """This rig's processes as Prometheus targets per job (the API, its workers, its exporter if any)."""
        from pipeline.stack.prometheus import targets

        found = targets(self.settings)
        return {"api": [(port, dict(labels)) for port, labels in found["api"]],
                "workers": [(port, dict(labels)) for port, labels in found["workers"]
                            if labels["stage"] in self.stages],
                "exporter": [(port, dict(labels)) for port, labels in found["exporter"] if self.exporter]}

    def reconcile(self, ids: Sequence[str], **thresholds: float) -> dict[str, Any]:
        """One reconciliation round over `ids`, thresholds zero unless given."""
        as_workers = config.load({**os.environ, **self.env, "NOTIFY_TOPIC_PREFIX": self.settings.topic_prefix})
        zero: dict[str, Any] = {"reconcile_lease_grace_s": 0.0, "reconcile_unknown_after_s": 0.0,
                                "reconcile_receipt_timeout_s": 0.0, "reconcile_retry_overdue_s": 0.0}
        mine = dataclasses.replace(as_workers, **{**zero, **thresholds})
        return asyncio.run(reconcile_once(mine, list(ids))).as_dict()

    # ------------------------------------------------------------------ looking
    def rows(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        with db.connect(self.settings) as conn:
            cursor = conn.execute(
                "SELECT notification_id::text, state, provider, provider_message_id, attempt_count, retry_tier, "
                "fallback_from, last_error_code FROM deliveries WHERE notification_id = ANY(%s)", (list(ids),))
            names = [c.name for c in cursor.description or []]
            return {r[0]: dict(zip(names, r, strict=True)) for r in cursor.fetchall()}

    def attempts(self, ids: Sequence[str]) -> list[tuple[str, int, str, str]]:
        with db.connect(self.settings) as conn:
            rows = conn.execute(
                "SELECT notification_id::text, attempt_no, provider, outcome FROM notification_attempts "
                "WHERE notification_id = ANY(%s) ORDER BY attempt_id", (list(ids),)).fetchall()
        return [(str(a), int(b), str(c), str(d)) for a, b, c, d in rows]

    def ledger_of(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        mine = set(ids)
        return [e for e in self.sim.ledger() if e["notification_id"] in mine]

    def events_of(self, nid: str) -> list[dict[str, Any]]:
        codec = serde.AvroSerde()
        decoded = (codec.decode(m.value(), expected=serde.DELIVERY_EVENT).value for m in self.events.snapshot())
        return [e for e in decoded if str(e["notification_id"]) == nid]

    def statuses(self, nid: str) -> list[str]:
        return [e["status"] for e in self.events_of(nid)]

    def worker_metric(self, stage: str, lane: str, line_start: str) -> float:
        from pipeline.stages.worker import metrics_port

        port = metrics_port(self.settings, stage, lane)  # type: ignore[arg-type]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(line_start))


def mixed_requests(count: int, source: str = "loop-e2e") -> list[dict[str, Any]]:
    """Half transaction SMS (critical), half portfolio email (bulk), each user its own (and its own phone)."""
    now = datetime.datetime.now(datetime.UTC)
    out = []
    for n in range(count):
        critical = n % 2 == 0
        out.append({
            "notification_id": str(uuid.uuid4()), "idempotency_key": uuid.uuid4().hex,
            "user_id": f"rp-{uuid.uuid4().hex[:10]}", "type": "transaction" if critical else "portfolio",
            "channels": ["sms" if critical else "email"],
            "recipient": {"phone": f"+1415{n:07d}", "email": "ada@example.com", "device_tokens": []},
            "template_id": "transaction.default" if critical else "portfolio.default", "template_params": {},
            "created_at": now, "expires_at": now + datetime.timedelta(minutes=30), "source_service": source})
    return out


def produce_requests(settings: Settings, batch: Sequence[dict[str, Any]]) -> list[str]:
    """NotificationRequests straight onto their lane's requests topic (what the ingest API would produce)."""
    codec = serde.AvroSerde()
    producer = clients.producer(settings, **{"linger.ms": 20})
    for request in batch:
        lane = "critical" if request["type"] in CRITICAL_TYPES else "bulk"
        producer.produce(settings.topic(topics.requests_topic(lane)), key=request["user_id"].encode(),
                         value=codec.encode(serde.NOTIFICATION_REQUEST, request))
        producer.poll(0)
    assert producer.flush(60) == 0
    return [r["notification_id"] for r in batch]


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
    """Final events per (notification, status), counted by event id: a record Kafka took twice (its first ack lost
    in a broker crash, then produced again) is one event, which a consumer recognises by its event_id."""
    codec = serde.AvroSerde()
    seen: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    mine = set(ids)
    for message in rig.events.snapshot():
        event = codec.decode(message.value(), expected=serde.DELIVERY_EVENT).value
        if str(event["notification_id"]) in mine and event["status"] in ("delivered", "failed", "dead_lettered"):
            seen[str(event["notification_id"]), event["status"]].add(str(event["event_id"]))
    return collections.Counter({key: len(events) for key, events in seen.items()})


def assert_each_once(rig: LoopRig, ids: Sequence[str]) -> None:
    """Ledger, rows and final events agree: each notification sent once, delivered, ended once; none quarantined."""
    sent = collections.Counter(e["notification_id"] for e in rig.ledger_of(ids))
    assert set(sent) == set(ids) and set(sent.values()) == {1}, sent.most_common(3)
    assert collections.Counter(states(rig.settings, ids).values()) == {"delivered": len(ids)}
    expected = {(nid, "delivered"): 1 for nid in ids}
    deadline = time.monotonic() + 30  # the events reader follows the topic a little behind
    while (finals := final_events(rig, ids)) != expected and time.monotonic() < deadline:
        time.sleep(1)
    assert finals == expected, (f"{len(set(expected) - set(finals))} without their final event, e.g. "
                                f"{sorted(set(expected) - set(finals))[:3]}; ended otherwise or more than once: "
                                f"{[(k, n) for k, n in finals.items() if expected.get(k) != n][:5]}")
    assert read_topic(rig.settings, topics.INVALID, 2) == []


def start_loop(settings: Settings, name: str, stages: Sequence[str] = LOOP_STAGES,
               env: dict[str, str] | None = None, exporter: bool = False,
               api_env: dict[str, str] | None = None, replicas: str | None = None,
               max_replicas: int = 1) -> Iterator[LoopRig]:
    """The rig; `api_env` is added to the API's environment alone (after the rest); `replicas` is the workers'
    `--replicas`, and `max_replicas` the most processes of one stage and lane the test runs (metrics ports)."""
    prefix = f"{name}{uuid.uuid4().hex[:8]}."
    api_port = free_port_block(1)
    ports = free_port_block() if max_replicas == 1 else free_port_block(1 + 2 * 7 * max_replicas + 1)
    mine = dataclasses.replace(settings, topic_prefix=prefix, metrics_port=ports, api_port=api_port)
    topics.apply(mine)
    webhooks = f"http://127.0.0.1:{api_port}/webhooks"
    sim = SimulatorProcess.start(mine, mine.stack_dir / f"{name}-sim-{prefix.strip('.')}.log",
                                 {"NOTIFY_WEBHOOK_BASE_URL": webhooks})
    env = {**sim.env, **LOOP_ENV, "NOTIFY_WEBHOOK_BASE_URL": webhooks, **(env or {})}
    api_log = (mine.stack_dir / f"{name}-api-{prefix.strip('.')}.log").open("wb")
    api = subprocess.Popen([sys.executable, "-m", "pipeline", "api", "--port", str(api_port)],
                           env={**os.environ, **env, "NOTIFY_TOPIC_PREFIX": prefix,
                                "NOTIFY_METRICS_PORT": str(free_port_block(1)),
                                **{k: v.format(metrics_port=mine.metrics_port, api_port=api_port)
                                   for k, v in (api_env or {}).items()}},
                           cwd=REPO_ROOT, stdout=api_log, stderr=subprocess.STDOUT, start_new_session=True)
    workers = Workers.start(mine, stages=stages, env=env, exporter=exporter, replicas=replicas)
    rig = LoopRig(mine, sim, api, workers, env, TopicReader(mine, topics.DELIVERY_EVENTS), stages, exporter,
                  f"http://127.0.0.1:{api_port}", replicas)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{api_port}/health/live", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline and api.poll() is None, "the API did not start"
                time.sleep(0.2)
        yield rig
    finally:
        rig.events.close()
        rig.workers.stop()
        os.killpg(api.pid, signal.SIGTERM)
        try:
            api.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(api.pid, signal.SIGKILL)
        api_log.close()
        sim.stop()
        clients.delete_prefixed(mine, groups=True)
