"""Health of a pipeline process: `/health/live` (the process answers) and `/health/ready` (it reaches Kafka,
PostgreSQL and Redis), served with `/metrics` by every worker, the lag exporter and the API.

Readiness asks each dependency with its own protocol (Kafka metadata, `SELECT 1`, `PING`), each bounded by a short
timeout, and keeps the answer for a moment so a busy scraper or health checker cannot turn into load on them.
`notify run`, `notify stack status` and docker-compose.kafka.yml's health checks read these endpoints.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis
from confluent_kafka.admin import AdminClient
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline.config import Settings
from pipeline.kafka import clients
from pipeline.state import db

CHECK_TIMEOUT_S = 2.0
CACHE_S = 1.0
# Stages of this process that are retrying a batch after an infrastructure error: stage/lane -> the error. While
# one is, the process is not ready, even if every dependency answers a probe (a database can answer SELECT 1 and
# still fail the stage's writes).
STALLED: dict[str, str] = {}


def check_redis(dsn: str, timeout_s: float) -> None:
    """Return when Redis answers PING within timeout_s; raise saying why not."""
    client = redis.Redis.from_url(dsn, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        client.ping()
    finally:
        client.close()


class Readiness:
    """Whether this process can reach its dependencies: {"kafka": "ok" | error, ...}, cached for CACHE_S."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._admin: AdminClient | None = None
        self._checked_at = -CACHE_S
        self._last: dict[str, str] = {}

    def _kafka(self) -> None:
        if self._admin is None:  # one client for the process's life: a check is then one metadata request
            self._admin = clients.admin(self.settings,
                                      **{"socket.connection.setup.timeout.ms": int(CHECK_TIMEOUT_S * 1000)})
        clients.check_cluster(self.settings, CHECK_TIMEOUT_S, self._admin)

    def _postgres(self) -> None:
        db.check(self.settings, CHECK_TIMEOUT_S)

    def _redis(self) -> None:
        check_redis(self.settings.redis_dsn, CHECK_TIMEOUT_S)

    def check(self) -> dict[str, str]:
        with self._lock:  # one probe at a time; concurrent callers share its answer
            if time.monotonic() - self._checked_at >= CACHE_S:
                self._probe()
            result = dict(self._last)
        stalled = dict(STALLED)
        if stalled:
            result["stage"] = "; ".join(f"{name} retrying: {error}" for name, error in sorted(stalled.items()))
        return result

    def _probe(self) -> None:
        checks: Mapping[str, Callable[[], None]] = {
            "kafka": self._kafka, "postgres": self._postgres, "redis": self._redis}
        result = {}
        for name, probe in checks.items():
            try:
                probe()
                result[name] = "ok"
            except Exception as exc:  # any failure means "not ready", with the reason shown
                result[name] = f"{type(exc).__name__}: {exc}".strip()[:300]
        self._last, self._checked_at = result, time.monotonic()

    def report(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) for /health/ready: 200 when every dependency answers, else 503 naming which not."""
        checks = self.check()
        ready = all(value == "ok" for value in checks.values())
        return (200 if ready else 503), {"status": "ready" if ready else "not ready", "checks": checks}


LIVE_BODY: dict[str, Any] = {"status": "ok"}


def serve(port: int, readiness: Readiness, *, name: str) -> ThreadingHTTPServer:
    """Serve /metrics, /health/live and /health/ready on 127.0.0.1:port from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif path == "/health/live":
                self._json(200, {**LIVE_BODY, "process": name})
            elif path == "/health/ready":
                status, body = readiness.report()
                self._json(status, {**body, "process": name})
            else:
                self._json(404, {"error": f"no route {path}; try /metrics, /health/live, /health/ready"})

        def _json(self, status: int, body: Mapping[str, Any]) -> None:
            self._send(status, json.dumps(body).encode(), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:  # scrapes every few seconds would flood the log
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"http-{name}", daemon=True).start()
    return server


def probe(url: str, timeout_s: float = 3.0) -> tuple[int | None, dict[str, Any]]:
    """GET a health endpoint: (status, body); (None, {"error": ...}) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError) as exc:
        return None, {"error": str(exc)}
