"""Stage workers: `notify worker --stage S --lane L` runs one; `notify worker --all` runs every stage of both lanes.

Each stage and lane is a consumer group of its own, run in a process of its own, so a bulk backlog never holds an
OTP and each scales apart (more processes of the same stage and lane share its partitions). `--all` supervises one
child process per stage and lane and restarts a child that dies. Shutdown is bounded: SIGTERM/SIGINT let the
current batch finish, wait for Kafka to acknowledge its output, commit it and leave the group; if that takes
longer than the grace period, the process exits anyway: what was not committed is redelivered, and every stage
is idempotent.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from pipeline.config import Settings
from pipeline.domain import LANES, STAGES, Lane
from pipeline.kafka import clients
from pipeline.ops.reconcile import Reconciler
from pipeline.policy import templates
from pipeline.process import aio, health
from pipeline.stages import intake, preferences, receipts, retry, routing, sender
from pipeline.stages.context import LANE_FREE_STAGES, StageContext
from pipeline.stages.runtime import StageRunner

log = logging.getLogger("notify.worker")

SHUTDOWN_GRACE_S = 15.0


class Runnable(Protocol):
    async def run(self) -> None: ...

    def stop(self) -> None: ...


def _builders(settings: Settings) -> dict[str, Callable[[StageContext], Runnable]]:
    window = datetime.timedelta(seconds=settings.dedup_window_s)
    return {
        "intake": lambda ctx: StageRunner(intake.build(ctx, window)),
        "preferences": lambda ctx: StageRunner(preferences.build(ctx)),
        "routing": lambda ctx: StageRunner(routing.build(ctx)),
        "sender": lambda ctx: StageRunner(sender.build(ctx)),
        "retry": lambda ctx: StageRunner(retry.build(ctx)),
        "receipts": lambda ctx: StageRunner(receipts.build(ctx)),
        "reconcile": Reconciler,  # a timed sweep, elected by a PostgreSQL advisory lock
    }


def processes(lanes: tuple[Lane, ...], stages: tuple[str, ...]) -> list[tuple[str, Lane]]:
    """The (stage, lane) processes `--all` runs: each stage per lane; a lane-free stage once."""
    return [(stage, lane) for lane in lanes for stage in stages
            if stage not in LANE_FREE_STAGES or lane == lanes[0]]


def metrics_port(settings: Settings, stage: str, lane: Lane, replica: int = 0) -> int:
    """Each worker process has its own /metrics port: base + position of (stage, lane) for the first process of a
    stage (replica 0, where every port has always been); further replicas in blocks of their own after the
    exporter's port, one block per replica number, so no two processes of `--all --replicas` ever share one."""
    slot = STAGES.index(stage) * len(LANES) + LANES.index(lane)
    if replica == 0:
        return settings.metrics_port + 1 + slot
    if replica < 0:
        raise ValueError(f"replica {replica} is negative")
    return exporter_port(settings) + 1 + (replica - 1) * len(STAGES) * len(LANES) + slot


def exporter_port(settings: Settings) -> int:
    """The lag exporter's /metrics port: the one after every worker's."""
    return settings.metrics_port + 1 + len(STAGES) * len(LANES)


def parse_replicas(spec: str | None, stages: tuple[str, ...] = STAGES) -> dict[str, int]:
    """`--replicas`: "N" (every stage), "sender=3,intake=2" (those stages; the rest 1), or "N,sender=3" (N for every
    stage but sender). The processes per stage and lane; the reconciler always runs once (it is elected anyway)."""
    counts = dict.fromkeys(stages, 1)
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        stage, sep, raw = part.rpartition("=")
        try:
            count = int(raw)
        except ValueError:
            count = 0
        if count < 1 or (sep and stage not in stages):
            raise ValueError(f"--replicas {spec!r}: {part!r} is not N or STAGE=N with N >= 1 and STAGE one of "
                             f"{', '.join(stages)}")
        for name in [stage] if sep else list(stages):
            counts[name] = count
    if "reconcile" in counts:
        counts["reconcile"] = 1
    return counts


def replica_processes(lanes: tuple[Lane, ...], stages: tuple[str, ...],
                      replicas: Mapping[str, int] | None = None) -> list[tuple[str, Lane, int]]:
    """The (stage, lane, replica) processes `--all` runs: `processes()`, each `replicas[stage]` times."""
    return [(stage, lane, n) for stage, lane in processes(lanes, stages)
            for n in range((replicas or {}).get(stage, 1))]


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: "
                        "%(message)s")


def _exit_after_grace() -> None:
    """Arm a watchdog: the process ends after the grace period even if a broker or database call hangs."""
    def expire() -> None:
        log.error("shutdown took longer than %.0fs; exiting (uncommitted work is redelivered)", SHUTDOWN_GRACE_S)
        os._exit(0)

    timer = threading.Timer(SHUTDOWN_GRACE_S, expire)
    timer.daemon = True
    timer.start()


async def _serve(runner: Runnable) -> None:
    loop = asyncio.get_running_loop()

    def stop() -> None:
        _exit_after_grace()
        runner.stop()

    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_signal_handler(signal.SIGINT, stop)
    await runner.run()


def run_stage(settings: Settings, stage: str, lane: Lane, replica: int = 0) -> int:
    if stage not in STAGES:
        raise SystemExit(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    _setup_logging(settings)
    templates.validate(settings.templates_dir)  # fail fast: an invalid templates/ would fail every send
    ctx = StageContext(settings=settings, stage=stage, lane=lane, producer=clients.producer(settings))
    runner = _builders(settings)[stage](ctx)
    port = metrics_port(settings, stage, lane, replica)
    health.serve(port, health.Readiness(settings), name=f"{stage}/{lane}")
    print(f"worker {stage}/{lane}#{replica}: consumer group {ctx.group_id}, metrics and health on http://127.0.0.1:{port}",
          flush=True)
    aio.run(_serve(runner))
    return 0


def run_exporter(settings: Settings) -> int:
    """`notify exporter`: the consumer-lag exporter (pipeline/ops/exporter.py) with its /metrics and health."""
    from pipeline.ops import exporter  # imported here only: its metrics belong to the exporter process alone

    _setup_logging(settings)
    lag_exporter = exporter.build(settings)
    port = exporter_port(settings)
    health.serve(port, health.Readiness(settings), name="exporter")
    print(f"lag exporter: groups {settings.topic_prefix}notify-*, metrics and health on http://127.0.0.1:{port}",
          flush=True)
    aio.run(_serve(lag_exporter))
    return 0


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "pipeline", *argv])


def run_all(settings: Settings, lanes: tuple[Lane, ...] = LANES, stages: tuple[str, ...] = STAGES,
            with_exporter: bool = True, replicas: Mapping[str, int] | None = None) -> int:
    """`replicas[stage]` child processes (default one) per stage and lane, each a member of the stage's consumer
    group (and the lag exporter), restarted when it dies; SIGTERM/SIGINT stop them all."""
    templates.validate(settings.templates_dir)  # once here, rather than each child dying of it again and again
    commands = {f"{stage}/{lane}" + (f"#{n}" if n else ""):
                ["worker", "--stage", stage, "--lane", lane, *(["--replica", str(n)] if n else [])]
                for stage, lane, n in replica_processes(lanes, stages, replicas)}
    if with_exporter:
        commands["exporter"] = ["exporter"]
    children = {name: _spawn(argv) for name, argv in commands.items()}
    print(f"workers: {len(children)} processes (pids {' '.join(str(c.pid) for c in children.values())})", flush=True)
    scraped = _scrape_replicas(settings, [
        (metrics_port(settings, stage, lane, n), {"stage": stage, "lane": lane, "replica": str(n)})
        for stage, lane, n in replica_processes(lanes, stages, replicas) if n])
    try:
        return _supervise(commands, children)
    finally:
        if scraped is not None:
            scraped.unlink(missing_ok=True)


def _scrape_replicas(settings: Settings, entries: list[tuple[int, dict[str, str]]]) -> Path | None:
    """Let the stack's Prometheus scrape the replicas after the first of each stage: its targets list the ports of
    replica 0 (those `notify run` always uses), so this supervisor adds a file of its own, removed when it stops.
    A Prometheus of someone else's (PROMETHEUS_URL) is configured where it runs. Without replicas, a file a killed
    supervisor left is removed: its targets would show as workers down."""
    from pipeline.stack import prometheus

    if settings.prometheus_url is not None or not prometheus.config_dir(settings).is_dir():
        return None
    name = f"replicas-{settings.metrics_port}"
    if not entries:
        prometheus.remove_targets(settings, "workers", name)
        return None
    return prometheus.write_targets(settings, "workers", name, entries)


def _supervise(commands: dict[str, list[str]], children: dict[str, subprocess.Popen[bytes]]) -> int:
    stopping = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    restarts: dict[str, list[float]] = {}
    while not stopping.is_set():
        for name, child in list(children.items()):
            if child.poll() is None:
                continue
            recent = [t for t in restarts.get(name, []) if t > time.monotonic() - 60]
            if len(recent) >= 5:  # crash-looping: give up loudly rather than spin
                log.error("worker %s keeps dying (exit %s); stopping everything", name, child.returncode)
                stopping.set()
                break
            log.warning("worker %s exited with %s; restarting it", name, child.returncode)
            print(f"worker {name} exited ({child.returncode}); restarting", flush=True)
            restarts[name] = [*recent, time.monotonic()]
            children[name] = _spawn(commands[name])
        stopping.wait(0.5)
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + SHUTDOWN_GRACE_S + 5
    for child in children.values():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
    return 0
