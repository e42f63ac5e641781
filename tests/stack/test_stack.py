"""`notify stack up | down | status` against the real services, through the real CLI (`python -m pipeline`)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import stack
from pipeline.config import Settings
from pipeline.stack.common import OwnedProcess, wait_until
from pipeline.state import db

REPO = Path(__file__).resolve().parents[2]


def notify(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, with `env` added to a clean copy of this environment (the suite's database
    name kept: it is the one the session's stack serves)."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("NOTIFY_") and k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "REDIS_URL")}
    base["NOTIFY_POSTGRES_DB"] = os.environ["NOTIFY_POSTGRES_DB"]
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env={**base, **(env or {})}, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def owned_pids(settings: Settings) -> dict[str, int]:
    pids = {}
    for service in stack.services(settings):
        process = service.owned()
        assert process is not None, f"{service.name} is not running under the stack"
        pids[service.name] = process.pid
    return pids


def external_env(settings: Settings) -> dict[str, str]:
    return {"KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers, "DATABASE_URL": settings.dsn,
            "REDIS_URL": settings.redis_dsn, "PROMETHEUS_URL": f"http://127.0.0.1:{settings.prometheus_port}"}


@pytest.fixture
def other_stack_dir(tmp_path: Path) -> Iterator[Path]:
    """A second stack folder; whatever a test starts there is stopped afterwards."""
    yield tmp_path
    for owned in tmp_path.glob("*/owned.json"):
        process = OwnedProcess.load(owned)
        if process is not None:
            process.terminate(10)


def test_a_second_up_starts_nothing_and_changes_nothing(settings: Settings) -> None:
    before = owned_pids(settings)
    done = notify("stack", "up")
    assert done.returncode == 0, done.stderr
    for name, pid in before.items():
        assert f"already running (pid {pid}), ready" in done.stdout, done.stdout
        assert name in done.stdout
    assert "migrations: nothing to do" in done.stdout
    assert "topics: nothing to do" in done.stdout
    assert owned_pids(settings) == before


def test_status_shows_each_service_its_address_and_health(settings: Settings) -> None:
    done = notify("stack", "status")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["kafka", "postgres", "redis", "prometheus", "api", "workers",
                                                   "exporter"]
    assert all(line.split()[1] == "local" and line.endswith("ready") for line in lines[:4]), done.stdout
    # the pipeline's processes, from their /health/ready at the ports `notify run` gives them (none run here)
    assert all(line.split()[1] == "pipeline" and line.endswith("not running") for line in lines[4:]), done.stdout
    assert f"127.0.0.1:{settings.kafka_port}" in lines[0]
    assert f"127.0.0.1:{settings.postgres_port}" in lines[1]
    assert f"127.0.0.1:{settings.redis_port}" in lines[2]


def test_services_given_by_environment_are_used_and_never_started_or_stopped(
        settings: Settings, other_stack_dir: Path) -> None:
    env = {**external_env(settings), "NOTIFY_STACK_DIR": str(other_stack_dir)}
    up = notify("stack", "up", env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert [line.split()[1] for line in up.stdout.splitlines()[:4]] == ["external"] * 4, up.stdout
    assert up.stdout.count("external, ready") == 4
    assert not list(other_stack_dir.glob("*/owned.json")), "nothing may be started for external services"
    assert "password" not in up.stdout and ":notify@" not in up.stdout, "addresses are shown without passwords"

    down = notify("stack", "down", env=env)
    assert down.returncode == 0
    assert down.stdout.count("external: left alone") == 4
    assert stack.all_ready(settings), "the services given by the environment must still run"


def test_down_stops_only_what_up_started(settings: Settings, other_stack_dir: Path) -> None:
    # Kafka and PostgreSQL are given; Redis is started here, on a port of its own
    port = free_port()
    env = {"KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers, "DATABASE_URL": settings.dsn,
           "NOTIFY_STACK_DIR": str(other_stack_dir), "NOTIFY_REDIS_PORT": str(port)}
    up = notify("stack", "up", env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    redis_line = next(line for line in up.stdout.splitlines() if line.startswith("redis"))
    assert "local" in redis_line and "started (pid" in redis_line
    started = OwnedProcess.load(other_stack_dir / "redis" / "owned.json")
    assert started is not None and started.alive()
    assert (other_stack_dir / "redis" / "redis.log").exists(), "logs go to files under the stack folder"

    down = notify("stack", "down", env=env)
    assert down.returncode == 0
    assert f"stopped (pid {started.pid})" in down.stdout
    assert down.stdout.count("external: left alone") == 2
    assert not started.alive()
    assert stack.all_ready(settings)

    status = notify("stack", "status", env=env)
    assert status.returncode == 1, "status fails while a service is down"
    assert "not running" in status.stdout


def test_a_port_taken_by_a_stranger_is_refused_with_a_clear_message(
        settings: Settings, other_stack_dir: Path) -> None:
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        env = {"KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers, "DATABASE_URL": settings.dsn,
               "NOTIFY_STACK_DIR": str(other_stack_dir), "NOTIFY_REDIS_PORT": str(port)}
        up = notify("stack", "up", env=env)
    assert up.returncode == 1
    assert f"127.0.0.1:{port} is taken by a process this stack did not start" in up.stderr


def test_an_external_service_that_does_not_answer_fails_up(settings: Settings, other_stack_dir: Path) -> None:
    env = {**external_env(settings), "NOTIFY_STACK_DIR": str(other_stack_dir),
           "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "NOTIFY_READY_TIMEOUT_S": "2"}
    up = notify("stack", "up", env=env)
    assert up.returncode == 1
    assert "redis at redis://127.0.0.1:" in up.stderr and "does not answer" in up.stderr


def test_a_service_that_fails_to_start_prints_the_tail_of_its_log(settings: Settings, other_stack_dir: Path) -> None:
    # a heap the JVM refuses: the broker exits at once, and `up` shows why
    env = {"DATABASE_URL": settings.dsn, "REDIS_URL": settings.redis_dsn, "NOTIFY_STACK_DIR": str(other_stack_dir),
           "NOTIFY_KAFKA_PORT": str(free_port()), "NOTIFY_KAFKA_CONTROLLER_PORT": str(free_port()),
           "NOTIFY_KAFKA_HEAP": "1m", "NOTIFY_READY_TIMEOUT_S": "30"}
    up = notify("stack", "up", env=env)
    assert up.returncode == 1
    assert "kafka exited" in up.stderr.lower(), up.stderr
    assert "heap" in up.stderr.lower(), "the tail of the broker's output says why"


def test_kafka_cli_tools_run_from_the_stack_jars(settings: Settings) -> None:
    topics = notify("kafka", "topics", "--list", env={})
    assert topics.returncode == 0, topics.stderr
    assert "requests.critical" in topics.stdout.split()
    groups = notify("kafka", "consumer-groups", "--list", env={})
    assert groups.returncode == 0, groups.stderr


def test_unknown_or_malformed_settings_fail_with_a_message_naming_them() -> None:
    typo = notify("config", env={"NOTIFY_KAFKA_PROT": "1"})
    assert typo.returncode == 1
    assert "unknown setting(s) NOTIFY_KAFKA_PROT" in typo.stderr
    bad = notify("config", env={"NOTIFY_REDIS_PORT": "70000"})
    assert bad.returncode == 1
    assert "NOTIFY_REDIS_PORT='70000' is malformed" in bad.stderr


def test_the_suite_runs_on_a_database_of_its_own_and_a_bad_database_name_is_refused(settings: Settings) -> None:
    assert settings.postgres_db == "notify_test"
    assert settings.dsn.endswith(f":{settings.postgres_port}/notify_test")
    with db.connect(settings) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("notify_test",)
    for bad in ("Notify", "notify-test", "1notify", "x" * 64, 'a"; DROP DATABASE notify; --'):
        refused = notify("config", env={"NOTIFY_POSTGRES_DB": bad})
        assert refused.returncode == 1
        assert "NOTIFY_POSTGRES_DB=" in refused.stderr and "is malformed" in refused.stderr


def test_owned_process_records_survive_a_round_trip(tmp_path: Path) -> None:
    me = OwnedProcess.of(os.getpid())
    assert me is not None and me.alive()
    me.save(tmp_path / "owned.json")
    assert OwnedProcess.load(tmp_path / "owned.json") == me
    assert json.loads((tmp_path / "owned.json").read_text())["pid"] == os.getpid()
    # a recycled pid (same number, other start time) is not ours
    assert not OwnedProcess(me.pid, me.start_time + 1).alive()


@pytest.fixture
def traversable_stack_dir() -> Iterator[Path]:
    """A stack folder the postgres user can reach (pytest's tmp_path is private to root)."""
    home = Path(tempfile.mkdtemp(prefix="notify-stack-", dir="/var/tmp"))
    home.chmod(0o755)
    try:
        yield home
    finally:
        for owned in home.glob("*/owned.json"):
            if (process := OwnedProcess.load(owned)) is not None:
                process.terminate(10)
        shutil.rmtree(home, ignore_errors=True)


def test_postgresql_killed_by_a_crash_starts_again_over_its_stale_pid_file_and_is_recorded(
        settings: Settings, traversable_stack_dir: Path) -> None:
    from pipeline.stack.postgres import PostgresService

    own = PostgresService(dataclasses.replace(settings, database_url=None, postgres_port=free_port(),
                                              stack_dir=traversable_stack_dir))
    assert own.launch().startswith("started")
    first = own.owned()
    assert first is not None and wait_until(lambda: own.ready_for_setup(1.0), 60)
    # What a crash leaves: the lock file of a server that is gone. (A SIGKILLed postmaster would stay a zombie
    # here, where nothing reaps orphans, and PostgreSQL would take it for alive; after a real crash or reboot
    # the pid names nobody.)
    lock = (own.data_dir / "postmaster.pid").read_text().splitlines()
    own.down()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (own.data_dir / "postmaster.pid").write_text("\n".join([str(gone.pid), *lock[1:]]) + "\n")
    assert OwnedProcess.of(gone.pid) is None
    again = own.launch()  # before the fix: "PostgreSQL exited at once" while the server it started ran on
    second = own.owned()
    assert second is not None and again == f"started (pid {second.pid})", again
    assert second.pid != first.pid and wait_until(lambda: own.ready_for_setup(1.0), 60)
    own.down()
    assert own.owned() is None and not own.ready_for_setup(1.0)

