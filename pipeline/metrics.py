"""The one way to declare a metric: names, units and labels checked once, here.

Every metric of the pipeline is made by `counter`, `gauge` or `histogram` and lives in prometheus-client's default
registry, served at /metrics by each worker, the API and the lag exporter. The rules they enforce:

- names are `notify_<what>[_<unit>]`; counters end in `_total`; a histogram's name ends in its unit
  (`_seconds`, `_size`), so a dashboard never guesses one;
- labels come from a closed list of bounded dimensions (lane, stage, channel, provider, type, outcome, ...):
  never a user id, notification id or message id, whose values grow without bound.

`NOTIFY_METRICS=off` swaps every metric for a no-op, so a benchmark can measure what the metrics cost.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any, Final, cast

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from pipeline import config

NAME = re.compile(r"^notify_[a-z][a-z0-9_]*[a-z0-9]$")
HISTOGRAM_UNITS: Final = ("_seconds", "_size", "_bytes")
# Bounded label names (each has a small, known set of values); anything else is refused at import.
LABELS: Final = frozenset({
    "lane", "stage", "channel", "provider", "type", "outcome", "reason", "state", "status", "result", "tier", "to",
    "kind", "route", "method", "category", "change", "action", "group", "topic", "logical_topic", "partition",
    "currency", "stuck", "frequency", "table",
    "country",  # bounded by pipeline.policy.regions: its calling-code table, the routing table's codes, other, none
})
ENABLED: Final[bool] = bool(config.value("metrics_enabled"))
# Every metric declared in this process: name -> (kind, label names). Tests read it (which metrics carry a lane).
DECLARED: dict[str, tuple[str, tuple[str, ...]]] = {}

disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series only double what Prometheus scrapes, and no rule reads them


def declare(name: str, kind: str, labels: Sequence[str]) -> None:
    """Record a metric (a custom collector's families call this too) after checking its name and labels."""
    _check(name, labels)
    DECLARED[name] = (kind, tuple(labels))


def _check(name: str, labels: Sequence[str]) -> None:
    if not NAME.match(name):
        raise ValueError(f"metric {name!r}: names are notify_<what>[_<unit>] in lower snake case")
    unknown = sorted(set(labels) - LABELS)
    if unknown:
        raise ValueError(f"metric {name!r}: label(s) {unknown} are not among the bounded labels {sorted(LABELS)}")


class _Off:
    """A metric that records nothing (NOTIFY_METRICS=off)."""

    def labels(self, *_args: Any, **_kwargs: Any) -> _Off:
        return self

    def inc(self, _amount: float = 1) -> None:
        pass

    def dec(self, _amount: float = 1) -> None:
        pass

    def set(self, _value: float) -> None:
        pass

    def observe(self, _value: float) -> None:
        pass

    @contextlib.contextmanager
    def time(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def track_inprogress(self) -> Iterator[None]:
        yield


def counter(name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
    if not name.endswith("_total"):
        raise ValueError(f"counter {name!r} must end in _total")
    declare(name, "counter", labels)
    return Counter(name, documentation, labels) if ENABLED else cast(Counter, _Off())


def gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> Gauge:
    if name.endswith("_total"):
        raise ValueError(f"gauge {name!r} must not end in _total (that suffix means a counter)")
    declare(name, "gauge", labels)
    return Gauge(name, documentation, labels) if ENABLED else cast(Gauge, _Off())


def histogram(name: str, documentation: str, labels: Sequence[str] = (), *,
              buckets: Sequence[float]) -> Histogram:
    if not name.endswith(HISTOGRAM_UNITS):
        raise ValueError(f"histogram {name!r} must end in its unit, one of {HISTOGRAM_UNITS}")
    declare(name, "histogram", labels)
    return Histogram(name, documentation, labels, buckets=buckets) if ENABLED else cast(Histogram, _Off())


class Children:
    """A metric's children under fixed leading label values, each made once: `children(*rest)`.

    `labels()` takes a lock and builds a key on every call; a stage that counts per record looks its children up
    here instead (a dict hit).
    """

    __slots__ = ("_fixed", "_made", "_metric")

    def __init__(self, metric: Any, *fixed: str) -> None:
        self._metric = metric
        self._fixed = fixed
        self._made: dict[tuple[str, ...], Any] = {}

    def __call__(self, *rest: str) -> Any:
        child = self._made.get(rest)
        if child is None:
            child = self._made[rest] = self._metric.labels(*self._fixed, *rest)
        return child
