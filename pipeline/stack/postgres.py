"""PostgreSQL from Debian's packages: the project's own cluster under the stack folder, on loopback."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psycopg

from pipeline.config import LOCAL_DB_PASSWORD, LOCAL_DB_USER, Settings
from pipeline.errors import StackError
from pipeline.stack.common import OwnedProcess, ensure_debian_packages, find_binary, tail_text
from pipeline.stack.service import LocalService
from pipeline.state import db

# PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user Debian's package makes.
RUN_AS = "postgres"


def _ready(dsn: str, timeout_s: float) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=max(1, int(timeout_s))) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


class PostgresService(LocalService):
    name = "postgres"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.data_dir = self.home / "data"
        self.socket_dir = self.home / "run"

    @property
    def external(self) -> bool:
        return self.settings.postgres_external

    @property
    def address(self) -> str:
        return db.describe(self.settings)  # never the password

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.settings.postgres_port,)

    @property
    def log_path(self) -> Path:
        return self.home / "postgres.log"

    def _admin_dsn(self) -> str:
        return (f"postgresql://{LOCAL_DB_USER}:{LOCAL_DB_PASSWORD}@127.0.0.1:{self.settings.postgres_port}"
                "/postgres")

    def ready(self, timeout_s: float = 3.0) -> bool:
        return db.ready(self.settings, timeout_s)

    def install(self) -> None:
        ensure_debian_packages({"pg_ctl": "postgresql", "initdb": "postgresql"})

    def _as_owner(self, *command: str) -> subprocess.CompletedProcess[str]:
        argv = list(command)
        if os.geteuid() == 0:
            argv = ["runuser", "-u", RUN_AS, "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, check=False)

    def _prepare_root_ownership(self) -> None:
        if os.geteuid() != 0:
            return
        subprocess.run(["chown", "-R", f"{RUN_AS}:", str(self.home)], check=True)
        probe = self._as_owner("test", "-w", str(self.home))
        if probe.returncode != 0:
            raise StackError(
                f"the {RUN_AS} user cannot reach {self.home} (a parent folder is not traversable); "
                "set NOTIFY_STACK_DIR to a folder it can reach, e.g. under /var/tmp"
            )

    def start(self) -> OwnedProcess:
        pg_ctl, initdb = find_binary("pg_ctl"), find_binary("initdb")
        if pg_ctl is None or initdb is None:
            raise StackError("PostgreSQL binaries not found after install")
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_root_ownership()
        if not (self.data_dir / "PG_VERSION").exists():
            password_file = self.home / "initdb.pw"
            password_file.write_text(LOCAL_DB_PASSWORD + "\n")
            self._prepare_root_ownership()
            done = self._as_owner(
                initdb, "-D", str(self.data_dir), "-U", LOCAL_DB_USER, f"--pwfile={password_file}",
                "--auth-host=scram-sha-256", "--auth-local=peer", "-E", "UTF8", "--no-locale",
            )
            password_file.unlink(missing_ok=True)
            if done.returncode != 0:
                raise StackError(f"initdb failed:\n{tail_text(done.stdout + done.stderr)}")
        options = (f"-c listen_addresses=127.0.0.1 -p {self.settings.postgres_port} -k {self.socket_dir} "
                   "-c max_connections=200 -c shared_buffers=128MB")
        done = self._as_owner(pg_ctl, "-D", str(self.data_dir), "-l", str(self.log_path), "-o", options, "-W",
                              "start")
        if done.returncode != 0:
            raise StackError(f"pg_ctl start failed:\n{tail_text(done.stdout + done.stderr)}")
        # A postmaster.pid left by a crash names a process that is gone (or, pid reused, someone else) until the
        # new postmaster replaces it: wait for one naming a live postgres, or `up` would fail while the server it
        # started runs on unrecorded (and the next `up` finds its port "taken by a process this stack did not
        # start").
        deadline = time.monotonic() + 15.0
        while (owned := self._postmaster()) is None:
            if time.monotonic() > deadline:
                raise StackError(f"PostgreSQL did not start (no live postmaster in "
                                 f"{self.data_dir / 'postmaster.pid'}):\n{self.failure_log()}")
            time.sleep(0.1)
        return owned

    def _postmaster(self) -> OwnedProcess | None:
        """The live postgres process postmaster.pid names, if any."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
            command = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError, IndexError):
            return None
        return OwnedProcess.of(pid) if command.startswith("postgres") else None

    def after_ready(self) -> None:
        if self.external:
            return
        with psycopg.connect(self._admin_dsn(), autocommit=True, connect_timeout=5) as conn:
            name = self.settings.postgres_db
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{name}"')  # parse.database_name checked it

    def ready_for_setup(self, timeout_s: float) -> bool:
        """The server answers (before our database exists)."""
        return _ready(self._admin_dsn(), timeout_s)

    def stop_process(self, process: OwnedProcess) -> None:
        pg_ctl = find_binary("pg_ctl")
        if pg_ctl is not None:
            self._as_owner(pg_ctl, "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "30", "stop")
        process.terminate()
