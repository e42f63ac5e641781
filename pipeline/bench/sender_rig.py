"""The sender on its own: a simulator process, queued deliveries seeded in PostgreSQL, tasks on send topics.

Used by the sender's end-to-end tests, and the simulator process by `notify bench`. Rows are seeded the way routing
leaves them (`notifications` row + `queued` delivery), and DeliveryTasks are produced to send.<channel>.<lane>, so
the sender alone is tested.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from connectors.simulator.admin import admin_call
from pipeline import config
from pipeline.bench.rig import free_port_block
from pipeline.config import REPO_ROOT, Settings
from pipeline.domain import lane_for
from pipeline.kafka import clients, serde, topics
from pipeline.state import db

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
    requested_channels, created_at, expires_at, collapse_key)
SELECT k.id, k.user_id, k.type, k.id::text, k.lane, 'bench-send', ARRAY[k.channel], k.created_at, k.expires_at,
    k.collapse_key
FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[],
            %s::text[])
    AS k(id, user_id, type, lane, channel, created_at, expires_at, collapse_key)
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
                [t["expires_at"] for t in chunk], [t.get("collapse_key") for t in chunk]))
            conn.execute(SEED_DELIVERIES, ([t["notification_id"] for t in chunk], [t["channel"] for t in chunk],
                                           ["queued"] * len(chunk),
                                           [codec.encode(serde.DELIVERY_TASK, t) for t in chunk]))


def produce(settings: Settings, tasks: Iterable[Mapping[str, Any]]) -> int:
    codec = serde.AvroSerde()
    producer = clients.producer(settings, **{"linger.ms": 20})
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
    log_path: Path

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
        sim = cls(process, port, env, log, log_path)
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

    def ledger_of(self, notification_id: str) -> list[dict[str, Any]]:
        return list(self.call("GET", f"/_admin/ledger?notification_id={notification_id}")["entries"])

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
