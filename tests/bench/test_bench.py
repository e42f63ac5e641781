"""`notify bench` end to end at a small size: every phase and the baseline complete, every notification reaches the
provider once, the report is written, and the run leaves nothing behind (no database, topic, consumer group or Redis
key of its own, no row in the pipeline's own tables). It measures nothing: benchmarks print figures, tests don't
time them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import redis

from pipeline.config import REPO_ROOT, Settings
from pipeline.kafka import clients
from pipeline.state import db

REQUESTS = 300


def test_a_small_bench_run_completes_every_phase_exactly_once_and_leaves_nothing_behind(
        settings: Settings, tmp_path: Path) -> None:
    report = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "bench", "--requests", str(REQUESTS), "--api-share", "0.2",
         "--idle-otps", "3", "--backlog", "200", "--otps", "5", "--baseline", "--report", str(report)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-8000:]
    token = next(line.split()[2].rstrip(":") for line in done.stdout.splitlines() if line.startswith("notify bench "))

    results = json.loads((report / "results.json").read_text())
    assert results["phases"]["burst"]["accepted"] == REQUESTS
    assert results["phases"]["burst"]["states"] == {"delivered": REQUESTS}
    assert results["phases"]["backlog"]["states"] == {"delivered": 200}
    assert results["baseline"]["accepted"] == REQUESTS
    ledger = results["ledger"]
    assert ledger["count"] == ledger["distinct"] == REQUESTS + 3 + 200 + 5 + 2  # and the two readiness probes
    assert ledger["repeated_count"] == 0
    assert all((report / name).stat().st_size > 0 for name in ("report.md", "throughput.png", "latency_cdf.png",
                                                                "cpu.png"))
    text = (report / "report.md").read_text()
    assert "ratio pipeline / baseline" in text and "CPU per notification" in text

    with db.connect(settings, autocommit=True) as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'notify_bench_%'").fetchall()
        rows = conn.execute("SELECT count(*) FROM notifications WHERE user_id LIKE %s", (f"%.{token}",)).fetchone()
    assert left == [] and rows == (0,)
    admin = clients.admin(settings)
    assert [t for t in admin.list_topics(timeout=10).topics if token in t] == []
    groups = admin.list_consumer_groups(request_timeout=10).result(timeout=30).valid
    assert [g.group_id for g in groups if token in g.group_id] == []
    client = redis.Redis.from_url(settings.redis_dsn)
    try:
        assert list(client.scan_iter(match=f"*{token}*", count=10_000)) == []
    finally:
        client.close()
