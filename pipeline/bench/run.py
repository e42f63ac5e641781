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

import asyncio
import dataclasses
import datetime
import http.client
import json
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis
from tqdm import tqdm

from pipeline.api.keys import create_key
from pipeline.bench import load
from pipeline.bench.load import KafkaLoad, Timeline, TopicClock
from pipeline.bench.procs import Box, BoxSample, Usage, usage
from pipeline.bench.rig import ApiProcess, BenchDatabase, BenchError, Spread, Workers, free_port_block, log_tail
from pipeline.bench.sender_rig import SimulatorProcess
from pipeline.config import Settings
from pipeline.domain import STAGES
from pipeline.kafka import clients, serde, topics
from pipeline.state import db

READY_TIMEOUT_S = 120.0
IDLE_INTERVAL_S = 0.1
OTP_INTERVAL_S = 0.05
API_BATCH = 100
API_CONCURRENCY = 4
SAMPLE_EVERY_S = 1.0


def say(text: str) -> None:
    print(text, flush=True)


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


# ------------------------------------------------------------------------------------------------ the rig


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


# ------------------------------------------------------------------------------------------------ the API share


class ApiClient:
    """Posts requests to the run's API from a thread of its own (an event loop with an aiohttp session)."""

    def __init__(self, port: int, api_key: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.refused = 0

    def start_posting(self) -> tuple[queue.Queue[list[dict[str, Any]] | None], threading.Thread]:
        """A thread posting the batches put on the returned queue (None ends it); the queue is bounded, so the
        requests in memory stay few however large the run."""
        batches: queue.Queue[list[dict[str, Any]] | None] = queue.Queue(maxsize=4 * API_CONCURRENCY)
        thread = threading.Thread(target=lambda: asyncio.run(self._post_all(batches)), daemon=True,
                                  name="bench-api")
        thread.start()
        return batches, thread

    async def _post_all(self, batches: queue.Queue[list[dict[str, Any]] | None]) -> None:
        async with aiohttp.ClientSession(headers=self.headers) as session:

            async def post(batch: list[dict[str, Any]]) -> None:
                body = json.dumps({"notifications": [load.as_json(r) for r in batch]})
                for _attempt in range(5):
                    async with session.post(f"{self.base}/v1/notifications:batch", data=body) as resp:
                        await resp.read()
                        if resp.status == 202:
                            return
                    await asyncio.sleep(0.5)
                self.refused += len(batch)

            async def poster() -> None:
                while (batch := await asyncio.to_thread(batches.get)) is not None:
                    await post(batch)
                batches.put(None)  # the other posters end too

            await asyncio.gather(*(poster() for _ in range(API_CONCURRENCY)))

    def post_one(self, conn: http.client.HTTPConnection, req: Mapping[str, Any]) -> float:
        """POST one request; the time (epoch ms) its 202 arrived."""
        conn.request("POST", "/v1/notifications", body=json.dumps(load.as_json(req)), headers=self.headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 202:
            raise BenchError(f"the API answered {resp.status} to an idle OTP")
        return load.now_ms()


# ------------------------------------------------------------------------------------------------ results


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


def batch_sizes(settings: Settings) -> dict[str, float]:
    """Mean records per consumed batch of each stage worker so far (from its /metrics)."""
    import urllib.request

    from pipeline.stages.worker import metrics_port, processes

    sizes: dict[str, float] = {}
    for stage, lane in processes(("critical", "bulk"), STAGES):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port(settings, stage, lane)}/metrics",
                                        timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            continue
        total = count = 0.0
        for line in text.splitlines():
            if line.startswith("notify_stage_batch_size_sum{"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith("notify_stage_batch_size_count{"):
                count += float(line.rsplit(" ", 1)[1])
        if count:
            sizes[f"{stage}/{lane}"] = total / count
    return sizes


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


PG_STATS = """
SELECT xact_commit + xact_rollback, tup_inserted, tup_updated, tup_deleted, tup_fetched, tup_returned, blks_hit,
       blks_read
FROM pg_stat_database WHERE datname = current_database()
"""
PG_STAT_NAMES = ("transactions", "rows inserted", "rows updated", "rows deleted", "rows fetched", "rows returned",
                 "blocks hit", "blocks read")


def pg_stats(settings: Settings) -> dict[str, int]:
    """The database's activity counters (PostgreSQL reports them with a delay of up to a second: take them after a
    pause)."""
    with db.connect(settings) as conn:
        row = conn.execute(PG_STATS).fetchone()
    return dict(zip(PG_STAT_NAMES, (int(v or 0) for v in (row or ())), strict=False))


def pg_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {name: after.get(name, 0) - before.get(name, 0) for name in PG_STAT_NAMES}


PG_TABLE_STATS = """
SELECT relname, seq_scan, seq_tup_read, COALESCE(idx_scan, 0), COALESCE(idx_tup_fetch, 0)
FROM pg_stat_user_tables
"""
PG_TABLE_NAMES = ("seq scans", "rows read by seq scans", "index scans", "rows fetched by index")


def pg_tables(settings: Settings) -> dict[str, tuple[int, ...]]:
    """Per table of the run's database: how it was read (which table a plan scans whole shows here)."""
    with db.connect(settings) as conn:
        rows = conn.execute(PG_TABLE_STATS).fetchall()
    return {str(row[0]): tuple(int(v or 0) for v in row[1:]) for row in rows}


def pg_tables_delta(before: Mapping[str, tuple[int, ...]], after: Mapping[str, tuple[int, ...]]
                    ) -> dict[str, dict[str, int]]:
    """What each table's reads were over a phase, for the tables read at all."""
    out = {}
    for table, now in sorted(after.items()):
        was = before.get(table, (0,) * len(now))
        delta = dict(zip(PG_TABLE_NAMES, (a - b for a, b in zip(now, was, strict=True)), strict=True))
        if any(delta.values()):
            out[table] = delta
    return out


DELIVERED = """
SELECT count(*) FROM deliveries d JOIN notifications n USING (notification_id)
WHERE d.state = 'delivered' AND n.user_id LIKE %s
"""


def drain(made: Rig, box: Box, count: int, accepted_before: int, users: Sequence[str], timeout_s: float,
          alive: Callable[[], bool] | None = None, database: Settings | None = None,
          ) -> tuple[bool, dict[str, int], BoxSample]:
    """Until the simulator accepted `count` more messages and their receipts made the rows of `users` (LIKE
    patterns) `delivered`; a progress bar meanwhile. Whether all got there, the peak memory per role, and the box
    sampled at the end."""
    deadline = time.monotonic() + timeout_s
    peak: dict[str, int] = {}
    next_sample = 0.0
    patterns = list(users)
    alive = alive or made.alive

    def sample() -> BoxSample:
        taken = box.sample()
        by_role: dict[str, int] = {}
        for process in taken.processes.values():
            by_role[process.role] = by_role.get(process.role, 0) + process.rss_kib
        for role, kib in by_role.items():
            peak[role] = max(peak.get(role, 0), kib)
        return taken

    with tqdm(total=count, desc="  provider accepted", unit="msg", smoothing=0.1, mininterval=1.0) as bar:
        while True:
            done = made.accepted() - accepted_before
            bar.update(done - bar.n)
            if time.monotonic() > next_sample:
                sample()
                next_sample = time.monotonic() + SAMPLE_EVERY_S
            if done >= count or time.monotonic() > deadline or not alive():
                break
            time.sleep(0.5)
    complete = made.accepted() - accepted_before >= count
    while complete and time.monotonic() < deadline and alive():
        with db.connect(database or made.settings) as conn:
            delivered = 0
            for pattern in patterns:
                row = conn.execute(DELIVERED, (pattern,)).fetchone()
                delivered += int(row[0]) if row else 0
        if delivered >= count:
            break
        time.sleep(1.0)
    return complete, peak, sample()


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
            results["baseline"] = baseline.run(made, plan, box)
    results["phases"] = phases
    text = report.render(results)
    say("\n" + text)
    written = report.write(folder, results, text)
    say(f"\nreport: {written}")
    expected = sum(p.requests for p in phases) + (plan.otps if not plan.skip_backlog and plan.backlog else 0) + 2
    exact = summary.get("count") == expected and summary.get("repeated_count") == 0
    baseline_complete = "baseline" not in results or results["baseline"].complete
    return 0 if exact and baseline_complete and all(p.complete for p in phases) else 1
