"""The capacity model: from a benchmark's measured CPU per notification (each stage, the API, the broker, PostgreSQL,
Redis) and PostgreSQL rows written per notification, what a deployment needs for a target rate: worker processes
per stage, partitions per topic, brokers, and where PostgreSQL and Redis stop being one server.

Pure arithmetic on the measured figures and the stated assumptions (`Assumptions`), so the README's table can be
recomputed from any run's report (`notify bench` prints the inputs and this model's output).

- A worker process is one Python process: it uses at most one core, planned at `utilisation` of it.
- Processes of a stage per lane can never exceed the lane topic's partitions (a consumer group gives a partition to
  one member), so partitions are the widest stage's processes per lane times `partition_headroom`, rounded up to a
  multiple of 6 (the co-partitioned `user` group must grow together and cannot shrink: plan it once).
- The broker's CPU was measured at replication factor `measured_replication` (the local stack: 1); followers fetch
  and write every record again, so it scales with the replication factor. At least 3 brokers (RF 3, min ISR 2).
- PostgreSQL and Redis: cores needed against one server's planned cores; past it, that store is the limit (shard
  the deliveries by user, move the read paths to replicas; Redis Cluster by user key).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# the stage roles of `notify bench`'s CPU table (pipeline/bench/procs.py: worker:<stage>)
STAGE_ROLES = ("intake", "preferences", "routing", "sender", "retry", "receipts")
LANE_FREE = frozenset({"receipts"})  # one consumer group serves both lanes
RATES = (1_000, 10_000, 100_000)


@dataclass(frozen=True)
class Measured:
    """CPU milliseconds per notification (on the machine that measured them) and rows written per notification."""

    stage_cpu_ms: Mapping[str, float]  # stage -> CPU ms per notification, summed over its lanes
    api_cpu_ms: float  # ingest (the share that came through the API) and the providers' webhooks
    broker_cpu_ms: float
    postgres_cpu_ms: float
    redis_cpu_ms: float
    rows_written: float  # PostgreSQL rows inserted + updated per notification
    transactions: float = 0.0  # PostgreSQL transactions per notification
    measured_replication: int = 1

    @classmethod
    def from_bench(cls, cpu_ms: Mapping[str, float], postgres_per_notification: Mapping[str, float],
                   measured_replication: int = 1) -> Measured:
        """From a bench run: its CPU table by role (`worker:sender`, `kafka`, ...) and its PostgreSQL counters per
        notification (`rows inserted`, `rows updated`, `transactions`)."""
        return cls(
            stage_cpu_ms={stage: cpu_ms.get(f"worker:{stage}", 0.0) for stage in STAGE_ROLES},
            api_cpu_ms=cpu_ms.get("api", 0.0), broker_cpu_ms=cpu_ms.get("kafka", 0.0),
            postgres_cpu_ms=cpu_ms.get("postgres", 0.0), redis_cpu_ms=cpu_ms.get("redis", 0.0),
            rows_written=postgres_per_notification.get("rows inserted", 0.0)
            + postgres_per_notification.get("rows updated", 0.0),
            transactions=postgres_per_notification.get("transactions", 0.0),
            measured_replication=measured_replication)


@dataclass(frozen=True)
class Assumptions:
    utilisation: float = 0.6  # plan every process and server to 60% of its cores: spikes, GC, a failover's load
    worker_cores: float = 1.0  # a Python worker process: one core at most
    replication_factor: int = 3
    broker_cores: int = 8
    min_brokers: int = 3
    partition_headroom: int = 2  # partitions for twice the processes planned: scale out without repartitioning
    min_partitions: int = 6
    postgres_cores: int = 16  # one primary
    redis_cores: int = 1  # Redis executes commands on one thread


@dataclass(frozen=True)
class Plan:
    rate: int
    processes: Mapping[str, int]  # stage (and "api") -> processes, both lanes together
    partitions: int  # per topic of the co-partitioned user group
    brokers: int
    broker_cores: float
    postgres_cores: float
    postgres_servers: int  # primaries of `postgres_cores` each: 1 means one server carries it
    rows_written_per_s: float
    redis_cores: float
    redis_shards: int
    limits: Sequence[str] = field(default_factory=tuple)

    @property
    def worker_processes(self) -> int:
        return sum(n for stage, n in self.processes.items() if stage != "api")


def _processes(cpu_ms: float, rate: float, lanes: int, a: Assumptions) -> int:
    """Processes of one stage: its cores at the planned utilisation, at least one per lane."""
    cores = rate * cpu_ms / 1000
    return max(lanes, math.ceil(cores / (a.worker_cores * a.utilisation) - 1e-9))


def plan(measured: Measured, rate: int, a: Assumptions = Assumptions()) -> Plan:
    processes = {stage: _processes(cpu, rate, 1 if stage in LANE_FREE else 2, a)
                 for stage, cpu in measured.stage_cpu_ms.items()}
    processes["api"] = _processes(measured.api_cpu_ms, rate, 1, a)
    # the widest stage per lane (the lanes split the work; a lane-free stage's group reads every partition)
    per_lane = max(math.ceil(n / (1 if stage in LANE_FREE else 2)) for stage, n in processes.items()
                   if stage != "api")
    partitions = max(a.min_partitions, 6 * math.ceil(per_lane * a.partition_headroom / 6))
    broker_cores = rate * measured.broker_cpu_ms / 1000 * a.replication_factor / measured.measured_replication
    brokers = max(a.min_brokers, math.ceil(broker_cores / (a.broker_cores * a.utilisation) - 1e-9))
    pg_cores = rate * measured.postgres_cpu_ms / 1000
    pg_servers = max(1, math.ceil(pg_cores / (a.postgres_cores * a.utilisation) - 1e-9))
    redis_cores = rate * measured.redis_cpu_ms / 1000
    redis_shards = max(1, math.ceil(redis_cores / (a.redis_cores * a.utilisation) - 1e-9))
    limits = []
    if pg_servers > 1:
        limits.append(f"PostgreSQL: {pg_cores:.0f} cores for {rate * measured.rows_written:,.0f} rows written/s, "
                      f"more than one {a.postgres_cores}-core primary: shard by user into {pg_servers}")
    if redis_shards > 1:
        limits.append(f"Redis: {redis_cores:.1f} cores of one-threaded work: a cluster of {redis_shards} shards")
    return Plan(rate, processes, partitions, brokers, broker_cores, pg_cores, pg_servers,
                rate * measured.rows_written, redis_cores, redis_shards, tuple(limits))


def limit_rate(cpu_ms: float, cores: float, a: Assumptions = Assumptions()) -> float:
    """Notifications/s one server of `cores` carries at the planned utilisation, at `cpu_ms` per notification."""
    return math.inf if cpu_ms <= 0 else cores * a.utilisation * 1000 / cpu_ms


def render(measured: Measured, rates: Sequence[int] = RATES, a: Assumptions = Assumptions()) -> list[str]:
    """The model's inputs and output as Markdown lines (the bench report's section, the README's table)."""
    plans = [plan(measured, rate, a) for rate in rates]
    out = ["| input (per notification) | value |", "|---|---:|"]
    out += [f"| CPU ms, {stage} | {cpu:.3f} |" for stage, cpu in measured.stage_cpu_ms.items()]
    out += [f"| CPU ms, API (ingest share, webhooks) | {measured.api_cpu_ms:.3f} |",
            f"| CPU ms, Kafka broker (replication factor {measured.measured_replication}) | "
            f"{measured.broker_cpu_ms:.3f} |",
            f"| CPU ms, PostgreSQL | {measured.postgres_cpu_ms:.3f} |",
            f"| CPU ms, Redis | {measured.redis_cpu_ms:.3f} |",
            f"| PostgreSQL rows written (inserted + updated) | {measured.rows_written:.2f} |",
            f"| PostgreSQL transactions | {measured.transactions:.3f} |", ""]
    out += [f"Planned at {a.utilisation:.0%} of every core; a worker process is one core; brokers of "
            f"{a.broker_cores} cores at replication factor {a.replication_factor}; one PostgreSQL primary of "
            f"{a.postgres_cores} cores; Redis one thread per shard.", ""]
    out += ["| notifications/s | " + " | ".join(f"{p.rate:,}" for p in plans) + " |",
            "|---|" + "---:|" * len(plans)]
    for stage in [*measured.stage_cpu_ms, "api"]:
        out.append(f"| {stage} processes | " + " | ".join(str(p.processes[stage]) for p in plans) + " |")
    out += ["| worker processes, all stages | " + " | ".join(str(p.worker_processes) for p in plans) + " |",
            "| partitions per topic (user group) | " + " | ".join(str(p.partitions) for p in plans) + " |",
            "| brokers (broker cores) | " + " | ".join(f"{p.brokers} ({p.broker_cores:.1f})" for p in plans) + " |",
            "| PostgreSQL cores (primaries) | " + " | ".join(
                f"{p.postgres_cores:.1f} ({p.postgres_servers})" for p in plans) + " |",
            "| PostgreSQL rows written/s | " + " | ".join(f"{p.rows_written_per_s:,.0f}" for p in plans) + " |",
            "| Redis cores (shards) | " + " | ".join(f"{p.redis_cores:.2f} ({p.redis_shards})" for p in plans) + " |",
            ""]
    out.append(f"One PostgreSQL primary carries up to {limit_rate(measured.postgres_cpu_ms, a.postgres_cores, a):,.0f} "
               f"notifications/s, one Redis shard {limit_rate(measured.redis_cpu_ms, a.redis_cores, a):,.0f}/s.")
    for p in plans:
        out += [f"- at {p.rate:,}/s: {limit}" for limit in p.limits]
    return out
