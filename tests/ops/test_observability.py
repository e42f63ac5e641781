"""Observability on the real stack: the metric contract, the lag exporter, health, and the stack's Prometheus.

One rig runs every stage, the API (webhooks) and the lag exporter as real processes on ports of their own, and is
registered with the local stack's Prometheus through a target file (file discovery: no restart). Traffic goes
through the whole pipeline; what the processes export after it is the ground truth for the contract test.
"""

from __future__ import annotations

import collections
import json
import math
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from support.loop_rig import LoopRig, mixed_requests, produce_requests, start_loop
from support.promql_names import metric_names

from pipeline.bench.sender_rig import wait_states
from pipeline.config import Settings
from pipeline.domain import STAGES
from pipeline.kafka import clients, topics
from pipeline.ops.exporter import LagExporter, Snapshot
from pipeline.process import health
from pipeline.stack import prometheus
from pipeline.stack.prometheus import PrometheusService

REPO = Path(__file__).resolve().parents[2]
RULES = sorted((REPO / "infra" / "prometheus" / "rules").glob("*.yml"))
DASHBOARD = REPO / "infra" / "grafana" / "dashboards" / "notify-pipeline.json"
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",), "untyped": ("",),
            "summary": ("", "_count", "_sum"), "info": ("_info",)}


# ------------------------------------------------------------------------------------------------ helpers


def rules() -> list[dict[str, Any]]:
    return [rule for path in RULES for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[str]:
        for panel in panels:
            yield from (target["expr"] for target in panel.get("targets", []) if target.get("expr"))
            yield from walk(panel.get("panels", []))

    return list(walk(json.loads(DASHBOARD.read_text())["panels"]))


def referenced_metrics() -> dict[str, set[str]]:
    """Raw metric name -> where it is used (alert/recording rules, dashboard); recording rules are followed."""
    recorded = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    used: dict[str, set[str]] = collections.defaultdict(set)

    def add(expr: str, where: str, depth: int = 0) -> None:
        assert depth < 10, f"recording rules loop at {where}"
        for name in metric_names(expr):
            if name in recorded:
                add(recorded[name], f"{where} -> {name}", depth + 1)
            else:
                used[name].add(where)

    for rule in rules():
        add(rule["expr"], f"rule {rule.get('alert') or rule.get('record')}")
    for expr in dashboard_exprs():
        add(expr, "dashboard")
    return used


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def exported_names(text: str) -> set[str]:
    """Every series name a /metrics page declares (a declared family without samples yet counts)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def sample_total(text: str, name: str, **labels: str) -> float:
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def query(settings: Settings, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{settings.prometheus_port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def query_range(settings: Settings, promql: str, start: float, end: float) -> list[float]:
    url = f"http://127.0.0.1:{settings.prometheus_port}/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": promql, "start": start, "end": end, "step": 1})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    values = (float(v) for series in body["data"]["result"] for _, v in series["values"])
    return [v for v in values if not math.isnan(v)]  # 0/0 before the first calls


def wait_for(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1.0)


def all_delivered(rig: LoopRig, ids: list[str], timeout_s: float) -> None:
    seen = wait_states(rig.settings, ids, ("delivered", "failed", "dead_lettered", "expired"), timeout_s)
    assert collections.Counter(seen.values()) == {"delivered": len(ids)}, collections.Counter(seen.values())


def sms_requests(count: int) -> list[dict[str, Any]]:
    return [r for r in mixed_requests(2 * count, "observability") if r["channels"] == ["sms"]]


# ------------------------------------------------------------------------------------------------ the rig


@pytest.fixture(scope="module")
def rig(settings: Settings) -> Iterator[LoopRig]:
    service = PrometheusService(settings)
    assert service.ready(), "the stack's Prometheus must run (`notify stack up` starts it)"
    # The reconciler sweeps the whole deliveries table: rows other tests left behind must not become sends that
    # this test's counters would count, so it acts only on rows stuck for a day.
    day = str(24 * 3600)
    patient = {f"NOTIFY_RECONCILE_{name}": day for name in ("LEASE_GRACE_S", "UNKNOWN_AFTER_S",
                                                            "RECEIPT_TIMEOUT_S", "RETRY_OVERDUE_S")}
    for loop in start_loop(settings, "tobs", STAGES, patient, exporter=True):
        run = loop.settings.topic_prefix
        written = [prometheus.write_targets(settings, job, run.strip("."),
                                            [(port, {**labels, "run": run}) for port, labels in entries])
                   for job, entries in loop.scrape_targets().items() if entries]
        try:
            yield loop
        finally:
            for path in written:
                path.unlink(missing_ok=True)


def rig_ports(rig: LoopRig) -> dict[str, int]:
    return {f"{job}:{labels.get('stage', '')}/{labels.get('lane', '')}": port
            for job, entries in rig.scrape_targets().items() for port, labels in entries}


def test_every_metric_the_rules_and_the_dashboard_name_is_exported_by_the_running_processes(rig: LoopRig) -> None:
    ids = produce_requests(rig.settings, mixed_requests(40, "observability"))
    all_delivered(rig, ids, 90)
    pages = {name: scrape(port) for name, port in rig_ports(rig).items()}
    assert len(pages) == 1 + 12 + 1  # the API, every stage of both lanes (two lane-free), the exporter
    exported = set().union(*(exported_names(page) for page in pages.values()))

    missing = {name: sorted(where) for name, where in referenced_metrics().items()
               if name not in exported and name not in PROMETHEUS_OWN}
    assert not missing, f"named in rules or the dashboard but exported by no process: {missing}"

    # ... and the traffic really moved the business metrics (not merely declared families)
    everything = "\n".join(pages.values())
    assert sample_total(everything, "notify_send_latency_seconds_count", lane="critical", channel="sms") == 20
    assert sample_total(everything, "notify_send_latency_seconds_count", lane="bulk", channel="email") == 20
    assert sample_total(everything, "notify_delivered_latency_seconds_count") == 40
    # 20 one-segment SMS at Twilio's configured price, 20 emails at SendGrid's
    prices = dict(rig.settings.provider_prices_usd)
    assert sample_total(everything, "notify_provider_cost_usd_total", provider="twilio") == pytest.approx(
        20 * prices["twilio"])
    assert sample_total(everything, "notify_provider_cost_usd_total", provider="sendgrid") == pytest.approx(
        20 * prices["sendgrid"])
    for stage in ("intake", "preferences", "routing", "sender"):
        assert sample_total(everything, "notify_stage_queue_latency_seconds_count", stage=stage) >= 40


def test_the_lag_exporter_reports_every_group_of_the_run_caught_up(rig: LoopRig) -> None:
    def lags() -> dict[str, float]:
        found: dict[str, float] = collections.defaultdict(float)
        for family in text_string_to_metric_families(scrape(rig_ports(rig)["exporter:/"])):
            for sample in family.samples:
                if sample.name == "notify_consumer_lag_messages":
                    found[sample.labels["group"]] += sample.value
        return found

    ids = produce_requests(rig.settings, mixed_requests(10, "observability"))
    all_delivered(rig, ids, 60)
    prefix = rig.settings.topic_prefix
    expected = {f"{prefix}notify-{stage}-{lane}" for stage in ("intake", "preferences", "routing", "sender")
                for lane in ("critical", "bulk")} | {f"{prefix}notify-receipts"}
    caught_up = wait_for(lambda: (found := lags()) and expected <= set(found)
                         and all(found[g] == 0 for g in expected) and found, 30, "the exporter to see every group")
    assert all(group.startswith(prefix) for group in caught_up), "only this run's groups carry its prefix"


def test_prometheus_scrapes_the_run_and_sees_the_sms_failure_rate_rise_when_twilio_fails_a_fifth(
        rig: LoopRig, settings: Settings) -> None:
    run = rig.settings.topic_prefix
    up = wait_for(lambda: len(found := [r for r in query(settings, f'up{{run="{run}"}}') if r["value"][1] == "1"])
                  == 14 and found, 60, "Prometheus to scrape the run's 14 processes")
    assert collections.Counter(r["metric"]["job"] for r in up) == {
        "notify-api": 1, "notify-workers": 12, "notify-exporter": 1}
    ratio = (f'sum(rate(notify_provider_outcomes_total{{run="{run}",channel="sms",outcome!="accepted"}}[1m]) '
             f'or 0 * rate(notify_provider_outcomes_total{{run="{run}",channel="sms"}}[1m])) '
             f'/ sum(rate(notify_provider_outcomes_total{{run="{run}",channel="sms"}}[1m]))')

    rig.sim.configure("twilio", error_rates={})
    began = time.time()
    healthy = produce_requests(rig.settings, sms_requests(100))
    all_delivered(rig, healthy, 60)
    wait_for(lambda: [r for r in query(settings, ratio) if float(r["value"][1]) == 0.0], 60,
             "Prometheus to see SMS calls with no failures")

    rig.sim.configure("twilio", error_rates={"5xx": 0.2})
    failing: list[str] = []
    for _ in range(3):
        failing += produce_requests(rig.settings, sms_requests(150))
        time.sleep(3)
    rising = wait_for(lambda: [(float(r["value"][0]), float(r["value"][1])) for r in query(settings, ratio)
                               if float(r["value"][1]) > 0.1], 90, "the SMS failure ratio to rise above 10%")
    seen_at, value = rising[0]
    assert value < 0.3  # a fifth of Twilio's calls fail; Termii takes each over, so about 1/6 of all calls
    # Prometheus's own history, up to the moment it answered above: from no failures to over a tenth
    series = query_range(settings, ratio, seen_at - math.ceil(seen_at - began), seen_at)  # steps end on seen_at
    assert min(series) == 0.0 and max(series) > 0.1, (series, began, seen_at)
    # the recording rule the alert reads, and the alert itself (pending: it needs 2 minutes to fire)
    recorded = wait_for(lambda: query(settings, 'notify:channel_failure_ratio:rate1m{channel="sms"} > 0.05'), 30,
                        "the recording rule to follow")
    assert recorded
    wait_for(lambda: query(settings, 'ALERTS{alertname="NotifySmsFailureRateHigh"}'), 30,
             "NotifySmsFailureRateHigh to become pending")
    rig.sim.configure("twilio", error_rates={})
    all_delivered(rig, failing, 90)
    attempts = collections.Counter(p for _, _, p, o in rig.attempts(failing) if o != "accepted")
    assert set(attempts) == {"twilio"} and 0 < attempts["twilio"] < len(failing) / 2, attempts


# ------------------------------------------------------------------------------------------------ exporter, health


def test_the_exporter_reads_lag_from_committed_offsets_and_high_watermarks(applied: Settings) -> None:
    prefix = applied.topic_prefix
    topic = applied.topic(topics.send_topic("sms", "critical"))
    producer = clients.producer(applied)
    for n in range(7):
        producer.produce(topic, value=f"m{n}".encode(), partition=0)
    assert producer.flush(30) == 0
    admin = clients.admin(applied)
    ours, foreign = f"{prefix}notify-sender-critical", f"{prefix}someone-else"
    for group, offset in ((ours, 2), (foreign, 1)):
        consumer = clients.consumer(applied, group)
        consumer.commit(offsets=[TopicPartition(topic, 0, offset)], asynchronous=False)
        consumer.close()
    try:
        exporter = LagExporter(applied)
        key = (ours, "sender", "critical", topic, 0)
        dlq = (applied.topic(topics.DLQ), topics.DLQ, 0)

        def complete() -> Snapshot | None:  # a just-created topic's leader may not answer yet
            snapshot = exporter.read()
            return snapshot if key in snapshot.lags and dlq in snapshot.ends else None

        snapshot = wait_for(complete, 30, "the new topic's leader to answer")
        assert snapshot.lags[(ours, "sender", "critical", topic, 0)] == 5
        assert not [key for key in snapshot.lags if key[0] == foreign], "a group not of a stage is not reported"
        assert snapshot.ends[(topic, topics.send_topic("sms", "critical"), 0)] == 7
        assert snapshot.ends[dlq] == 0
    finally:
        for group in (ours, foreign):
            admin.delete_consumer_groups([group])[group].result()


def test_readiness_names_the_dependency_that_does_not_answer(settings: Settings) -> None:
    status, body = health.Readiness(settings).report()
    assert (status, body["checks"]) == (200, {"kafka": "ok", "postgres": "ok", "redis": "ok"})
    import dataclasses

    from pipeline.bench.rig import free_port_block

    dead = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port_block(1)}/0")
    status, body = health.Readiness(dead).report()
    assert status == 503 and body["status"] == "not ready"
    assert body["checks"]["kafka"] == "ok" and body["checks"]["postgres"] == "ok"
    assert "Connection" in body["checks"]["redis"], body


def test_every_process_of_the_run_is_live_and_ready(rig: LoopRig) -> None:
    for name, port in rig_ports(rig).items():
        assert health.probe(f"http://127.0.0.1:{port}/health/live") == (
            200, {"status": "ok", "process": "api" if name.startswith("api") else name.split(":", 1)[1]
                  if not name.startswith("exporter") else "exporter"}), name
        status, body = health.probe(f"http://127.0.0.1:{port}/health/ready")
        assert status == 200 and body["checks"] == {"kafka": "ok", "postgres": "ok", "redis": "ok"}, (name, body)


# ------------------------------------------------------------------------------------------------ configuration


def test_the_committed_targets_are_the_default_ports_and_the_stack_config_checks(settings: Settings) -> None:
    """infra/prometheus/targets/ (what docker-compose's Prometheus reads) lists the processes `notify run` starts
    with default settings; the stack's copy of the config passes promtool."""
    from pipeline import config
    from pipeline.stack.common import find_binary

    for job, entries in prometheus.targets(config.load({})).items():
        committed = json.loads((REPO / "infra" / "prometheus" / "targets" / f"{job}-local.json").read_text())
        assert committed == prometheus.file_sd(entries), f"regenerate infra/prometheus/targets/{job}-local.json"
    promtool = find_binary("promtool")
    assert promtool is not None
    for config_file in (REPO / "infra" / "prometheus" / "prometheus.yml",
                        prometheus.config_dir(settings) / "prometheus.yml"):
        checked = subprocess.run([promtool, "check", "config", str(config_file)], capture_output=True, text=True,
                                 check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
