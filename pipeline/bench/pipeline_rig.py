"""The whole pipeline of one `notify bench` run as processes (`Rig`): the simulator, the API and the workers on the
run's topics and database, when they are ready, and what the run leaves behind to remove (topics, consumer groups,
Redis keys)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis

from pipeline.bench import load
from pipeline.bench.load import KafkaLoad
from pipeline.bench.rig import ApiProcess, BenchError, Workers, log_tail
from pipeline.bench.sender_rig import SimulatorProcess
from pipeline.config import Settings
from pipeline.kafka import clients, serde

READY_TIMEOUT_S = 120.0


def say(text: str) -> None:
    print(text, flush=True)



@dataclass
class Rig:
    """The pipeline as processes, on the run's topics and database, and what talks to them."""

    settings: Settings  # the run's: topic prefix, ports, its database
    token: str
    simulator: SimulatorProcess
    api: ApiProcess | None
    workers: Workers | None
    api_key: str
    env: dict[str, str]
    codec: serde.AvroSerde = field(default_factory=serde.AvroSerde)

    def accepted(self) -> int:
        """Messages the simulator accepted so far (every provider)."""
        stats = self.simulator.stats()
        return sum(counts.get("accepted", 0) for name, counts in stats.items() if name != "sink")

    def alive(self) -> bool:
        return (self.workers is None or self.workers.alive()) and (self.api is None or self.api.process.poll() is None)

    def why(self) -> str:
        """Each process's exit code (or "running") and the end of its log: what a failed run says."""
        parts = []
        if self.workers is not None:
            parts.append(f"  workers ({self.workers.process.poll() or 'running'}), {self.workers.log_path}:\n"
                         f"{log_tail(self.workers.log_path)}")
        if self.api is not None:
            parts.append(f"  API ({self.api.process.poll() or 'running'}), {self.api.log_path}:\n"
                         f"{log_tail(self.api.log_path, 15)}")
        parts.append(f"  simulator, {self.simulator.log_path}:\n{log_tail(self.simulator.log_path, 10)}")
        return "\n".join(parts)

    def stop_pipeline(self) -> None:
        if self.workers is not None:
            self.workers.stop()
            self.workers = None
        if self.api is not None:
            self.api.stop()
            self.api = None


def cleanup(settings: Settings, token: str) -> None:
    """The run's topics, consumer groups and Redis keys (the database goes with BenchDatabase)."""
    names, groups, _kept = clients.delete_prefixed(settings, groups=True)
    removed = remove_redis_keys(settings, token)
    say(f"removed {len(names)} topics, {len(groups)} consumer groups, {removed} Redis keys and the database of the run")


def remove_redis_keys(settings: Settings, token: str) -> int:
    """The Redis keys a run's users and topic prefix made (rate-limit windows, breakers); how many."""
    client = redis.Redis.from_url(settings.redis_dsn)
    removed = 0
    try:
        for pattern in (f"*.{token}}}*", f"{settings.topic_prefix}*"):
            found = list(client.scan_iter(match=pattern, count=10_000))
            for start in range(0, len(found), 10_000):
                removed += int(client.unlink(*found[start:start + 10_000]))
    finally:
        client.close()
    return removed


def wait_ready(made: Rig) -> None:
    """Ready when a probe of each lane reached the provider."""
    producer = KafkaLoad(made.settings, made.codec)
    probes = [load.request("p", 0, made.token, "otp"), load.request("p", 1, made.token, "portfolio")]
    for probe in probes:
        producer.send(probe)
    if producer.flush():
        raise BenchError("the probes were not acknowledged by Kafka")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while made.accepted() < len(probes):
        if not made.alive():
            raise BenchError(f"a process of the run died before the probes reached the simulator:\n{made.why()}")
        if time.monotonic() > deadline:
            raise BenchError(f"the probes did not reach the simulator within {READY_TIMEOUT_S:.0f} s "
                             f"(simulator: {made.simulator.stats()}):\n{made.why()}")
        time.sleep(0.2)
