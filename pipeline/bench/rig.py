"""What every benchmark run stands on: free ports, the workers as a real process tree, a database of its own, the
API as a process, latency percentiles.

A benchmark never touches the pipeline's own state: its topics carry a prefix of their own and its rows live in a
database of its own (`BenchDatabase`), created and migrated for the run and dropped at the end, so nothing the live
pipeline sweeps (the reconciler, the holds releaser) can ever see a benchmark's deliveries.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from psycopg import sql
from psycopg.conninfo import make_conninfo

from pipeline.config import REPO_ROOT, Settings
from pipeline.errors import NotifyError
from pipeline.process import health
from pipeline.state import db, migrate

STOP_TIMEOUT_S = 30.0  # SIGTERM, then SIGKILL
BENCH_DB_PREFIX = "notify_bench_"


class BenchError(NotifyError):
    """The benchmark could not run (bad arguments, processes that never became ready)."""


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a process's log, indented, for an error that says why a run stopped."""
    try:
        text = path.read_bytes()[-20_000:].decode("utf-8", "replace")
    except OSError as exc:
        return f"    ({path}: {exc.strerror})"
    return "\n".join(f"    {line}" for line in text.splitlines()[-lines:]) or f"    ({path} is empty)"


# ------------------------------------------------------------------------------------------------ the workers


_handed_out: set[int] = set()  # ports this process gave out: free when checked, maybe not bound yet


def free_port_block(size: int = 1 + 2 * 7) -> int:  # the API, then every (stage, lane) of the worker
    """A base port such that it and the `size` ports above it are free now (loopback, for one run).

    Every port of the block is checked (workers bind base+1.., and a simulator or another run's block may sit
    just above a free base), and blocks are drawn below Linux's ephemeral range (32768 and up by default), where
    the kernel would otherwise hand our ports to outgoing connections between this check and the bind.
    """
    if len(_handed_out) > 6_000:  # a long test session: the oldest blocks are bound (or gone) by now
        _handed_out.clear()
    while True:
        base = random.randrange(20_000, 32_000 - size)
        block = range(base, base + size + 1)
        if _handed_out.isdisjoint(block) and all(_port_free(port) for port in block):
            _handed_out.update(block)
            return base


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on; the command name may hold spaces and parentheses."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


@dataclass
class Workers:
    """`python -m pipeline worker --all` in a session of its own, its output in a log file."""

    process: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    @classmethod
    def start(cls, settings: Settings, stages: Sequence[str] = ("intake", "preferences", "routing"),
              env: Mapping[str, str] | None = None, exporter: bool = False, replicas: str | None = None) -> Workers:
        env = {**os.environ, "NOTIFY_TOPIC_PREFIX": settings.topic_prefix,
               "NOTIFY_METRICS_PORT": str(settings.metrics_port), **(env or {})}
        log_path = settings.stack_dir / f"bench-{settings.topic_prefix.strip('.')}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("wb")
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "worker", "--all", "--stages",
                                    ",".join(stages), "--exporter" if exporter else "--no-exporter",
                                    *(["--replicas", replicas] if replicas else [])],
                                   env=env, cwd=REPO_ROOT,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return cls(process, log_path, log)

    def alive(self) -> bool:
        return self.process.poll() is None

    def pids(self) -> list[int]:
        """The stage workers: children of the supervisor."""
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                ppid = int(_stat_fields(int(proc.name))[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.process.pid:
                found.append(int(proc.name))
        return sorted(found)

    def cpu_seconds(self) -> dict[int, float]:
        """utime + stime of each stage worker, in seconds."""
        ticks = os.sysconf("SC_CLK_TCK")
        seconds = {}
        for pid in self.pids():
            try:
                fields = _stat_fields(pid)
                seconds[pid] = (int(fields[11]) + int(fields[12])) / ticks  # fields 14 and 15 of stat(5)
            except (OSError, ValueError, IndexError):
                continue
        return seconds

    def stop(self) -> None:
        try:
            stop_group(self.process)
        finally:
            self.log.close()




# ------------------------------------------------------------------------------------------------ the database


# A live database is not empty: it holds the history of earlier notifications, and its statistics say so. A run's
# fresh database would otherwise be planned as the empty tables it starts as (hash joins over sequential scans of
# `notifications` and `deliveries` for every batch, kept until autovacuum's first analyze a minute later), which is
# neither what production runs nor repeatable from run to run. VACUUM, not only ANALYZE, of every table the history
# wrote (its transitions too), and a checkpoint: the history's hint bits, visibility map, autovacuum's insert
# thresholds and dirty pages are settled before the run, not during its burst.
HISTORY = """
INSERT INTO notifications (notification_id, user_id, notification_type, idempotency_key, lane, source_service,
                           requested_channels, created_at, expires_at)
SELECT md5('history' || i)::uuid, 'history-' || (i %% 20000), (ARRAY['transaction', 'portfolio'])[1 + i %% 2],
       md5('key' || i), (ARRAY['critical', 'bulk'])[1 + i %% 2], 'history', ARRAY['sms'],
       now() - make_interval(secs => i), now() - make_interval(secs => i) + interval '1 hour'
FROM generate_series(1, %(rows)s) AS i;
INSERT INTO deliveries (notification_id, channel, state, provider, provider_message_id, attempt_count, accepted_at,
                        final_at)
SELECT md5('history' || i)::uuid, 'sms', 'delivered', 'twilio', 'SMhistory' || i, 1,
       now() - make_interval(secs => i), now() - make_interval(secs => i)
FROM generate_series(1, %(rows)s) AS i;
VACUUM (ANALYZE) notifications;
VACUUM (ANALYZE) deliveries;
VACUUM (ANALYZE) delivery_transitions;
CHECKPOINT;
"""
HISTORY_ROWS = 100_000


class BenchDatabase:
    """A database of the run's own on the configured server: created, migrated and given `history` delivered
    notifications (analyzed, as a live database would be) on enter, dropped on exit.

    Databases of earlier runs that ended without cleaning up (a killed benchmark) are dropped first, unless a
    process is still connected to them (a run in progress elsewhere)."""

    def __init__(self, settings: Settings, token: str, *, drop_stale: bool = True,
                 history: int = HISTORY_ROWS) -> None:
        self.settings = settings
        self.drop_stale = drop_stale
        self.history = history
        self.name = f"{BENCH_DB_PREFIX}{token}"
        self.bench_settings = dataclasses.replace(settings, database_url=make_conninfo(settings.dsn, dbname=self.name))

    def __enter__(self) -> Settings:
        with db.connect(self.settings, autocommit=True) as conn:
            stale = [row[0] for row in conn.execute(
                "SELECT datname FROM pg_database d WHERE datname LIKE %s AND NOT EXISTS "
                "(SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname)", (BENCH_DB_PREFIX + "%",))]
            for name in stale if self.drop_stale else []:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
        migrate.migrate(self.bench_settings)
        if self.history:
            with db.connect(self.bench_settings, autocommit=True) as conn:
                for statement in HISTORY.split(";"):
                    if statement.strip():
                        conn.execute(statement, {"rows": self.history})
        return self.bench_settings

    def __exit__(self, *_exc: object) -> None:
        db.close_pools()
        with db.connect(self.settings, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name)))


# ------------------------------------------------------------------------------------------------ the API


@dataclass
class ApiProcess:
    """`notify api` on a port of the run's own."""

    process: subprocess.Popen[bytes]
    port: int
    log: IO[bytes]
    log_path: Path

    @classmethod
    def start(cls, settings: Settings, port: int, env: Mapping[str, str], log_path: Path) -> ApiProcess:
        log = log_path.open("wb")
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "api", "--port", str(port)],
                                   env={**os.environ, **env}, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        api = cls(process, port, log, log_path)
        deadline = time.monotonic() + 60
        while health.probe(f"http://127.0.0.1:{port}/health/ready", 2)[0] != 200:
            if time.monotonic() > deadline or process.poll() is not None:
                api.stop()
                raise BenchError(f"the API did not become ready; see {log_path}")
            time.sleep(0.2)
        return api

    def stop(self) -> None:
        stop_group(self.process)
        self.log.close()


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process's session; SIGKILL if it is not gone after STOP_TIMEOUT_S."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT_S)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------------------ figures


@dataclass(frozen=True)
class Spread:
    """Latency percentiles of a sample, in milliseconds (nearest rank)."""

    n: int
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread | None:
        ordered = sorted(values)
        if not ordered:
            return None

        def rank(q: float) -> float:
            return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

        return cls(len(ordered), rank(0.50), rank(0.95), rank(0.99), ordered[-1])

    def row(self, label: str) -> str:
        return f"  {label:26} {self.n:>7} {self.p50:>9.0f} {self.p95:>9.0f} {self.p99:>9.0f} {self.max:>9.0f}"


