"""The sender on its own: a simulator process, queued deliveries seeded in PostgreSQL, tasks on send topics.

Used by `notify bench send` and by the sender's end-to-end tests (one rig, so the benchmark measures exactly what
the tests check). Rows are seeded the way routing leaves them (`notifications` row + `queued` delivery), and
DeliveryTasks are produced to send.<channel>.<lane>, so the sender alone is measured and tested.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from connectors.simulator.admin import admin_call
from pipeline import config, db, kafka, metrics, serde, topics
from pipeline.bench import Workers, free_port_block
from pipeline.config import REPO_ROOT, Settings
from pipeline.domain import lane_for

SMS_TO = "+2348031234567"
EMAIL_TO = "ada@example.com"


def make_task(*, notification_type: str = "otp", channel: str = "sms", user_id: str | None = None,
              to: str | None = None, device_tokens: Sequence[Mapping[str, str]] = (),
              ttl: datetime.timedelta | None = datetime.timedelta(minutes=10), **fields: Any) -> dict[str, Any]:
    """A DeliveryTask as routing produces it (content pre-rendered unless a template is given)."""
    now = datetime.datetime.now(datetime.UTC)
    task: dict[str, Any] = {
        "notification_id": str(uuid.uuid4()), "user_id": user_id or f"u-{uuid.uuid4().hex[:10]}",
        "type": notification_type, "lane": lane_for(notification_type), "channel": channel,
        "address": to if to is not None else {"sms": SMS_TO, "email": EMAIL_TO}.get(channel),
        "device_tokens": list(device_tokens), "template_id": None, "template_params": {},
        "content": {"subject": "Your code", "body": "Your code is 123456"}, "locale": "en", "attempt": 1,
        "created_at": now, "expires_at": now + ttl if ttl is not None else None, "correlation_id": None,
    }
    task.update(fields)
    return task


SEED_NOTIFICATIONS = """
INSERT INTO notifications (notification_id, user_id, notification_type, idempotency_key, lane, source_service,
    requested_channels, created_at, expires_at)
SELECT k.id, k.user_id, k.type, k.id::text, k.lane, 'bench-send', ARRAY[k.channel], k.created_at, k.expires_at
FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[])
    AS k(id, user_id, type, lane, channel, created_at, expires_at)
ON CONFLICT DO NOTHING
"""
SEED_DELIVERIES = """
INSERT INTO deliveries (notification_id, channel, state, task)
SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::bytea[]) ON CONFLICT DO NOTHING
"""


def seed(settings: Settings, tasks: Sequence[Mapping[str, Any]]) -> None:
    """The `notifications` row and the `queued` delivery (with its task, as routing stores it) of each task."""
    codec = serde.AvroSerde()
    with db.connect(settings) as conn, conn.transaction():
        for start in range(0, len(tasks), 5000):
            chunk = tasks[start:start + 5000]
            conn.execute(SEED_NOTIFICATIONS, (
                [t["notification_id"] for t in chunk], [t["user_id"] for t in chunk], [t["type"] for t in chunk],
                [t["lane"] for t in chunk], [t["channel"] for t in chunk], [t["created_at"] for t in chunk],
                [t["expires_at"] for t in chunk]))
            conn.execute(SEED_DELIVERIES, ([t["notification_id"] for t in chunk], [t["channel"] for t in chunk],
                                           ["queued"] * len(chunk),
                                           [codec.encode(serde.DELIVERY_TASK, t) for t in chunk]))


def produce(settings: Settings, tasks: Iterable[Mapping[str, Any]]) -> int:
    codec = serde.AvroSerde()
    producer = kafka.producer(settings, **{"linger.ms": 20})
    count = 0
    for task in tasks:
        while True:
            try:
                producer.produce(settings.topic(topics.send_topic(task["channel"], task["lane"])),
                                 key=task["user_id"].encode(), value=codec.encode(serde.DELIVERY_TASK, task))
                break
            except BufferError:
                producer.poll(0.05)
        count += 1
    remaining = producer.flush(60)
    if remaining:
        raise RuntimeError(f"{remaining} tasks not acknowledged by Kafka")
    return count


def states(settings: Settings, ids: Sequence[str]) -> dict[str, str]:
    """notification id -> delivery state (one channel per task in this rig)."""
    with db.connect(settings) as conn:
        rows = conn.execute("SELECT notification_id::text, state FROM deliveries WHERE notification_id = ANY(%s)",
                            (list(ids),)).fetchall()
    return dict(rows)


def wait_states(settings: Settings, ids: Sequence[str], done: Iterable[str], timeout_s: float) -> dict[str, str]:
    """Poll until every id's row is in one of `done` states (or the timeout); the last states seen."""
    finals = set(done)
    deadline = time.monotonic() + timeout_s
    while True:
        seen = states(settings, ids)
        if (len(seen) == len(ids) and all(s in finals for s in seen.values())) or time.monotonic() > deadline:
            return seen
        time.sleep(0.25)


# --------------------------------------------------------------------------------------------- the simulator


@dataclass
class SimulatorProcess:
    """`notify simulator` as a child process on free ports, with a small client of its admin API."""

    process: subprocess.Popen[bytes]
    port: int
    env: dict[str, str]  # what workers need to talk to it
    log: IO[bytes]

    @classmethod
    def start(cls, settings: Settings, log_path: Path, extra_env: Mapping[str, str] | None = None
              ) -> SimulatorProcess:
        port = free_port_block(4)
        # Receipts go to the simulator's own sink: no webhook receiver runs here, and Twilio messages carry our
        # reference only in their StatusCallback URL.
        env = {"NOTIFY_SIMULATOR_PORT": str(port), "NOTIFY_WEBHOOK_BASE_URL": f"http://127.0.0.1:{port}/_sink"}
        if any(s.env == "NOTIFY_SIMULATOR_APNS_PORT" for s in config.SETTINGS.values()):
            env["NOTIFY_SIMULATOR_APNS_PORT"] = str(free_port_block(1))
        env.update(extra_env or {})
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("wb")
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "simulator", "--port", str(port)],
                                   env={**os.environ, **env}, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        sim = cls(process, port, env, log)
        deadline = time.monotonic() + 30
        while True:
            try:
                sim.call("GET", "/_admin/health")
                return sim
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    sim.stop()
                    raise RuntimeError(f"the simulator did not start; see {log_path}") from None
                time.sleep(0.1)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return admin_call(self.port, method, path, body)

    def configure(self, provider: str, **faults: Any) -> dict[str, Any]:
        answer: dict[str, Any] = self.call("POST", f"/_admin/providers/{provider}", faults)
        return answer

    def reset(self) -> None:
        self.call("POST", "/_admin/reset", {})

    def ledger(self, provider: str | None = None) -> list[dict[str, Any]]:
        path = "/_admin/ledger" + (f"?provider={provider}" if provider else "")
        return list(self.call("GET", path)["entries"])

    def stats(self) -> dict[str, dict[str, int]]:
        answer: dict[str, dict[str, int]] = self.call("GET", "/_admin/stats")
        return answer

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            self.log.close()


# --------------------------------------------------------------------------------------------- the benchmark


def _percentiles(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return (f"p50 {at(0.5) * 1000:.0f} ms, p95 {at(0.95) * 1000:.0f} ms, p99 {at(0.99) * 1000:.0f} ms, "
            f"max {ordered[-1] * 1000:.0f} ms")


def _in_flight(ports: Sequence[int]) -> float:
    total = 0.0
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("notify_sender_in_flight{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def run_round(settings: Settings, sim: SimulatorProcess, workers: Workers, latency_ms: float, count: int,
              ports: Sequence[int]) -> dict[str, Any]:
    """`count` tasks as one burst (half critical SMS, half bulk email) at `latency_ms` provider latency."""
    sim.reset()
    for provider in ("twilio", "sendgrid", "termii", "mailgun"):
        sim.configure(provider, latency_ms=latency_ms, jitter_ms=latency_ms / 5)
    tasks = [make_task(notification_type="otp", channel="sms") if i % 2 == 0 else
             make_task(notification_type="portfolio", channel="email", ttl=None) for i in range(count)]
    seed(settings, tasks)
    ids = [t["notification_id"] for t in tasks]
    cpu_before = workers.cpu_seconds()
    started = time.monotonic()
    produce(settings, tasks)
    peak = 0.0
    deadline = started + max(120.0, count / 20)
    while time.monotonic() < deadline:
        peak = max(peak, _in_flight(ports))
        with db.connect(settings) as conn:
            row = conn.execute("SELECT count(*) FROM deliveries WHERE notification_id = ANY(%s) "
                               "AND state NOT IN ('queued', 'sending')", (ids,)).fetchone()
        if row is not None and row[0] == count:
            break
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    cpu_after = workers.cpu_seconds()
    cpu = sum(cpu_after.get(pid, 0.0) - before for pid, before in cpu_before.items())
    with db.connect(settings) as conn:
        done = conn.execute(
            "SELECT n.lane, d.state, extract(epoch FROM d.accepted_at - n.created_at) FROM deliveries d "
            "JOIN notifications n USING (notification_id) WHERE d.notification_id = ANY(%s)", (ids,)).fetchall()
        provider_ms = conn.execute(
            "SELECT provider, latency_ms FROM notification_attempts WHERE notification_id = ANY(%s)",
            (ids,)).fetchall()
    accepted = sum(1 for _, state, _ in done if state == "accepted")
    ledger = len(sim.ledger())
    by_provider: dict[str, list[float]] = {}
    for provider, ms in provider_ms:
        by_provider.setdefault(provider, []).append(ms / 1000)
    return {
        "latency_ms": latency_ms, "count": count, "accepted": accepted, "ledger": ledger, "elapsed_s": elapsed,
        "throughput": accepted / elapsed if elapsed else 0.0, "peak_in_flight": peak,
        "cpu_ms_per_notification": cpu * 1000 / max(1, accepted),
        "end_to_end": {lane: _percentiles([float(s) for ln, st, s in done if ln == lane and s is not None])
                       for lane in ("critical", "bulk")},
        "provider": {p: _percentiles(v) for p, v in sorted(by_provider.items())},
    }


def run_send_bench(settings: Settings, *, count: int = 4000, latencies_ms: Sequence[float] = (50, 200),
                   concurrency: int = 256) -> int:
    prefix = f"bench-send-{uuid.uuid4().hex[:6]}."
    mine = dataclasses.replace(settings, topic_prefix=prefix, metrics_port=free_port_block())
    topics.apply(mine)
    sim = SimulatorProcess.start(mine, mine.stack_dir / f"bench-send-sim-{prefix.strip('.')}.log",
                                 {"NOTIFY_SIMULATOR_DELIVERY_DELAY_MS": "100"})
    env = {**sim.env, "NOTIFY_PROVIDER_MAX_CONCURRENCY": str(concurrency), "NOTIFY_LOG_LEVEL": "WARNING"}
    workers = Workers.start(mine, stages=("sender",), env=env)
    from pipeline.worker import metrics_port
    ports = [metrics_port(mine, "sender", lane) for lane in ("critical", "bulk")]
    try:
        print(f"notify bench send: {count} tasks per round (half critical SMS via Twilio, half bulk email via "
              f"SendGrid), 2 sender workers (one per lane), provider concurrency {concurrency} per worker, "
              f"batch {mine.sender_max_in_flight}", flush=True)
        warm = [make_task() for _ in range(20)]
        seed(mine, warm)
        produce(mine, warm)
        wait_states(mine, [t["notification_id"] for t in warm], {"accepted"}, 120)
        for latency in latencies_ms:
            result = run_round(mine, sim, workers, latency, count, ports)
            print(f"\nprovider latency {latency:.0f} ms (+-{latency / 5:.0f}):")
            print(f"  accepted {result['accepted']}/{result['count']} in {result['elapsed_s']:.1f} s: "
                  f"{result['throughput']:.0f} notifications/s; simulator ledger {result['ledger']} messages")
            print("  peak sends in flight (both workers): " + (f"{result['peak_in_flight']:.0f}" if metrics.ENABLED
                                                                else "not measured (NOTIFY_METRICS=off)"))
            print(f"  worker CPU per notification: {result['cpu_ms_per_notification']:.2f} ms")
            for provider, text in result["provider"].items():
                print(f"  provider call {provider}: {text}")
            for lane, text in result["end_to_end"].items():
                print(f"  task created -> accepted, {lane}: {text}")
    finally:
        workers.stop()
        sim.stop()
        kafka.delete_prefixed(mine, groups=True)
    return 0
