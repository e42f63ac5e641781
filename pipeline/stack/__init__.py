"""The local stack: `notify stack up | down | status`.

Kafka (KRaft, from Maven Central jars), PostgreSQL, Redis and Prometheus (from Debian's packages), each the
project's own instance on loopback with data and logs under the stack folder. Prometheus is optional: when it
cannot be installed or started, `up` says why and the rest of the stack comes up without it. A service given
through its environment variable (KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL, REDIS_URL, PROMETHEUS_URL) is used as
given: never started, never stopped.
`up` is idempotent: what runs and answers is left alone, so a second `up` is fast.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial

from pipeline.config import Settings
from pipeline.errors import StackError
from pipeline.process import health
from pipeline.stack.common import wait_until
from pipeline.stack.kafka import KafkaService, cluster_nodes, tool_argv
from pipeline.stack.postgres import PostgresService
from pipeline.stack.prometheus import PrometheusService
from pipeline.stack.redis import RedisService
from pipeline.stack.service import LocalService

__all__ = ["GroupHealth", "all_ready", "down", "kafka_tool_argv", "pipeline_health", "services", "status", "up"]


def services(settings: Settings) -> list[LocalService]:
    kafka_nodes: list[LocalService] = [KafkaService(settings, n.node_id) for n in cluster_nodes(settings)]
    return [*kafka_nodes, PostgresService(settings), RedisService(settings), PrometheusService(settings)]


def _check_one_kafka_layout(settings: Settings) -> None:
    """One broker or a cluster, not both: their first node shares the ports, and their data is apart."""
    if settings.kafka_external:
        return
    other = dataclasses.replace(settings, kafka_brokers=3 if settings.kafka_brokers == 1 else 1)
    running = [(s.name, p.pid) for s in services(other)[:other.kafka_brokers] if (p := s.owned()) is not None]
    if running:
        shown = ", ".join(f"{name} (pid {pid})" for name, pid in running)
        raise StackError(f"NOTIFY_KAFKA_BROKERS={settings.kafka_brokers}, but the stack runs the other Kafka layout: "
                         f"{shown}; stop it first with NOTIFY_KAFKA_BROKERS={other.kafka_brokers} notify stack down")


def _line(service: LocalService, state: str) -> str:
    mode = "external" if service.external else "local"
    return f"{service.name:10} {mode:9} {service.address:40} {state}"


def up(settings: Settings) -> int:
    """Start what is missing, wait until every service really answers, then apply migrations and topics."""
    settings.stack_dir.mkdir(parents=True, exist_ok=True)
    _check_one_kafka_layout(settings)
    begun = time.monotonic()
    stack = services(settings)
    launched: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for service in stack:  # all start at once, then we wait
        try:
            launched[service.name] = service.launch()
        except StackError as exc:
            if not service.optional:
                raise
            skipped[service.name] = str(exc)
    for service in stack:
        if service.name in skipped:
            print(_line(service, f"skipped (optional): {skipped[service.name]}"), flush=True)
            continue
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

    from pipeline.kafka import topics  # after the services: both need them running
    from pipeline.state import migrate

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
        healthy = healthy and (ok or service.optional)
        print(_line(service, shown))
    for group in pipeline_health(settings):
        print(f"{group.name:10} {'pipeline':9} {group.address:40} {group.shown()}")
    return 0 if healthy else 1


@dataclass(frozen=True)
class GroupHealth:
    """Health of one kind of pipeline process (api, workers, exporter), from their /health/ready."""

    name: str
    address: str
    total: int
    running: int
    ready: int

    @property
    def all_ready(self) -> bool:
        return self.ready == self.total

    def shown(self) -> str:
        if self.running == 0:
            return "not running"
        not_ready = self.running - self.ready
        return f"{self.ready}/{self.total} ready" + (f", {not_ready} NOT READY" if not_ready else "")


def pipeline_health(settings: Settings) -> list[GroupHealth]:
    """The API, the workers and the lag exporter at the ports `notify run` gives them. Informational: the stack is
    healthy whether or not the pipeline runs."""
    from pipeline.stack.prometheus import targets

    groups = []
    for job, entries in targets(settings).items():
        states = [health.probe(f"http://127.0.0.1:{port}/health/ready", timeout_s=2.0)[0] for port, _ in entries]
        address = f"http://127.0.0.1:{entries[0][0]}" + (f" (+{len(entries) - 1})" if len(entries) > 1 else "")
        groups.append(GroupHealth(job, address, len(entries), sum(1 for s in states if s is not None),
                                  sum(1 for s in states if s == 200)))
    return groups


def all_ready(settings: Settings) -> bool:
    return all(service.ready(2.0) for service in services(settings) if not service.optional)


def kafka_tool_argv(settings: Settings, tool: str, args: list[str]) -> list[str]:
    return tool_argv(settings, tool, args)
