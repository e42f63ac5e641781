"""The Grafana dashboard and its provisioning, checked statically (no Grafana or Prometheus needed)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from support.promql_names import metric_names

from pipeline import config

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "infra" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "notify-pipeline.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}

# Rows in order, each with metrics it must show: golden signals first, then the business view.
ROWS: list[tuple[str, set[str]]] = [
    ("Golden signals: queue depth and lag", {"notify_consumer_lag_messages", "notify_stage_messages_total"}),
    ("Golden signals: queue latency", {"notify_stage_queue_latency_seconds_bucket"}),
    ("Golden signals: worker errors", {"notify_stage_errors_total", "notify_quarantined_total", "up"}),
    ("Golden signals: provider latency and outcomes",
     {"notify_provider_request_seconds_bucket", "notify_provider_outcomes_total"}),
    ("Golden signals: retries, DLQ, breakers and in-flight",
     {"notify_retry_scheduled_total", "notify_dlq_total", "notify_breaker_state", "notify_sender_in_flight"}),
    ("Business: success rate", {"notify_sender_deliveries_total"}),
    ("Business: accepted within 30 s", {"notify_send_latency_seconds_bucket", "notify_send_latency_seconds_count"}),
    ("Business: end-to-end latency",
     {"notify_send_latency_seconds_bucket", "notify_delivered_latency_seconds_bucket"}),
    ("Business: cost", {"notify_provider_cost_usd_total"}),
    ("Business: opt-outs and suppressions", {"notify_preference_changes_total", "notify_suppressed_total"}),
]

def declared_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every metric the worker, API and exporter modules declare (importing them declares their metrics)."""
    import pipeline.api.app
    import pipeline.ops.exporter
    import pipeline.stages.worker  # noqa: F401 (imported for the metrics it declares)
    from pipeline import metrics

    return dict(metrics.DECLARED)


# What the code declares (pipeline/metrics.py records every metric with its labels as it is made); `up` is
# Prometheus's own. That the running processes really export them is tests/ops/test_observability.py's contract test.
EXPORTED: dict[str, set[str]] = {**{name: set(labels) for name, (_, labels) in declared_metrics().items()},
                                 "up": {"job", "instance"}}
HISTOGRAMS = {name for name, (kind, _) in declared_metrics().items() if kind == "histogram"}
SERIES = {name for name in EXPORTED if name not in HISTOGRAMS} | {
    f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
LANE_FILTER = 'lane=~"$lane"'


def family(series: str) -> str:
    """The metric a series belongs to (a histogram's _bucket/_sum/_count are its own)."""
    for suffix in ("_bucket", "_sum", "_count"):
        if series.endswith(suffix) and series.removesuffix(suffix) in HISTOGRAMS:
            return series.removesuffix(suffix)
    return series


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return parsed


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    parsed: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.kafka.yml").read_text())
    return parsed


def rows_of(dashboard: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(row title, its panels) in order; a collapsed row keeps its panels inside it, an open one after it."""
    result: list[tuple[str, list[dict[str, Any]]]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            result.append((panel["title"], list(panel.get("panels", [])) if panel.get("collapsed") else []))
        else:
            assert result, f"panel {panel['title']!r} comes before the first row"
            result[-1][1].append(panel)
    return result


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for _, children in rows_of(dashboard):
        yield from children


def exprs(panel: dict[str, Any]) -> list[str]:
    return [target["expr"] for target in panel.get("targets", []) if target.get("expr")]


def selectors(expr: str, series: str) -> list[str]:
    """The label matchers (text between the braces, '' without braces) of each place `expr` selects `series`."""
    return [match.group(1) or "" for match in re.finditer(rf"(?<![\w:]){re.escape(series)}(?![\w:])(?:\{{([^}}]*)\}})?",
                                                         expr)]


# ---------------------------------------------------------------- metric_names


@pytest.mark.parametrize(("expr", "names"), [
    ('sum(rate(notify_send_latency_seconds_bucket{le="30.0",lane=~"$lane"}[$__rate_interval])) by (lane) / '
     'sum(rate(notify_send_latency_seconds_count{lane=~"$lane"}[$__rate_interval])) by (lane)',
     {"notify_send_latency_seconds_bucket", "notify_send_latency_seconds_count"}),
    ('histogram_quantile(0.95, sum by (le, stage) (rate(notify_stage_queue_latency_seconds_bucket'
     '{lane=~"${lane:regex}"}[5m])))', {"notify_stage_queue_latency_seconds_bucket"}),
    ("time() - max(notify_exporter_last_success_timestamp_seconds)",
     {"notify_exporter_last_success_timestamp_seconds"}),
    ('min(up{job=~"notify-workers|notify-api"}) by (job) == bool 1', {"up"}),
    ("a * on(instance) group_left(stage) b offset -1h30m > 0.5 unless c @ start()", {"a", "b", "c"}),
    ("x * ignoring(le) group_right y and without_z", {"x", "y", "without_z"}),
    ("job:notify_requests:rate5m and SUM(x) BY (lane) or count without (le) (sum_of_things)",
     {"job:notify_requests:rate5m", "x", "sum_of_things"}),
    ("topk(5, bottomk(3, quantile(0.9, stddev(stdvar(avg(min(max(group(count(m)))))))))) + "
     'count_values("le", n) + last_over_time(o[$__range])', {"m", "n", "o"}),
    ('label_replace(z, "dst", "$1", "src", "(.*)") + max_over_time(rate(w[5m])[1h:1m]) # sum by (lane)\n+ v',
     {"z", "w", "v"}),
    ('{__name__="notify_dlq_total", lane="bulk"} + {"dotted.name", le="1.0"} + {__name__=~"notify_.*"}',
     {"notify_dlq_total", "dotted.name"}),
    ("1e-3 + 0x1F + Inf - NaN + .5 + 2 ^ 3 % 4 atan2 q", {"q"}),
    ("rate(x[[[interval]]]) / $scale + ${scale} * [[factor]]", {"x"}),
])
def test_metric_names_keeps_only_the_names_an_expression_selects(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


@pytest.mark.parametrize("expr", ["notify_${kind}_total", '$metric{lane="bulk"}', 'x{lane="bulk"', 'x{lane="bulk}',
                                  "x[5m", "x ; y", "sum(x) by (le"])
def test_metric_names_refuses_what_it_cannot_read_exactly(expr: str) -> None:
    with pytest.raises(ValueError):
        metric_names(expr)


# ---------------------------------------------------------------- the dashboard


def test_dashboard_is_json_with_its_uid_and_schema(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "notify-pipeline"
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]] + [
        child["id"] for row in dashboard["panels"] if row["type"] == "row" for child in row.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [panel["title"] for panel in panels(dashboard)]
    assert len(titles) == len(set(titles)), "panel titles must be unique"


def test_every_panel_reads_the_provisioned_prometheus_and_says_what_it_shows(dashboard: dict[str, Any]) -> None:
    assert list(panels(dashboard))
    for panel in panels(dashboard):
        title = panel["title"]
        assert panel["datasource"] == DATASOURCE, f"{title}: datasource must be uid 'prometheus'"
        assert exprs(panel), f"{title}: needs at least one target with an expression"
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, f"{title}: target datasource"
            assert target.get("refId"), f"{title}: every target needs a refId"
        assert panel.get("description", "").strip(), f"{title}: needs a description"


def test_panels_are_in_rows_golden_signals_first_then_business(dashboard: dict[str, Any]) -> None:
    rows = rows_of(dashboard)
    assert [title for title, _ in rows] == [title for title, _ in ROWS]
    for (title, children), (_, wanted) in zip(rows, ROWS, strict=True):
        assert children, f"row {title!r} is empty"
        shown = set().union(*(metric_names(expr) for panel in children for expr in exprs(panel)))
        assert wanted <= shown, f"row {title!r} should show {sorted(wanted - shown)}"


def test_expressions_read_only_exported_series(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        for expr in exprs(panel):
            names = metric_names(expr)
            assert names, f"{panel['title']}: {expr!r} reads no metric"
            assert not {name for name in names if ":" in name}, f"{panel['title']}: raw metrics only, no rules"
            assert names <= SERIES, f"{panel['title']}: {sorted(names - SERIES)} are not exported"


def test_counters_and_histograms_are_read_through_rate_over_the_grafana_interval(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        for expr in exprs(panel):
            for name in metric_names(expr):
                if name.endswith(("_total", "_bucket", "_sum", "_count")):
                    bare = re.search(rf"(?<!rate\()(?<!increase\()(?<![\w:]){re.escape(name)}(?![\w:])", expr)
                    assert bare is None, f"{panel['title']}: {name} must be read through rate() or increase()"
            for window in re.findall(r"\[([^\]]*)\]", expr):
                assert window in ("$__rate_interval", "$__range"), f"{panel['title']}: window [{window}]"
            if "histogram_quantile(" in expr:
                assert re.search(r"by \(le[,)]", expr), f"{panel['title']}: quantiles need the le label kept"


def test_share_accepted_within_30_s_is_shown_per_lane(dashboard: dict[str, Any]) -> None:
    share = ('sum(rate(notify_send_latency_seconds_bucket{le="30.0",lane=~"$lane"}[$__rate_interval])) by (lane) / '
             'sum(rate(notify_send_latency_seconds_count{lane=~"$lane"}[$__rate_interval])) by (lane)')
    assert share in [expr for panel in panels(dashboard) for expr in exprs(panel)]


def test_up_of_workers_exporter_and_api_is_shown(dashboard: dict[str, Any]) -> None:
    up = [expr for panel in panels(dashboard) for expr in exprs(panel) if "up" in metric_names(expr)]
    assert up
    for job in ("notify-workers", "notify-exporter", "notify-api"):
        assert any(job in expr for expr in up), f"no panel shows whether {job} is up"


def test_lane_variable_offers_both_lanes_and_all(dashboard: dict[str, Any]) -> None:
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    lane = variables["lane"]
    assert lane["type"] == "custom"
    assert [value.strip() for value in lane["query"].split(",")] == ["critical", "bulk"]
    assert lane["multi"] is True
    assert lane["includeAll"] is True


def test_every_per_lane_panel_filters_by_the_lane_variable(dashboard: dict[str, Any]) -> None:
    per_lane = 0
    for panel in panels(dashboard):
        lane_series = {name for expr in exprs(panel) for name in metric_names(expr)
                       if "lane" in EXPORTED.get(family(name), set())}
        per_lane += bool(lane_series)
        for expr in exprs(panel):
            for name in metric_names(expr) & lane_series:
                for matchers in selectors(expr, name):
                    assert LANE_FILTER in matchers, f"{panel['title']}: {name} must filter {LANE_FILTER}"
    assert per_lane >= 10


# ---------------------------------------------------------------- provisioning


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path (relative to the repository) of a service's bind mounts."""
    result = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            result[target] = REPO / source
    return result


def test_provisioning_points_grafana_at_the_mounted_dashboards(compose: dict[str, Any]) -> None:
    grafana = mounts(compose["services"]["grafana"])
    provisioning = grafana["/etc/grafana/provisioning"]
    assert provisioning == GRAFANA / "provisioning"
    providers = yaml.safe_load((provisioning / "dashboards" / "notify.yml").read_text())["providers"]
    assert providers, "provisioning/dashboards/notify.yml declares no provider"
    for provider in providers:
        assert provider["type"] == "file"
        folder = provider["options"]["path"]
        assert grafana.get(folder) == DASHBOARD.parent, f"{folder} is not the dashboards folder compose mounts"
    home = compose["services"]["grafana"].get("environment", {}).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home is not None:
        folder, _, file = home.rpartition("/")
        assert grafana[folder] / file == DASHBOARD


def test_provisioned_datasource_is_the_compose_prometheus() -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (datasource,) = provisioned["datasources"]
    assert {key: datasource[key] for key in ("type", "uid")} == DATASOURCE
    assert datasource["access"] == "proxy"
    assert datasource["isDefault"] is True
    url = urlsplit(datasource["url"])
    assert (url.scheme, url.hostname, url.port) == ("http", "127.0.0.1", config.load({}).prometheus_port)
