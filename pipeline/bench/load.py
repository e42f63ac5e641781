"""The load of a benchmark run: requests as upstream services send them, keyed so that every record they lead to
can be traced back without decoding it, and the timelines those records leave.

Each request's user id is `<phase><index>.<token>` (phase: `i` idle OTPs, `t` the throughput burst, `k` the bulk
backlog, `o` the OTPs sent while it drains): every stage keys its output by user id, so the key of a record on any
topic says which request it came from. Timelines are arrays indexed by request (8 bytes per request and point), so
a run of a million requests keeps its memory bounded.
"""

from __future__ import annotations

import array
import datetime
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.config import Settings
from pipeline.domain import LANES, lane_for
from pipeline.kafka import clients, serde, topics

PHASES = ("i", "t", "k", "o")
# The points of a request's way, in order; `created` is set by the bench, the topic points by each stage's
# producer (CreateTime), `provider` and `delivered` from the deliveries table.
POINTS = ("created", "accepted", "routed", "send", "provider", "delivered")
STAGE_SPANS = (("intake", "created", "accepted"), ("preferences", "accepted", "routed"),
               ("routing", "routed", "send"), ("sender", "send", "provider"),
               ("end to end", "created", "provider"))
PRODUCE_FLUSH_TIMEOUT_S = 120.0


def user_id(phase: str, index: int, token: str) -> str:
    return f"{phase}{index}.{token}"


def parse_user(key: bytes | str) -> tuple[str, int] | None:
    """(phase, index) of a bench user id; None for anything else (probes, strangers)."""
    text = key.decode(errors="replace") if isinstance(key, bytes) else key
    head, _, _token = text.partition(".")
    if len(head) < 2 or head[0] not in PHASES or not head[1:].isdigit():
        return None
    return head[0], int(head[1:])


def request(phase: str, index: int, token: str, notification_type: str, *,
            ttl: datetime.timedelta = datetime.timedelta(hours=1)) -> dict[str, Any]:
    """A NotificationRequest as an upstream service sends it: an OTP or a transaction alert by SMS, anything of the
    bulk lane by email."""
    now = datetime.datetime.now(datetime.UTC)
    critical = lane_for(notification_type) == "critical"
    template, params = {"otp": ("otp.login", {"code": f"{index % 1_000_000:06d}"})}.get(
        notification_type, (f"{notification_type}.default", {}))
    return {
        "notification_id": uuid.uuid4(),
        "idempotency_key": uuid.uuid4().hex,
        "user_id": user_id(phase, index, token),
        "type": notification_type,
        "channels": ["sms"] if critical else ["email"],
        "recipient": {"phone": f"+23480{index % 100_000_000:08d}", "email": f"user{index}@example.com",
                      "device_tokens": []},
        "template_id": template,
        "template_params": params,
        "created_at": now.replace(microsecond=now.microsecond // 1000 * 1000),
        "expires_at": now + ttl,
        "source_service": "bench",
    }


def as_json(req: Mapping[str, Any]) -> dict[str, Any]:
    """The request as the ingest API takes it."""
    return {**req, "notification_id": str(req["notification_id"]), "created_at": req["created_at"].isoformat(),
            "expires_at": req["expires_at"].isoformat()}


@dataclass
class Timeline:
    """When each request of a phase reached each point (epoch ms; NaN: not seen)."""

    size: int
    points: dict[str, array.array[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for point in POINTS:
            self.points[point] = array.array("d", [math.nan]) * self.size

    def set(self, point: str, index: int, ms: float) -> None:
        if 0 <= index < self.size:
            values = self.points[point]
            if math.isnan(values[index]):  # the first arrival counts (a redelivery does not move it)
                values[index] = ms

    def count(self, point: str) -> int:
        return sum(1 for v in self.points[point] if not math.isnan(v))

    def spans(self, start: str, end: str, indices: Iterable[int] | None = None) -> list[float]:
        a, b = self.points[start], self.points[end]
        chosen = range(self.size) if indices is None else indices
        return [b[i] - a[i] for i in chosen if not (math.isnan(a[i]) or math.isnan(b[i]))]


class KafkaLoad:
    """Produces requests to requests.<lane of their type>, keyed by user id, as fast as the broker takes them."""

    def __init__(self, settings: Settings, codec: serde.AvroSerde) -> None:
        self.settings = settings
        self.codec = codec
        self.producer: Producer = clients.producer(settings, **{"linger.ms": 20, "batch.num.messages": 10_000})
        self._topics = {lane: settings.topic(topics.requests_topic(lane)) for lane in LANES}

    def send(self, req: Mapping[str, Any]) -> None:
        value = self.codec.encode(serde.NOTIFICATION_REQUEST, req, trusted=True)
        topic = self._topics[lane_for(req["type"])]
        while True:
            try:
                self.producer.produce(topic, value, req["user_id"].encode())
                break
            except BufferError:  # the local queue is full: let deliveries drain, then try again
                self.producer.poll(0.05)
        self.producer.poll(0)

    def flush(self) -> int:
        remaining: int = self.producer.flush(PRODUCE_FLUSH_TIMEOUT_S)
        return remaining


# ------------------------------------------------------------------------------------------------ reading topics


class TopicClock(threading.Thread):
    """Reads the accepted, routed and send topics of both lanes from their current ends, in a thread, and stamps
    each bench request's timeline with the CreateTime of the first record of it seen at each point."""

    def __init__(self, settings: Settings, timelines: Mapping[str, Timeline]) -> None:
        super().__init__(daemon=True, name="bench-topic-clock")
        self.timelines = timelines
        self.point_of: dict[str, str] = {}
        for lane in LANES:
            self.point_of[settings.topic(topics.accepted_topic(lane))] = "accepted"
            self.point_of[settings.topic(topics.routed_topic(lane))] = "routed"
            for channel in topics.CHANNELS:
                self.point_of[settings.topic(topics.send_topic(channel, lane))] = "send"
        self._consumer: Consumer = clients.consumer(settings, f"{settings.topic_prefix}bench-clock-{uuid.uuid4().hex}")
        assignment = []
        for topic in self.point_of:
            partitions = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
            for p in partitions:
                tp = TopicPartition(topic, p)
                assignment.append(TopicPartition(topic, p, clients.end_offset(self._consumer, tp)))
        self._consumer.assign(assignment)
        self._stopping = threading.Event()
        self.read = 0

    def run(self) -> None:
        while not self._stopping.is_set():
            for message in self._consumer.consume(2000, 0.2):
                if message.error() is not None:
                    continue
                parsed = parse_user(message.key() or b"")
                if parsed is None or parsed[0] not in self.timelines:
                    continue
                self.read += 1
                self.timelines[parsed[0]].set(self.point_of[message.topic() or ""], parsed[1],
                                              float(message.timestamp()[1]))
        self._consumer.close()

    def stop(self) -> None:
        self._stopping.set()
        self.join(10)


# ------------------------------------------------------------------------------------------------ the database


TIMES = """
SELECT n.user_id, extract(epoch FROM d.accepted_at) * 1000, extract(epoch FROM d.final_at) * 1000, d.state
FROM deliveries d JOIN notifications n USING (notification_id)
WHERE n.user_id LIKE %s
"""


def stamp_from_db(conn: Any, timelines: Mapping[str, Timeline], token: str) -> dict[str, dict[str, int]]:
    """Stamp `provider` (accepted_at) and `delivered` (final_at of delivered rows) from the deliveries table,
    streamed; the count of rows per phase and state."""
    states: dict[str, dict[str, int]] = {}
    with conn.cursor(name=f"bench-times-{uuid.uuid4().hex[:8]}") as cursor:
        cursor.itersize = 20_000
        cursor.execute(TIMES, (f"%.{token}",))
        for user, accepted_ms, final_ms, state in cursor:
            parsed = parse_user(user)
            if parsed is None or parsed[0] not in timelines:
                continue
            phase, index = parsed
            counts = states.setdefault(phase, {})
            counts[state] = counts.get(state, 0) + 1
            if accepted_ms is not None:
                timelines[phase].set("provider", index, float(accepted_ms))
            if state == "delivered" and final_ms is not None:
                timelines[phase].set("delivered", index, float(final_ms))
    return states


def now_ms() -> float:
    return time.time() * 1000


def per_second(stamps: Iterable[float], origin_ms: float) -> list[int]:
    """How many stamps fell in each second after `origin_ms`."""
    counts: list[int] = []
    for ms in stamps:
        if math.isnan(ms):
            continue
        second = int((ms - origin_ms) // 1000)
        if second < 0:
            continue
        if second >= len(counts):
            counts.extend([0] * (second + 1 - len(counts)))
        counts[second] += 1
    return counts


def lanes_of(phase: str, size: int) -> Callable[[int], str]:
    """The lane of request `index` of a phase (the throughput burst alternates critical and bulk)."""
    if phase == "t":
        return lambda index: "critical" if index % 2 == 0 else "bulk"
    lane = "bulk" if phase == "k" else "critical"
    return lambda _index: lane


def indices_by_lane(phase: str, size: int) -> dict[str, Sequence[int]]:
    if phase == "t":
        return {"critical": range(0, size, 2), "bulk": range(1, size, 2)}
    return {("bulk" if phase == "k" else "critical"): range(size)}
