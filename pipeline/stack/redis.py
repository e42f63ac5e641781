"""Redis from Debian's packages: the project's own instance, data and log under the stack folder."""

from __future__ import annotations

import subprocess
from pathlib import Path

import redis

from pipeline.errors import StackError
from pipeline.process.health import check_redis
from pipeline.stack.common import OwnedProcess, ensure_debian_packages, find_binary, tail_text, wait_until
from pipeline.stack.service import LocalService


class RedisService(LocalService):
    name = "redis"

    @property
    def external(self) -> bool:
        return self.settings.redis_external

    @property
    def address(self) -> str:
        return self.settings.redis_dsn

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.settings.redis_port,)

    @property
    def log_path(self) -> Path:
        return self.home / "redis.log"

    def ready(self, timeout_s: float = 3.0) -> bool:
        try:
            check_redis(self.settings.redis_dsn, timeout_s)
        except redis.RedisError:
            return False
        return True

    def install(self) -> None:
        ensure_debian_packages({"redis-server": "redis-server"})

    def start(self) -> OwnedProcess:
        binary = find_binary("redis-server")
        if binary is None:
            raise StackError("redis-server not found after install")
        pid_file = self.home / "redis.pid"
        pid_file.unlink(missing_ok=True)
        done = subprocess.run(
            [binary, "--bind", "127.0.0.1", "--port", str(self.settings.redis_port), "--protected-mode", "yes",
             "--dir", str(self.home), "--daemonize", "yes", "--pidfile", str(pid_file),
             "--logfile", str(self.log_path), "--save", "60 1000", "--appendonly", "no"],
            capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise StackError(f"redis-server failed to start:\n{tail_text(done.stdout + done.stderr)}")
        if not wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() != "", 10.0):
            raise StackError(f"redis-server wrote no pid file:\n{self.failure_log()}")
        owned = OwnedProcess.of(int(pid_file.read_text().strip()))
        if owned is None:
            raise StackError(f"redis-server exited at once:\n{self.failure_log()}")
        return owned
