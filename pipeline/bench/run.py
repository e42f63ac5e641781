"""`notify bench`: the whole pipeline, from requests to the provider's ledger and back through receipts, measured.

One run, on topics (`bench<token>.`), a database (`notify_bench_<token>`) and Redis keys of its own, all removed at
the end; the stack (broker, PostgreSQL, Redis) is the configured one. The pipeline runs as it does in production:
`notify worker --all` (every stage of both lanes), `notify api` (ingest and provider webhooks) and the provider
simulator as processes, with the simulator's delivery callbacks going to the API's webhooks, so receipts are part
of the run.

Phases:
0. idle: OTPs through the API, one at a time, each measured from its 202 to the provider's request (the time the
   simulator accepted it);
1. burst: N requests at once (half critical transaction alerts by SMS via Twilio, half bulk portfolio updates by
   email via SendGrid), a share of them through the API's batch endpoint, the rest produced to Kafka; throughput
   and per-stage latency per lane, CPU per notification of every process on the box;
2. backlog: M bulk marketing requests at once, then OTPs one every 50 ms while they drain.

With `--baseline`, a raw confluent-kafka chain (pipeline/bench/baseline.py) then does the same hops with the same
partitions, record sizes, batched database and Redis work, HTTP calls to the same simulator and receipts, and the
report gives the ratio. Figures are printed and written, with charts, to a report folder; nothing is asserted.
"""

from __future__ import annotations

import dataclasses
import datetime
import http.client
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.api.keys import create_key
from pipeline.bench import load
from pipeline.bench.api_client import ApiClient
from pipeline.bench.load import KafkaLoad, Timeline, TopicClock
from pipeline.bench.measure import batch_sizes, drain, pg_delta, pg_stats, pg_tables, pg_tables_delta
from pipeline.bench.pipeline_rig import Rig, cleanup, say, wait_ready
from pipeline.bench.procs import Box, usage
from pipeline.bench.results import PhaseResult
from pipeline.bench.rig import ApiProcess, BenchDatabase, BenchError, Workers, free_port_block
from pipeline.bench.sender_rig import SimulatorProcess
from pipeline.config import Settings
from pipeline.domain import STAGES
from pipeline.kafka import topics
from pipeline.state import db

IDLE_INTERVAL_S = 0.1
OTP_INTERVAL_S = 0.05
API_BATCH = 100


@dataclass
class Plan:
    requests: int = 100_000
    api_share: float = 0.1
    idle_otps: int = 50
    backlog: int = 100_000
    otps: int = 200
    skip_backlog: bool = False
    baseline: bool = False
    provider_latency_ms: float = 20.0
    delivery_delay_ms: float = 200.0
    report_dir: Path | None = None

    def check(self) -> None:
        if self.requests < 1 or self.idle_otps < 0 or self.backlog < 0 or self.otps < 0:
            raise BenchError("--requests must be positive; --idle-otps, --backlog and --otps at least 0")
        if not 0 <= self.api_share <= 1:
            raise BenchError("--api-share is a fraction between 0 and 1")

    def timeout_s(self, count: int) -> float:
        """How long a phase of `count` requests may take before the run gives up on it."""
        return 120.0 + count / 100


# ------------------------------------------------------------------------------------------------ the rig, for the plan


@contextmanager
def rig(settings: Settings, plan: Plan, token: str) -> Iterator[Rig]:
    logs = settings.stack_dir / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    with BenchDatabase(settings, token) as bench_db:
        api_port = free_port_block(1)
        mine = dataclasses.replace(bench_db, topic_prefix=f"bench{token}.", metrics_port=free_port_block(),
                                   api_port=api_port)
        topics.apply(mine)
        simulator = SimulatorProcess.start(mine, logs / f"simulator-{token}.log", {
            "NOTIFY_WEBHOOK_BASE_URL": f"http://127.0.0.1:{api_port}/webhooks",
            "NOTIFY_SIMULATOR_DELIVERY_DELAY_MS": f"{plan.delivery_delay_ms:g}", "NOTIFY_LOG_LEVEL": "WARNING"})
        env = {**simulator.env, "DATABASE_URL": mine.dsn, "NOTIFY_TOPIC_PREFIX": mine.topic_prefix,
               "NOTIFY_METRICS_PORT": str(mine.metrics_port), "NOTIFY_API_PORT": str(api_port),
               "NOTIFY_LOG_LEVEL": "WARNING"}
        made = Rig(mine, token, simulator, None, None, create_key(mine, f"bench-{token}")[1], env)
        try:
            for provider in ("twilio", "sendgrid", "termii", "mailgun"):
                simulator.configure(provider, latency_ms=plan.provider_latency_ms,
                                    jitter_ms=plan.provider_latency_ms / 5)
            made.api = ApiProcess.start(mine, api_port, env, logs / f"api-{token}.log")
            made.workers = Workers.start(mine, stages=STAGES, env=env)
            yield made
        finally:
            made.stop_pipeline()
            simulator.stop()
            cleanup(mine, token)


# ------------------------------------------------------------------------------------------------ phases


def phase_idle(made: Rig, count: int, timelines: Mapping[str, Timeline]) -> PhaseResult:
    """OTPs one at a time through the API: from each 202 to the provider's request."""
    timeline = timelines["i"]
    client = ApiClient(made.settings.api_port, made.api_key)
    http_conn = http.client.HTTPConnection("127.0.0.1", made.settings.api_port, timeout=10)
    acked: dict[str, float] = {}
    started = time.monotonic()
    first_ms = load.now_ms()
    for i in range(count):
        time.sleep(max(0.0, started + i * IDLE_INTERVAL_S - time.monotonic()))
        req = load.request("i", i, made.token, "otp", ttl=datetime.timedelta(minutes=5))
        timeline.set("created", i, req["created_at"].timestamp() * 1000)
        acked[str(req["notification_id"])] = client.post_one(http_conn, req)
    http_conn.close()
    deadline = time.monotonic() + 60
    from_202: list[float] = []
    pending = dict(acked)
    while pending and time.monotonic() < deadline:
        for nid, ack_ms in list(pending.items()):
            entries = made.simulator.ledger_of(nid)
            if entries:
                from_202.append(entries[0]["accepted_at"] * 1000 - ack_ms)
                del pending[nid]
        time.sleep(0.2)
    result = PhaseResult("idle", count, 0.0, timeline, first_ms, complete=not pending)
    result.extra["from_202_ms"] = from_202
    time.sleep(1.0)  # the sender records the acceptance after the provider's answer
    with db.connect(made.settings) as conn:
        result.states = load.stamp_from_db(conn, {"i": timeline}, made.token).get("i", {})
    return result


def phase_burst(made: Rig, plan: Plan, timelines: Mapping[str, Timeline], box: Box) -> PhaseResult:
    n = plan.requests
    timeline = timelines["t"]
    step = round(1 / plan.api_share) if plan.api_share > 0 else 0
    producer = KafkaLoad(made.settings, made.codec)
    client = ApiClient(made.settings.api_port, made.api_key)
    accepted_before = made.accepted()
    pg_before, tables_before = pg_stats(made.settings), pg_tables(made.settings)
    before = box.sample()
    started = time.monotonic()
    first_ms = load.now_ms()
    batches, poster = client.start_posting()
    batch: list[dict[str, Any]] = []
    via_api = 0
    for i in range(n):
        req = load.request("t", i, made.token, "transaction" if i % 2 == 0 else "portfolio")
        timeline.set("created", i, req["created_at"].timestamp() * 1000)
        if step and i % step == 0:
            batch.append(req)
            via_api += 1
            if len(batch) == API_BATCH:
                batches.put(batch)
                batch = []
            continue
        producer.send(req)
    if batch:
        batches.put(batch)
    batches.put(None)
    unacked = producer.flush()
    poster.join(300)
    produce_s = time.monotonic() - started
    say(f"  produced {n - via_api} requests to Kafka and posted {via_api} to the API in {produce_s:.1f} s"
        + (f" ({unacked} not acknowledged, {client.refused} refused by the API)" if unacked or client.refused else ""))
    result = PhaseResult("burst", n, produce_s, timeline, first_ms)
    result.complete, result.peak_rss_kib, after = drain(made, box, n, accepted_before, [f"t%.{made.token}"],
                                                        plan.timeout_s(n))
    result.usage = usage(before, after)
    time.sleep(1.0)
    result.extra["postgres"] = pg_delta(pg_before, pg_stats(made.settings))
    result.extra["postgres_tables"] = pg_tables_delta(tables_before, pg_tables(made.settings))
    with db.connect(made.settings) as conn:
        result.states = load.stamp_from_db(conn, {"t": timeline}, made.token).get("t", {})
    result.extra["via_api"] = via_api
    result.extra["batch_sizes"] = batch_sizes(made.settings)
    return result


def phase_backlog(made: Rig, plan: Plan, timelines: Mapping[str, Timeline], box: Box) -> PhaseResult:
    backlog, otps = timelines["k"], timelines["o"]
    producer = KafkaLoad(made.settings, made.codec)
    accepted_before = made.accepted()
    before = box.sample()
    started = time.monotonic()
    first_ms = load.now_ms()
    for i in range(plan.backlog):
        req = load.request("k", i, made.token, "portfolio", ttl=datetime.timedelta(hours=2))
        backlog.set("created", i, req["created_at"].timestamp() * 1000)
        producer.send(req)
    producer.flush()
    produce_s = time.monotonic() - started
    say(f"  produced a backlog of {plan.backlog} in {produce_s:.1f} s; now {plan.otps} OTPs, one every "
        f"{OTP_INTERVAL_S * 1000:.0f} ms")
    otp_started = time.monotonic()
    for i in range(plan.otps):
        time.sleep(max(0.0, otp_started + i * OTP_INTERVAL_S - time.monotonic()))
        req = load.request("o", i, made.token, "otp", ttl=datetime.timedelta(minutes=30))
        otps.set("created", i, req["created_at"].timestamp() * 1000)
        producer.send(req)
        producer.producer.flush(1)  # each OTP goes out now, as an upstream service would send it
    total = plan.backlog + plan.otps
    result = PhaseResult("backlog", plan.backlog, produce_s, backlog, first_ms)
    result.complete, result.peak_rss_kib, after = drain(made, box, total, accepted_before,
                                                        [f"k%.{made.token}", f"o%.{made.token}"], plan.timeout_s(total))
    result.usage = usage(before, after)
    with db.connect(made.settings) as conn:
        states = load.stamp_from_db(conn, {"k": backlog, "o": otps}, made.token)
    result.states = states.get("k", {})
    result.extra["otp_states"] = states.get("o", {})
    result.extra["otp_timeline"] = otps
    return result


# ------------------------------------------------------------------------------------------------ the run


def run_bench(settings: Settings, plan: Plan) -> int:
    """Run every phase (and the baseline), print the figures, write the report; 0 when everything arrived once."""
    plan.check()
    from pipeline.bench import baseline, report

    token = uuid.uuid4().hex[:8]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    folder = plan.report_dir or settings.stack_dir / "bench-reports" / f"{stamp}-{token}"
    say(f"notify bench {token}: {plan.requests} requests ({plan.api_share:.0%} through the API), "
        f"{plan.idle_otps} idle OTPs, backlog {0 if plan.skip_backlog else plan.backlog} + {plan.otps} OTPs; "
        f"provider latency {plan.provider_latency_ms:g} ms; {os.cpu_count()} cores")
    box = Box()
    results: dict[str, Any] = {"plan": {k: str(v) for k, v in dataclasses.asdict(plan).items()}, "token": token}
    timelines = {"i": Timeline(plan.idle_otps), "t": Timeline(plan.requests),
                 "k": Timeline(0 if plan.skip_backlog else plan.backlog),
                 "o": Timeline(0 if plan.skip_backlog else plan.otps)}
    phases: list[PhaseResult] = []
    with rig(settings, plan, token) as made:
        wait_ready(made)
        say(f"pipeline ready: workers {' '.join(map(str, made.workers.pids() if made.workers else []))}, API "
            f":{made.settings.api_port}, simulator :{made.simulator.port}")
        clock = TopicClock(made.settings, timelines)
        clock.start()
        try:
            if plan.idle_otps:
                say("\nphase 0: idle OTPs through the API")
                phases.append(phase_idle(made, plan.idle_otps, timelines))
            say(f"\nphase 1: a burst of {plan.requests}")
            phases.append(phase_burst(made, plan, timelines, box))
            if not plan.skip_backlog and plan.backlog:
                say(f"\nphase 2: OTPs behind a bulk backlog of {plan.backlog}")
                phases.append(phase_backlog(made, plan, timelines, box))
            summary = made.simulator.call("GET", "/_admin/ledger/summary")
        finally:
            clock.stop()
        results["ledger"] = summary
        if plan.baseline:
            made.stop_pipeline()
            say(f"\nbaseline: the raw chain, a burst of {plan.requests}")
            made.simulator.reset()
            for provider in ("twilio", "sendgrid"):
                made.simulator.configure(provider, latency_ms=plan.provider_latency_ms,
                                         jitter_ms=plan.provider_latency_ms / 5)
            results["baseline"] = baseline.run(made, plan.requests, plan.timeout_s(plan.requests), box)
    results["phases"] = phases
    text = report.render(results)
    say("\n" + text)
    written = report.write(folder, results, text)
    say(f"\nreport: {written}")
    expected = sum(p.requests for p in phases) + (plan.otps if not plan.skip_backlog and plan.backlog else 0) + 2
    exact = summary.get("count") == expected and summary.get("repeated_count") == 0
    baseline_complete = "baseline" not in results or results["baseline"].complete
    return 0 if exact and baseline_complete and all(p.complete for p in phases) else 1
