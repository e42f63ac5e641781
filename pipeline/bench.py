"""`notify bench intake`: how fast the stages move notifications, what each stage adds, what it costs in CPU, and
how long an OTP takes while a bulk backlog drains. It prints figures; it asserts nothing.

The benchmark runs on topics of its own (a fresh `bench<hex>.` prefix) against the configured stack, with
`notify worker --all` as a real process tree, and removes the topics (and the workers' consumer groups) at the
end unless --keep-topics.

Phase 1 produces N requests (half critical `transaction` on sms, half bulk `portfolio` on email, each to a user of
its own so that no rate limit applies) and reads what came out of accepted.<lane>, routed.<lane> and
send.<channel>.<lane>. Latencies come from Kafka's CreateTime timestamps, which each stage sets when it produces:
intake = accepted - created_at, preferences = routed - accepted, routing = send - routed, end to end =
send - created_at. The worker processes' CPU time (utime + stime from /proc) is sampled before and after.

Phase 2 puts M bulk `marketing` requests on requests.bulk as fast as it can, then, while they drain, sends K OTPs
one every 50 ms and measures each OTP's end-to-end latency, and how much of the backlog was still undrained when
the last OTP arrived.

Records are counted by their Kafka key (user ids are this run's own) while the run goes on, and decoded only when
it is over, so the benchmark itself takes little CPU from the workers it measures.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline import kafka, serde, topics
from pipeline.config import REPO_ROOT, Settings
from pipeline.domain import LANES, Lane, lane_for
from pipeline.errors import NotifyError

READY_TIMEOUT_S = 120.0  # per probe: workers starting and joining their groups
PHASE1_TIMEOUT_S = 600.0  # until all N send records arrived
STRAGGLERS_TIMEOUT_S = 60.0  # then until the accepted and routed records of those are read too
PRODUCE_FLUSH_TIMEOUT_S = 120.0
BACKLOG_TIMEOUT_S = 900.0  # the bulk backlog has this long to drain (counted from its first produce)
OTP_INTERVAL_S = 0.05
STOP_TIMEOUT_S = 30.0  # SIGTERM, then SIGKILL
PROGRESS_EVERY_S = 15.0

STAGE_NAMES = ("intake", "preferences", "routing", "end to end")


class BenchError(NotifyError):
    """The benchmark could not run (bad arguments, workers that never became ready)."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _ms(moment: datetime.datetime) -> int:
    return int(moment.timestamp() * 1000)


def _say(text: str) -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------------------------------ requests


def make_request(user_id: str, notification_type: str, channels: Sequence[str],
                 ttl: datetime.timedelta = datetime.timedelta(minutes=10)) -> dict[str, Any]:
    """A NotificationRequest as upstream services send it (the shape of tests/harness.py `Pipeline.request`)."""
    now = _now()
    return {
        "notification_id": str(uuid.uuid4()),
        "idempotency_key": uuid.uuid4().hex,
        "user_id": user_id,
        "type": notification_type,
        "channels": list(channels),
        "recipient": {"phone": "+2348012345678", "email": "ada@example.com", "device_tokens": []},
        "template_id": f"{notification_type}.default",
        "template_params": {},
        "created_at": now,
        "expires_at": now + ttl,
        "source_service": "bench",
    }


class Sender:
    """Produces requests to requests.<lane of their type>, keyed by user id, and remembers when each was created."""

    def __init__(self, settings: Settings, codec: serde.AvroSerde) -> None:
        self.settings = settings
        self.codec = codec
        self.producer: Producer = kafka.producer(settings)
        self.created_ms: dict[str, int] = {}  # notification id -> created_at (epoch ms)
        self.first_ms: int | None = None

    def send(self, request: Mapping[str, Any]) -> None:
        topic = self.settings.topic(topics.requests_topic(lane_for(request["type"])))
        value = self.codec.encode(serde.NOTIFICATION_REQUEST, request)
        if self.first_ms is None:
            self.first_ms = int(time.time() * 1000)
        while True:
            try:
                self.producer.produce(topic, key=request["user_id"].encode(), value=value)
                break
            except BufferError:  # the local queue is full: let deliveries drain, then try again
                self.producer.poll(0.1)
        self.producer.poll(0)
        self.created_ms[str(request["notification_id"])] = _ms(request["created_at"])

    def flush(self) -> int:
        """Wait (bounded) until Kafka acknowledged everything; how many records were not acknowledged."""
        remaining: int = self.producer.flush(PRODUCE_FLUSH_TIMEOUT_S)
        return remaining


# ------------------------------------------------------------------------------------------------ the workers


def free_port_block(size: int = 1 + 2 * 7) -> int:  # the API, then every (stage, lane) of the worker
    """A base port such that it and the `size` ports above it are free now (loopback, for one run).

    Every port of the block is checked (workers bind base+1.., and a simulator or another run's block may sit
    just above a free base), and blocks are drawn below Linux's ephemeral range (32768 and up by default), where
    the kernel would otherwise hand our ports to outgoing connections between this check and the bind.
    """
    while True:
        base = random.randrange(20_000, 32_000 - size)
        if all(_port_free(port) for port in range(base, base + size + 1)):
            return base


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on; the command name may hold spaces and parentheses."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


@dataclass
class Workers:
    """`python -m pipeline worker --all` in a session of its own, its output in a log file."""

    process: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    @classmethod
    def start(cls, settings: Settings, stages: Sequence[str] = ("intake", "preferences", "routing"),
              env: Mapping[str, str] | None = None, exporter: bool = False) -> Workers:
        env = {**os.environ, "NOTIFY_TOPIC_PREFIX": settings.topic_prefix,
               "NOTIFY_METRICS_PORT": str(settings.metrics_port), **(env or {})}
        log_path = settings.stack_dir / f"bench-{settings.topic_prefix.strip('.')}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("wb")
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "worker", "--all", "--stages",
                                    ",".join(stages), "--exporter" if exporter else "--no-exporter"],
                                   env=env, cwd=REPO_ROOT,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return cls(process, log_path, log)

    def alive(self) -> bool:
        return self.process.poll() is None

    def pids(self) -> list[int]:
        """The stage workers: children of the supervisor."""
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                ppid = int(_stat_fields(int(proc.name))[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.process.pid:
                found.append(int(proc.name))
        return sorted(found)

    def cpu_seconds(self) -> dict[int, float]:
        """utime + stime of each stage worker, in seconds."""
        ticks = os.sysconf("SC_CLK_TCK")
        seconds = {}
        for pid in self.pids():
            try:
                fields = _stat_fields(pid)
                seconds[pid] = (int(fields[11]) + int(fields[12])) / ticks  # fields 14 and 15 of stat(5)
            except (OSError, ValueError, IndexError):
                continue
        return seconds

    def stop(self) -> None:
        """SIGTERM to the whole process group; SIGKILL if it is not gone after STOP_TIMEOUT_S."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT_S)
        except ProcessLookupError:
            pass
        finally:
            self.log.close()


# ------------------------------------------------------------------------------------------------ reading topics


@dataclass(frozen=True, slots=True)
class Arrival:
    timestamp_ms: int  # CreateTime: when the stage produced it
    value: bytes


Classify = Callable[[str, bytes], str | None]  # (physical topic, key) -> what the record counts as, or None


class Collector:
    """Reads `physical_topics` from their current ends on, keeping the first arrival of each key per kind."""

    def __init__(self, settings: Settings, physical_topics: Iterable[str], classify: Classify) -> None:
        self.classify = classify
        self.arrivals: dict[str, dict[bytes, Arrival]] = {}
        self._consumer: Consumer = kafka.consumer(settings, f"{settings.topic_prefix}bench-reader-{uuid.uuid4().hex}")
        assignment = []
        for topic in physical_topics:
            partitions = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
            for p in partitions:
                assignment.append(TopicPartition(topic, p, kafka.end_offset(self._consumer, TopicPartition(topic, p))))
        self._consumer.assign(assignment)

    def count(self, kind: str) -> int:
        return len(self.arrivals.get(kind, {}))

    def pump(self, timeout_s: float = 0.5) -> list[Arrival]:
        """Read one batch; every record of it that counts (first arrivals and repeats alike)."""
        batch = []
        for message in self._consumer.consume(1000, timeout_s):
            if message.error() is not None:
                continue
            key = message.key() or b""
            kind = self.classify(message.topic() or "", key)
            if kind is not None:
                arrival = Arrival(message.timestamp()[1], message.value() or b"")
                self.arrivals.setdefault(kind, {}).setdefault(key, arrival)
                batch.append(arrival)
        return batch

    def until(self, done: Callable[[], bool], timeout_s: float, workers: Workers,
              progress: Callable[[], str] | None = None) -> bool:
        """Read until `done()`; False if the timeout passed or the workers exited first."""
        deadline = time.monotonic() + timeout_s
        next_report = time.monotonic() + PROGRESS_EVERY_S
        while not done():
            if time.monotonic() > deadline or not workers.alive():
                return False
            self.pump()
            if progress is not None and time.monotonic() > next_report:
                _say(f"  ... {progress()}")
                next_report = time.monotonic() + PROGRESS_EVERY_S
        return True

    def close(self) -> None:
        self._consumer.close()


def wait_ready(settings: Settings, workers: Workers, codec: serde.AvroSerde, token: str) -> None:
    """Ready when a probe of each lane has gone all the way to its `queued` delivery event."""
    events_topic = settings.topic(topics.DELIVERY_EVENTS)
    probes = Sender(settings, codec)
    queued: set[str] = set()

    def classify(_topic: str, key: bytes) -> str | None:
        return "event" if key.startswith(f"probe-{token}".encode()) else None

    collector = Collector(settings, [events_topic], classify)
    try:
        for notification_type in ("otp", "marketing"):
            probe = make_request(f"probe-{token}-{notification_type}", notification_type,
                                 ["sms"] if notification_type == "otp" else ["email"])
            probes.send(probe)
            if probes.flush():
                raise BenchError("the probe was not acknowledged by Kafka")
            probe_id = str(probe["notification_id"])
            deadline = time.monotonic() + READY_TIMEOUT_S
            while probe_id not in queued:
                if time.monotonic() > deadline or not workers.alive():
                    raise BenchError(f"the {notification_type} probe was not queued within {READY_TIMEOUT_S:.0f} s "
                                     f"(workers {'running' if workers.alive() else 'exited'}; see {workers.log_path})")
                for arrival in collector.pump(0.2):  # every event of the probes' users, not only the first
                    event = codec.decode(arrival.value, expected=serde.DELIVERY_EVENT).value
                    if event["status"] == "queued":
                        queued.add(str(event["notification_id"]))
    finally:
        collector.close()


# ------------------------------------------------------------------------------------------------ figures


@dataclass(frozen=True)
class Spread:
    """Latency percentiles of a sample, in milliseconds (nearest rank)."""

    n: int
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread | None:
        ordered = sorted(values)
        if not ordered:
            return None

        def rank(q: float) -> float:
            return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

        return cls(len(ordered), rank(0.50), rank(0.95), rank(0.99), ordered[-1])

    def row(self, label: str) -> str:
        return f"  {label:26} {self.n:>7} {self.p50:>9.0f} {self.p95:>9.0f} {self.p99:>9.0f} {self.max:>9.0f}"


SPREAD_HEADER = f"  {'latency (ms)':26} {'n':>7} {'p50':>9} {'p95':>9} {'p99':>9} {'max':>9}"


@dataclass
class ThroughputResult:
    requested: int
    produce_s: float  # producing the N requests (encoding included)
    arrived: dict[str, int]  # kind (accepted, routed, send) -> records read
    wall_s: float | None  # first produce -> last send record
    latencies: dict[tuple[Lane, str], list[float]] = field(default_factory=dict)  # (lane, stage) -> ms
    cpu_s: float | None = None
    worker_count: int = 0
    restarted: bool = False

    @property
    def complete(self) -> bool:
        return all(count >= self.requested for count in self.arrived.values())

    def render(self) -> str:
        delivered = self.arrived.get("send", 0)
        lines = ["", "phase 1: throughput and per-stage latency",
                 f"  notifications            {self.requested} ({(self.requested + 1) // 2} critical transaction "
                 f"-> sms, {self.requested // 2} bulk portfolio -> email)",
                 f"  produced in              {self.produce_s:.2f} s ({self.requested / self.produce_s:.0f}/s)",
                 "  arrived                  " + ", ".join(f"{k} {v}" for k, v in sorted(self.arrived.items()))]
        if self.wall_s:
            lines += [f"  wall time                {self.wall_s:.2f} s (first produce -> last send record)",
                      f"  throughput               {delivered / self.wall_s:.0f} notifications/s end to end"]
        if self.cpu_s is not None and delivered and self.wall_s:
            lines += [f"  worker CPU               {self.cpu_s:.1f} s over {self.worker_count} processes"
                      f"{' (a worker restarted: undercounted)' if self.restarted else ''}",
                      f"  CPU per notification     {1000 * self.cpu_s / delivered:.2f} ms",
                      f"  CPU cores used           {self.cpu_s / self.wall_s:.2f} (of {os.cpu_count()})"]
        lines.append(SPREAD_HEADER)
        for lane in LANES:
            for stage in STAGE_NAMES:
                spread = Spread.of(self.latencies.get((lane, stage), []))
                if spread is not None:
                    lines.append(spread.row(f"{lane} {stage}"))
        both = Spread.of(v for (_lane, stage), vs in self.latencies.items() if stage == "end to end" for v in vs)
        if both is not None:
            lines.append(both.row("all end to end"))
        return "\n".join(lines)


@dataclass
class BacklogResult:
    backlog: int
    otps: int
    produce_s: float  # producing the backlog
    drained: int  # bulk send records read
    drain_s: float | None  # first backlog produce -> last bulk send record
    drained_by_last_otp: int  # bulk send records stamped before the last OTP's send record
    otp_latencies: list[float]  # ms
    timed_out: bool

    @property
    def complete(self) -> bool:
        return self.drained >= self.backlog and len(self.otp_latencies) >= self.otps

    def render(self) -> str:
        lines = ["", "phase 2: OTP latency behind a bulk backlog",
                 f"  bulk backlog             {self.backlog} marketing -> email, produced in {self.produce_s:.2f} s "
                 f"({self.backlog / self.produce_s:.0f}/s)",
                 f"  OTPs                     {self.otps}, one every {OTP_INTERVAL_S * 1000:.0f} ms, "
                 f"{len(self.otp_latencies)} arrived"]
        if self.drain_s:
            state = "drained" if self.drained >= self.backlog else "NOT drained (timed out)"
            lines += [f"  bulk drain               {self.drained}/{self.backlog} {state} in {self.drain_s:.1f} s "
                      f"(first backlog produce -> last bulk send record)",
                      f"  bulk throughput          {self.drained / self.drain_s:.0f} notifications/s"]
        if self.otp_latencies:
            undrained = self.backlog - self.drained_by_last_otp
            lines.append(f"  at the last OTP's send   {self.drained_by_last_otp}/{self.backlog} of the backlog sent, "
                         f"{undrained} ({100 * undrained / self.backlog:.0f}%) still undrained")
        spread = Spread.of(self.otp_latencies)
        if spread is not None:
            lines += [SPREAD_HEADER, spread.row("otp end to end")]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ phase 1


def _lane_topics(settings: Settings) -> dict[str, tuple[str, Lane]]:
    """Physical topic -> (kind, lane) for accepted, routed and every send topic of both lanes."""
    kinds: dict[str, tuple[str, Lane]] = {}
    for lane in LANES:
        kinds[settings.topic(topics.accepted_topic(lane))] = ("accepted", lane)
        kinds[settings.topic(topics.routed_topic(lane))] = ("routed", lane)
        for channel in topics.CHANNELS:
            kinds[settings.topic(topics.send_topic(channel, lane))] = ("send", lane)
    return kinds


def _stamps(arrivals: Mapping[bytes, Arrival], codec: serde.AvroSerde, record: str) -> dict[str, int]:
    """Notification id -> record timestamp (ms), decoding each record."""
    return {str(codec.decode(a.value, expected=record).value["notification_id"]): a.timestamp_ms
            for a in arrivals.values()}


def _stage_latencies(sender: Sender, lanes: Mapping[str, Lane], collector: Collector,
                     codec: serde.AvroSerde) -> dict[tuple[Lane, str], list[float]]:
    accepted = _stamps(collector.arrivals.get("accepted", {}), codec, serde.NOTIFICATION_REQUEST)
    routed = _stamps(collector.arrivals.get("routed", {}), codec, serde.DELIVERY_TASK)
    sent = _stamps(collector.arrivals.get("send", {}), codec, serde.DELIVERY_TASK)
    latencies: dict[tuple[Lane, str], list[float]] = {}
    for notification_id, created in sender.created_ms.items():
        lane = lanes[notification_id]
        points = {"created": created, "accepted": accepted.get(notification_id),
                  "routed": routed.get(notification_id), "send": sent.get(notification_id)}
        for stage, start, end in (("intake", "created", "accepted"), ("preferences", "accepted", "routed"),
                                  ("routing", "routed", "send"), ("end to end", "created", "send")):
            begin, finish = points[start], points[end]
            if begin is not None and finish is not None:
                latencies.setdefault((lane, stage), []).append(float(finish - begin))
    return latencies


def _cpu_delta(before: Mapping[int, float], after: Mapping[int, float]) -> tuple[float, bool]:
    """CPU seconds the workers used between two samples, and whether a worker was replaced in between."""
    used = sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())
    return used, set(before) != set(after)


def run_throughput(settings: Settings, workers: Workers, codec: serde.AvroSerde, token: str,
                   count: int) -> ThroughputResult:
    kinds = _lane_topics(settings)
    prefix = f"bench-{token}-".encode()

    def classify(topic: str, key: bytes) -> str | None:
        return kinds[topic][0] if key.startswith(prefix) else None

    collector = Collector(settings, kinds, classify)
    sender = Sender(settings, codec)
    lanes: dict[str, Lane] = {}
    try:
        cpu_before = workers.cpu_seconds()
        started = time.monotonic()
        for i in range(count):
            critical = i % 2 == 0
            request = make_request(f"bench-{token}-{i}", "transaction" if critical else "portfolio",
                                   ["sms"] if critical else ["email"])
            sender.send(request)
            lanes[str(request["notification_id"])] = "critical" if critical else "bulk"
        unacknowledged = sender.flush()
        produce_s = time.monotonic() - started
        if unacknowledged:
            _say(f"  ! {unacknowledged} requests were not acknowledged by Kafka")
        _say(f"  produced {count} requests in {produce_s:.1f} s; waiting for them on the send topics")
        collector.until(lambda: collector.count("send") >= count, PHASE1_TIMEOUT_S, workers,
                        lambda: f"{collector.count('send')}/{count} sent")
        cpu_after = workers.cpu_seconds()
        collector.until(lambda: all(collector.count(k) >= count for k in ("accepted", "routed")),
                        STRAGGLERS_TIMEOUT_S, workers)
        sends = collector.arrivals.get("send", {}).values()
        wall_s = (max(a.timestamp_ms for a in sends) - (sender.first_ms or 0)) / 1000 if sends else None
        cpu_s, restarted = _cpu_delta(cpu_before, cpu_after)
        return ThroughputResult(
            requested=count, produce_s=produce_s,
            arrived={kind: collector.count(kind) for kind in ("accepted", "routed", "send")}, wall_s=wall_s,
            latencies=_stage_latencies(sender, lanes, collector, codec), cpu_s=cpu_s,
            worker_count=len(cpu_after), restarted=restarted)
    finally:
        collector.close()


# ------------------------------------------------------------------------------------------------ phase 2


def run_backlog(settings: Settings, workers: Workers, codec: serde.AvroSerde, token: str,
                backlog: int, otps: int) -> BacklogResult:
    bulk_topic = settings.topic(topics.send_topic("email", "bulk"))
    otp_topic = settings.topic(topics.send_topic("sms", "critical"))
    bulk_prefix, otp_prefix = f"backlog-{token}-".encode(), f"otp-{token}-".encode()

    def classify(topic: str, key: bytes) -> str | None:
        if topic == bulk_topic and key.startswith(bulk_prefix):
            return "bulk"
        if topic == otp_topic and key.startswith(otp_prefix):
            return "otp"
        return None

    collector = Collector(settings, [bulk_topic, otp_topic], classify)
    bulk, sender = Sender(settings, codec), Sender(settings, codec)
    try:
        started = time.monotonic()
        for i in range(backlog):
            # an hour to live: a request that waits long in the backlog is measured, not dropped as expired
            bulk.send(make_request(f"backlog-{token}-{i}", "marketing", ["email"], datetime.timedelta(hours=1)))
        if bulk.flush():
            _say("  ! part of the backlog was not acknowledged by Kafka")
        produce_s = time.monotonic() - started
        _say(f"  produced a backlog of {backlog} in {produce_s:.1f} s; now {otps} OTPs, "
             f"one every {OTP_INTERVAL_S * 1000:.0f} ms")
        otp_started = time.monotonic()
        for i in range(otps):
            time.sleep(max(0.0, otp_started + i * OTP_INTERVAL_S - time.monotonic()))
            sender.send(make_request(f"otp-{token}-{i}", "otp", ["sms"]))
        sender.flush()
        remaining = BACKLOG_TIMEOUT_S - (time.monotonic() - started)
        drained = collector.until(lambda: collector.count("bulk") >= backlog and collector.count("otp") >= otps,
                                  remaining, workers,
                                  lambda: f"{collector.count('bulk')}/{backlog} bulk sent, "
                                          f"{collector.count('otp')}/{otps} OTPs sent")
        return _backlog_result(collector, codec, sender, bulk, backlog, otps, produce_s, timed_out=not drained)
    finally:
        collector.close()


def _backlog_result(collector: Collector, codec: serde.AvroSerde, otp_sender: Sender, bulk_sender: Sender,
                    backlog: int, otps: int, produce_s: float, timed_out: bool) -> BacklogResult:
    otp_sent = _stamps(collector.arrivals.get("otp", {}), codec, serde.DELIVERY_TASK)
    otp_latencies = [float(ts - otp_sender.created_ms[nid]) for nid, ts in otp_sent.items()
                     if nid in otp_sender.created_ms]
    bulk_stamps = [a.timestamp_ms for a in collector.arrivals.get("bulk", {}).values()]
    last_otp = max(otp_sent.values(), default=None)
    by_last_otp = sum(1 for ts in bulk_stamps if last_otp is not None and ts <= last_otp)
    drain_s = (max(bulk_stamps) - (bulk_sender.first_ms or 0)) / 1000 if bulk_stamps else None
    return BacklogResult(backlog=backlog, otps=otps, produce_s=produce_s, drained=len(bulk_stamps),
                         drain_s=drain_s, drained_by_last_otp=by_last_otp, otp_latencies=otp_latencies,
                         timed_out=timed_out)


# ------------------------------------------------------------------------------------------------ the run


def _delete_prefix(settings: Settings) -> None:
    """Delete the run's topics and the consumer groups its workers and readers left behind."""
    names, groups, kept = kafka.delete_prefixed(settings, groups=True)
    _say(f"deleted {len(names)} topics and {len(groups)} consumer groups of {settings.topic_prefix}"
         + "".join(f"\n  ! could not delete group {k}" for k in kept))


def run_intake_bench(settings: Settings, *, requests: int = 20_000, backlog: int = 100_000, otps: int = 200,
                     skip_backlog: bool = False, keep_topics: bool = False) -> int:
    """Run the benchmark and print its figures; 0 when every notification arrived, 1 otherwise."""
    if requests < 1 or (not skip_backlog and (backlog < 1 or otps < 1)):
        raise BenchError("--requests, --backlog and --otps must be positive")
    token = uuid.uuid4().hex[:8]
    mine = dataclasses.replace(settings, topic_prefix=f"bench{token}.", metrics_port=free_port_block())
    codec = serde.AvroSerde()
    _say(f"bench intake: topics {mine.topic_prefix}*, workers' metrics from :{mine.metrics_port + 1}, "
         f"{os.cpu_count()} cores")
    topics.apply(mine)
    workers = Workers.start(mine)
    complete = True
    try:
        wait_ready(mine, workers, codec, token)
        _say(f"workers ready: pids {' '.join(map(str, workers.pids()))} (log {workers.log_path})")
        throughput = run_throughput(mine, workers, codec, token, requests)
        _say(throughput.render())
        complete = throughput.complete
        if not skip_backlog:
            _say("")
            result = run_backlog(mine, workers, codec, token, backlog, otps)
            _say(result.render())
            complete = complete and result.complete
    finally:
        workers.stop()
        if keep_topics:
            _say(f"\nkept the topics {mine.topic_prefix}*")
        else:
            _say("")
            _delete_prefix(mine)
    if not workers.alive() and workers.process.returncode not in (0, -signal.SIGTERM):
        _say(f"workers exited with {workers.process.returncode}; see {workers.log_path}")
    return 0 if complete else 1
