"""The console's figures as pure functions: Prometheus text in, per-stage lag, throughput and error rates out; provider
attempts in, success rate, p95 latency and cost per provider and country out. Tested without a broker."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from pipeline.policy.cost import message_cost

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
StageKey = tuple[str, str]  # (stage, lane); lane "" for a lane-free stage

LAG = "notify_consumer_lag_messages"
MESSAGES = "notify_stage_messages_total"
ERRORS = "notify_stage_errors_total"


def parse_samples(text: str) -> Samples:
    """Every sample of a /metrics page: (name, sorted labels) -> value. Counters keep their `_total` name."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def sum_by(samples: Samples, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """Sum of `name`'s samples per value of `labels` (a missing label counts as "")."""
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for (sample_name, sample_labels), value in samples.items():
        if sample_name == name and not math.isnan(value):
            as_dict = dict(sample_labels)
            out[tuple(as_dict.get(label, "") for label in labels)] += value
    return dict(out)


@dataclass(frozen=True)
class StageFigures:
    stage: str
    lane: str
    lag: float | None  # messages behind (None: the exporter gave none)
    messages_per_s: float | None  # None: one sample only, no rate yet
    errors_per_s: float | None

    @property
    def error_rate(self) -> float | None:
        """Errors per message finished (None when nothing was finished in the interval)."""
        if self.errors_per_s is None or not self.messages_per_s:
            return None
        return self.errors_per_s / self.messages_per_s


def _rate(now: float, before: float | None, seconds: float) -> float | None:
    if before is None or seconds <= 0:
        return None
    return max(0.0, now - before) / seconds  # a restarted worker's counter starts again at 0: no negative rate


def stage_figures(stages: Iterable[StageKey], lag: Mapping[StageKey, float], now: Mapping[StageKey, float],
                  now_errors: Mapping[StageKey, float], before: Mapping[StageKey, float] | None,
                  before_errors: Mapping[StageKey, float] | None, seconds: float) -> list[StageFigures]:
    """Per stage and lane: lag, and messages and errors per second between two scrapes `seconds` apart (totals
    from the workers' counters; rates are None without an earlier scrape)."""
    out = []
    for key in stages:
        messages = _rate(now.get(key, 0.0), None if before is None else before.get(key, 0.0), seconds)
        errors = _rate(now_errors.get(key, 0.0), None if before_errors is None else before_errors.get(key, 0.0),
                       seconds)
        out.append(StageFigures(key[0], key[1], lag.get(key), messages, errors))
    return out


def p95(values: Sequence[float]) -> float | None:
    """The 95th percentile (nearest rank); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


@dataclass
class ProviderFigures:
    provider: str
    country: str
    calls: int = 0
    accepted: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    cost_usd: float = 0.0

    @property
    def success_rate(self) -> float | None:
        return self.accepted / self.calls if self.calls else None

    @property
    def p95_ms(self) -> float | None:
        return p95(self.latencies_ms)


@dataclass(frozen=True)
class AttemptFact:
    """One provider call as the providers page needs it."""

    provider: str
    channel: str
    country: str
    outcome: str
    latency_ms: float | None
    cost_micros: int | None
    body: str


def provider_figures(attempts: Iterable[AttemptFact], prices: Mapping[str, float]) -> list[ProviderFigures]:
    """Per provider and country: calls, success rate (accepted / calls), p95 latency, and cost: the recorded cost
    when the attempt has one, else the configured price (SMS per segment) of each accepted call."""
    table: dict[tuple[str, str], ProviderFigures] = {}
    for a in attempts:
        row = table.setdefault((a.provider, a.country), ProviderFigures(a.provider, a.country))
        row.calls += 1
        if a.latency_ms is not None:
            row.latencies_ms.append(a.latency_ms)
        if a.outcome == "accepted":
            row.accepted += 1
            row.cost_usd += (a.cost_micros / 1_000_000 if a.cost_micros is not None
                             else message_cost(prices, a.provider, a.channel, a.body))
    return [table[key] for key in sorted(table)]


def fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    """A figure for a table cell: '-' for none."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"
