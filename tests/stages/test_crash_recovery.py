"""Workers killed with SIGKILL mid-stream and restarted: no duplicate rows, no lost request; SIGTERM stops cleanly."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import TopicPartition
from support.harness import Pipeline, free_port_block, read_topic, start_pipeline

from pipeline.config import Settings
from pipeline.kafka import clients, serde, topics
from pipeline.state import db


@pytest.fixture(scope="module")
def pipeline(settings: Settings) -> Iterator[Pipeline]:
    yield from start_pipeline(settings, f"crash{uuid.uuid4().hex[:8]}.")


def _rows(pipeline: Pipeline, run: str) -> tuple[int, int, int]:
    """(notifications, deliveries, distinct notifications with a delivery) for this run's users."""
    with db.connect(pipeline.settings) as conn:
        row = conn.execute(
            """SELECT (SELECT count(*) FROM notifications WHERE user_id LIKE %(p)s),
                      (SELECT count(*) FROM deliveries d JOIN notifications n USING (notification_id)
                        WHERE n.user_id LIKE %(p)s),
                      (SELECT count(DISTINCT d.notification_id) FROM deliveries d
                        JOIN notifications n USING (notification_id) WHERE n.user_id LIKE %(p)s)""",
            {"p": f"{run}-%"}).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


@pytest.mark.parametrize("stages", [("intake",), ("intake", "routing")])
def test_sigkilled_workers_restart_with_no_duplicate_rows_and_no_lost_request(
        pipeline: Pipeline, stages: tuple[str, ...]) -> None:
    run = f"kill-{uuid.uuid4().hex[:8]}"
    requests = [pipeline.request(f"{run}-{i}", "otp") for i in range(300)]
    pipeline.produce(*requests[:100])
    time.sleep(0.3)  # mid-batch: some of the first hundred are done, some are not
    for stage in stages:
        os.kill(pipeline.worker_pid(stage, "critical"), signal.SIGKILL)
    pipeline.produce(*requests[100:200])
    time.sleep(1.0)
    pipeline.produce(*requests[200:])
    pipeline.wait_for(lambda: _rows(pipeline, run)[1] >= len(requests), timeout_s=120,
                      what="a delivery row for every request")
    time.sleep(2.0)  # anything redelivered late would show up now
    assert _rows(pipeline, run) == (300, 300, 300)
    for request in requests:
        statuses = pipeline.statuses(request["notification_id"])
        assert "duplicate" not in statuses, "a redelivered record is re-driven, not called a duplicate"
        assert "queued" in statuses


def test_sigterm_stops_a_worker_in_bounded_time_with_everything_it_finished_committed(
        applied: Settings, unique: str) -> None:
    producer = clients.producer(applied)
    codec = serde.AvroSerde()
    now = datetime.datetime.now(datetime.UTC)
    topic = applied.topic(topics.requests_topic("critical"))
    for i in range(50):
        request: dict[str, object] = {
                   "notification_id": str(uuid.uuid4()), "idempotency_key": f"k{i}", "user_id": f"term-{unique}-{i}",
                   "type": "otp", "channels": ["sms"], "recipient": {"phone": "+2348012345678"},
                   "template_id": "otp", "created_at": now, "expires_at": now + datetime.timedelta(minutes=5),
                   "source_service": "test"}
        producer.produce(topic, key=f"term-{unique}-{i}".encode(),
                         value=codec.encode(serde.NOTIFICATION_REQUEST, request))
    assert producer.flush(10) == 0
    env = {**os.environ, "NOTIFY_TOPIC_PREFIX": applied.topic_prefix, "NOTIFY_METRICS_PORT": str(free_port_block())}
    worker = subprocess.Popen([sys.executable, "-m", "pipeline", "worker", "--stage", "intake", "--lane", "critical"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    group = f"{applied.topic_prefix}notify-intake-critical"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(read_topic(applied, topics.accepted_topic("critical"), 1)) < 50:
            pass
        worker.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert worker.wait(30) == 0
        assert time.monotonic() - started < 16  # the grace period bounds it
    finally:
        if worker.poll() is None:
            worker.kill()
    consumer = clients.consumer(applied, group)
    partitions = [TopicPartition(topic, p) for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions]
    committed = sum(tp.offset for tp in consumer.committed(partitions, timeout=10) if tp.offset >= 0)
    consumer.close()
    assert committed == 50  # every record it finished is committed: a restart redoes nothing
