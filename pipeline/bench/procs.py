"""What every process on the box costs during a benchmark: CPU time and memory from /proc, grouped by role.

A benchmark on a shared 2-core machine is only honest if it counts everything: the stage workers, the broker,
PostgreSQL, Redis, the provider simulator, the API and the benchmark itself. `Box.sample()` reads utime + stime and
VmRSS of every process; `Box.delta()` between two samples gives CPU seconds per role. Processes are grouped by
what their command line says they are; processes that came and went between samples are counted from the samples
that saw them (a short-lived process is undercounted, which the report says).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True, slots=True)
class ProcessSample:
    pid: int
    role: str
    cpu_s: float
    rss_kib: int


@dataclass(frozen=True)
class BoxSample:
    at: float  # time.monotonic()
    processes: Mapping[int, ProcessSample]
    busy_s: float  # every core's non-idle time since boot (/proc/stat)


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on; the command name may hold spaces and parentheses."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")


def role_of(argv: list[str], comm: str, own_pid: int, pid: int) -> str:
    """What a process is, from its command line: `worker:<stage>/<lane>`, `kafka`, `postgres`, `redis`, ..."""
    joined = " ".join(argv)
    if pid == own_pid:
        return "bench"
    if "pipeline" in joined:
        if "worker" in argv and "--stage" in argv:
            stage = argv[argv.index("--stage") + 1]
            lane = argv[argv.index("--lane") + 1] if "--lane" in argv else "?"
            return f"worker:{stage}/{lane}"
        for role in ("simulator", "exporter", "api"):
            if role in argv:
                return role
        if "worker" in argv:
            return "worker:supervisor"
        if "pipeline.bench.baseline" in joined:
            hop = argv[argv.index("--hop") + 1] if "--hop" in argv else "?"
            return f"baseline:{hop}"
        return "pipeline:other"
    if "kafka.Kafka" in joined:
        return "kafka"
    if comm.startswith("postgres") or "postgres" in argv[0]:
        return "postgres"
    if comm.startswith("redis"):
        return "redis"
    return f"other:{comm}"


class Box:
    """Samples every process of the machine (the whole box is what a co-located deployment pays)."""

    def __init__(self, classify: Callable[[list[str], str, int, int], str] = role_of) -> None:
        self.classify = classify
        self.own_pid = os.getpid()
        self._roles: dict[int, str] = {}

    def sample(self) -> BoxSample:
        processes = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                fields = _stat_fields(pid)
                role = self._roles.get(pid)
                if role is None:
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                    role = self._roles[pid] = self.classify(_cmdline(pid), comm, self.own_pid, pid)
                cpu = (int(fields[11]) + int(fields[12])) / TICKS_PER_S  # utime, stime: fields 14 and 15 of stat(5)
                rss = int(fields[21]) * PAGE_KIB  # field 24: resident pages
            except (OSError, ValueError, IndexError):
                continue
            processes[pid] = ProcessSample(pid, role, cpu, rss)
        return BoxSample(time.monotonic(), processes, _busy_s())


def _busy_s() -> float:
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in first]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / TICKS_PER_S


@dataclass
class Usage:
    """CPU seconds and memory per role between two samples."""

    wall_s: float
    cpu_s: dict[str, float] = field(default_factory=dict)
    rss_before_kib: dict[str, int] = field(default_factory=dict)
    rss_after_kib: dict[str, int] = field(default_factory=dict)
    busy_s: float = 0.0  # the machine's non-idle time (all cores), as /proc/stat counts it

    @property
    def total_cpu_s(self) -> float:
        return sum(self.cpu_s.values())

    def grouped(self, depth: str = ":") -> dict[str, float]:
        """CPU seconds per role family (`worker:intake/critical` -> `worker:intake`)."""
        out: dict[str, float] = defaultdict(float)
        for role, cpu in self.cpu_s.items():
            family = role.split("/")[0] if role.startswith(("worker", "baseline")) else role
            out["other" if family.startswith("other:") and cpu < 0.01 * self.wall_s else family] += cpu
        return dict(out)


def usage(before: BoxSample, after: BoxSample) -> Usage:
    cpu: dict[str, float] = defaultdict(float)
    rss_before: dict[str, int] = defaultdict(int)
    rss_after: dict[str, int] = defaultdict(int)
    for pid, late in after.processes.items():
        early = before.processes.get(pid)
        cpu[late.role] += late.cpu_s - (early.cpu_s if early is not None else 0.0)
        rss_after[late.role] += late.rss_kib
    for sample in before.processes.values():
        rss_before[sample.role] += sample.rss_kib
    return Usage(after.at - before.at, {k: v for k, v in cpu.items() if v > 0}, dict(rss_before), dict(rss_after),
                 after.busy_s - before.busy_s)
