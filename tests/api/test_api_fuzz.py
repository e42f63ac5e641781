"""Schemathesis against the served OpenAPI document, as an outside tester runs it: the real API (in a thread of
this process) on the real broker and database, bounded in examples and time. No 5xx, no response that breaks the
document (status, content type, schema), and no 2xx for a body the document rejects."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.api import run_api
from pipeline.api.keys import create_key
from pipeline.bench.rig import free_port_block
from pipeline.config import Settings
from pipeline.state import db

MAX_EXAMPLES = 20
MAX_TIME_S = 150
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "negative_data_rejection")


@pytest.fixture
def served(applied: Settings) -> Iterator[str]:
    """The API on a port of its own, in a thread; its base URL. The settings rows the fuzzer wrote are removed."""
    port = free_port_block(1)
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(run_api(applied, port=port, stop=stop),),
                              daemon=True)
    started = datetime.datetime.now(datetime.UTC)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        with db.connect(applied) as conn, conn.transaction():
            conn.execute("DELETE FROM settings_outbox WHERE topic = %s AND created_at >= %s",
                         (applied.topic("user-settings"), started))
            conn.execute("DELETE FROM user_notification_settings WHERE updated_at >= %s AND user_id NOT IN "
                         "(SELECT user_id FROM settings_outbox)", (started,))


@pytest.fixture
def api_key(settings: Settings, unique: str) -> Iterator[str]:
    """A key with the ingest and read scopes, so the read API is fuzzed past its scope check."""
    _, key = create_key(settings, f"fuzz-{unique}", ["ingest", "read"])
    yield key
    with db.connect(settings) as conn, conn.transaction():
        conn.execute("DELETE FROM api_keys WHERE service = %s", (f"fuzz-{unique}",))


def test_schemathesis_finds_no_server_error_no_broken_response_and_no_accepted_invalid_body(
        served: str, api_key: str, tmp_path: Path) -> None:
    report = tmp_path / "schemathesis.json"
    command = [
        str(Path(sys.executable).parent / "schemathesis"), "run", f"{served}/openapi.json",
        "--checks", ",".join(CHECKS), "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(MAX_EXAMPLES), "--max-time", str(MAX_TIME_S), "--seed", "20261203",
        "--header", f"Authorization: Bearer {api_key}", "--request-timeout", "15", "--wait-for-schema", "30",
        "--report", "ndjson", "--report-ndjson-path", str(report), "--no-color",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=MAX_TIME_S + 120,
                          env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false"})
    summary = done.stdout[-6000:]
    print(summary)  # the summary is the figure the closing note reports
    assert done.returncode == 0, summary + done.stderr[-2000:]
    assert report.exists() and report.stat().st_size > 0
    events = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
    assert events, "schemathesis ran no case"
