"""The local stack: `notify stack up | down | status`.

Kafka (KRaft, from Maven Central jars), PostgreSQL and Redis (from Debian's packages), each the project's own
instance on loopback with data and logs under the stack folder. A service given through its environment variable
(KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL, REDIS_URL) is used as given: never started, never stopped.
`up` is idempotent: what runs and answers is left alone, so a second `up` is fast.
"""

from __future__ import annotations

import time
from functools import partial

from pipeline.config import Settings
from pipeline.errors import StackError
from pipeline.stack.common import wait_until
from pipeline.stack.kafka import KafkaService, tool_argv
from pipeline.stack.postgres import PostgresService
from pipeline.stack.redis import RedisService
from pipeline.stack.service import LocalService

__all__ = ["all_ready", "down", "kafka_tool_argv", "services", "status", "up"]


def services(settings: Settings) -> list[LocalService]:
    return [KafkaService(settings), PostgresService(settings), RedisService(settings)]


def _line(service: LocalService, state: str) -> str:
    mode = "external" if service.external else "local"
    return f"{service.name:9} {mode:9} {service.address:40} {state}"


def up(settings: Settings) -> int:
    """Start what is missing, wait until every service really answers, then apply migrations and topics."""
    settings.stack_dir.mkdir(parents=True, exist_ok=True)
    begun = time.monotonic()
    stack = services(settings)
    launched = {service.name: service.launch() for service in stack}  # all start at once, then we wait
    for service in stack:
        started = time.monotonic()
        owned = None if service.external else service.owned()
        ready = wait_until(partial(service.ready_for_setup, 2.0), settings.ready_timeout_s,
                           alive=None if owned is None else owned.alive)
        if ready:
            service.after_ready()
            ready = service.ready(5.0)
        if not ready:
            if service.external:
                raise StackError(f"{service.name} at {service.address} (given by the environment) does not answer")
            state = "exited" if owned is not None and not owned.alive() else "did not become ready"
            raise StackError(
                f"{service.name} {state} within {settings.ready_timeout_s}s; last lines of {service.log_path}:\n"
                f"{service.failure_log()}"
            )
        print(_line(service, f"{launched[service.name]}, ready ({time.monotonic() - started:.1f}s)"), flush=True)

    from pipeline import migrate, topics  # after the services: both need them running

    applied = migrate.migrate(settings)
    print(f"migrations: applied {', '.join(applied)}" if applied else "migrations: nothing to do")
    print(topics.apply(settings).render())
    print(f"stack up in {time.monotonic() - begun:.1f}s (stack folder {settings.stack_dir})", flush=True)
    return 0


def down(settings: Settings) -> int:
    """Stop only what `up` started; external services are left alone."""
    for service in reversed(services(settings)):
        print(_line(service, service.down()), flush=True)
    return 0


def status(settings: Settings) -> int:
    """Each service, its address and its health; exit status 0 only when all are healthy."""
    healthy = True
    for service in services(settings):
        shown, ok = service.health()
        healthy = healthy and ok
        print(_line(service, shown))
    return 0 if healthy else 1


def all_ready(settings: Settings) -> bool:
    return all(service.ready(2.0) for service in services(settings))


def kafka_tool_argv(settings: Settings, tool: str, args: list[str]) -> list[str]:
    return tool_argv(settings, tool, args)
