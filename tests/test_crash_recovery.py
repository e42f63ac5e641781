"""Workers killed with SIGKILL mid-stream and restarted by the supervisor: no duplicate rows, no lost request."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator

import pytest
from harness import Pipeline, start_pipeline

from pipeline import db
from pipeline.config import Settings


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
