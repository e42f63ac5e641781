"""What a bench phase measured (`PhaseResult`: its timeline, states, CPU, memory, extras) and the figures drawn from
it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.bench import load
from pipeline.bench.load import Timeline
from pipeline.bench.procs import Usage
from pipeline.bench.rig import Spread


@dataclass
class PhaseResult:
    name: str
    requests: int
    produce_s: float
    timeline: Timeline
    started_ms: float  # first request created
    usage: Usage | None = None
    states: dict[str, int] = field(default_factory=dict)
    complete: bool = True
    peak_rss_kib: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def provider_stamps(self) -> list[float]:
        return [v for v in self.timeline.points["provider"] if not math.isnan(v)]

    @property
    def accepted(self) -> int:
        return len(self.provider_stamps())

    @property
    def wall_s(self) -> float | None:
        stamps = self.provider_stamps()
        return (max(stamps) - self.started_ms) / 1000 if stamps else None

    @property
    def throughput(self) -> float | None:
        wall = self.wall_s
        return self.accepted / wall if wall else None

    def latency(self, phase: str, lane: str | None = None) -> dict[str, Spread | None]:
        indices = None if lane is None else load.indices_by_lane(phase, self.requests).get(lane, range(0))
        spans = {name: Spread.of(self.timeline.spans(a, b, indices)) for name, a, b in load.STAGE_SPANS}
        spans["receipt (accepted -> delivered)"] = Spread.of(self.timeline.spans("provider", "delivered", indices))
        return spans


def cpu_ms_per_notification(result: PhaseResult) -> dict[str, float]:
    if result.usage is None or not result.accepted:
        return {}
    return {role: 1000 * cpu / result.accepted for role, cpu in sorted(result.usage.grouped().items())}
