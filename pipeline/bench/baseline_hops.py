"""The hops of the raw baseline chain (`python -m pipeline.bench.baseline --hop NAME`): per hop, the batch's work
(intake, preferences, routing, sender with its provider calls, receipts) and the bare confluent-kafka loop that runs
it (`run_hop`)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import json
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parseaddr
from typing import Any
from urllib.parse import urlencode

import aiohttp
import fastavro
import psycopg
import redis.asyncio as aioredis
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from pipeline import config
from pipeline.bench.rig import BenchError
from pipeline.config import Settings
from pipeline.kafka import clients, serde, topics
from pipeline.policy.ratelimit import load_policy, rules_for
from pipeline.state import db
from pipeline.state.ratelimit import SLIDING_WINDOW_LUA

BATCH = 500
HOPS = ("intake", "preferences", "routing", "sender")


@dataclass
class Hop:
    settings: Settings
    lane: str
    codec: serde.AvroSerde
    producer: Producer
    conn: psycopg.AsyncConnection[Any]

    def schema(self, name: str) -> Any:
        return self.codec.schema(name).parsed

    def decode(self, value: bytes, name: str) -> dict[str, Any]:
        decoded: Any = fastavro.schemaless_reader(io.BytesIO(value[10:]), self.schema(name), None)
        return dict(decoded)

    def encode(self, name: str, record: dict[str, Any]) -> bytes:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, self.schema(name), record)
        return serde.SINGLE_OBJECT_MAGIC + self.codec.schema(name).fingerprint + buffer.getvalue()

    def event(self, subject: dict[str, Any], status: str, stage: str, channel: str | None = None,
              provider: str | None = None) -> tuple[str, bytes, bytes]:
        now = datetime.datetime.now(datetime.UTC)
        value = self.encode(serde.DELIVERY_EVENT, {
            "event_id": str(uuid.uuid4()), "notification_id": str(subject["notification_id"]),
            "user_id": subject["user_id"], "notification_type": subject["type"], "lane": self.lane,
            "channel": channel, "provider": provider, "status": status, "stage": stage, "attempt": 0,
            "error_code": None, "error_message": None, "occurred_at": now, "created_at": subject.get("created_at"),
            "correlation_id": None})
        return self.settings.topic(topics.DELIVERY_EVENTS), subject["user_id"].encode(), value


Output = tuple[str, bytes, bytes]  # physical topic, key, value
HopBody = Callable[[Hop, list[Message]], Awaitable[list[Output]]]


# ------------------------------------------------------------------------------------------------ the hops


INTAKE_SQL = """
INSERT INTO notifications (notification_id, user_id, notification_type, idempotency_key, lane, source_service,
                           created_at, expires_at)
SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::timestamptz[],
                     %s::timestamptz[])
ON CONFLICT DO NOTHING RETURNING notification_id::text
"""


async def intake(hop: Hop, messages: list[Message]) -> list[Output]:
    requests = [(m, hop.decode(m.value() or b"", serde.NOTIFICATION_REQUEST)) for m in messages]
    async with hop.conn.cursor() as cur:
        await cur.execute(INTAKE_SQL, (
            [r["notification_id"] for _, r in requests], [r["user_id"] for _, r in requests],
            [r["type"] for _, r in requests], [r["idempotency_key"] for _, r in requests],
            [hop.lane] * len(requests), [r["source_service"] for _, r in requests],
            [r["created_at"] for _, r in requests], [r.get("expires_at") for _, r in requests]))
        inserted = {row[0] for row in await cur.fetchall()}
    await hop.conn.commit()
    out: list[Output] = []
    accepted, dedup = hop.settings.topic(topics.accepted_topic(hop.lane)), hop.settings.topic(
        topics.dedup_topic(hop.lane))
    for message, r in requests:
        if str(r["notification_id"]) not in inserted:
            continue
        key = r["user_id"].encode()
        out.append((dedup, key, json.dumps({"id": str(r["notification_id"]), "src": "x", "at": time.time()}).encode()))
        out.append(hop.event(r, "received", "intake"))
        out.append((accepted, key, message.value() or b""))
    return out


async def preferences(hop: Hop, messages: list[Message]) -> list[Output]:
    routed = hop.settings.topic(topics.routed_topic(hop.lane))
    out: list[Output] = []
    for message in messages:
        r = hop.decode(message.value() or b"", serde.NOTIFICATION_REQUEST)
        channel = r["channels"][0]
        task = {"notification_id": r["notification_id"], "user_id": r["user_id"], "type": r["type"],
                "lane": hop.lane, "channel": channel,
                "address": r["recipient"]["phone"] if channel == "sms" else r["recipient"]["email"],
                "device_tokens": [], "template_id": r.get("template_id"), "template_params": r["template_params"],
                "content": None, "locale": "en", "attempt": 0, "created_at": r["created_at"],
                "expires_at": r.get("expires_at"), "correlation_id": None}
        out.append((routed, r["user_id"].encode(), hop.encode(serde.DELIVERY_TASK, task)))
    return out


ROUTING_SQL = """
INSERT INTO deliveries (notification_id, channel, state, task)
SELECT k.id, k.channel, 'queued', k.task FROM unnest(%s::uuid[], %s::text[], %s::bytea[]) AS k(id, channel, task)
ON CONFLICT (notification_id, channel) DO UPDATE SET state = deliveries.state
RETURNING notification_id::text, (xmax = 0)
"""
_redis: aioredis.Redis | None = None
_sha = ""
_policy = load_policy()


async def routing(hop: Hop, messages: list[Message]) -> list[Output]:
    global _redis, _sha
    if _redis is None:
        _redis = aioredis.Redis.from_url(hop.settings.redis_dsn)
        _sha = await _redis.script_load(SLIDING_WINDOW_LUA)
    policy, sha = _policy, _sha
    tasks = [(m, hop.decode(m.value() or b"", serde.DELIVERY_TASK)) for m in messages]
    pipe = _redis.pipeline(transaction=False)
    now_ms = int(time.time() * 1000)
    for _, t in tasks:
        rules = rules_for(policy, channel=t["channel"], notification_type=t["type"], lane=hop.lane)
        if rules:
            args: list[Any] = [now_ms, f"{t['notification_id']}:{t['channel']}"]
            for rule in rules:
                args += [rule.limit, rule.window_ms]
            pipe.evalsha(sha, len(rules), *[rule.key(user_id=t["user_id"], channel=t["channel"]) for rule in rules],
                         *args)
    await pipe.execute()
    async with hop.conn.cursor() as cur:
        await cur.execute(ROUTING_SQL, ([t["notification_id"] for _, t in tasks], [t["channel"] for _, t in tasks],
                                        [m.value() for m, _ in tasks]))
        await cur.fetchall()
    await hop.conn.commit()
    out: list[Output] = []
    for message, t in tasks:
        out.append((hop.settings.topic(topics.send_topic(t["channel"], hop.lane)), t["user_id"].encode(),
                    message.value() or b""))
        out.append(hop.event(t, "queued", "routing", t["channel"]))
    return out


# Each statement locks its rows in key order before it updates them: the sender's and the receipts' hops touch
# the same rows at once, and two batches locking in arbitrary orders deadlock. The keys are sorted and each one is
# probed by the primary key (a LATERAL subquery with its own FOR UPDATE is never flattened), as the pipeline's
# sender probes: a join the planner may drive from the partial state index reads the whole backlog in a spike.
def _locked(states: str, *, answers: bool = False) -> str:
    """`states`: a condition on `d.state` that no single partial index's predicate matches (a list of two states,
    or the sender's own claim condition): with statistics taken while that state was nearly empty, the planner
    would probe each key by scanning the partial index of the whole state."""
    more, names = (", %s::text[], %s::text[]", ", provider, pid") if answers else ("", "")
    return f"""WITH k AS (SELECT * FROM unnest(%s::uuid[], %s::text[]{more}) AS k(id, channel{names})
           ORDER BY id, channel),
l AS (SELECT p.notification_id, p.channel FROM k CROSS JOIN LATERAL (
        SELECT d.notification_id, d.channel FROM deliveries d
        WHERE d.notification_id = k.id AND d.channel = k.channel AND {states} FOR UPDATE) p)"""


CLAIM_SQL = _locked("(d.state = 'queued' OR (d.state = 'retry_scheduled' AND d.next_attempt_at <= now()))") + """
UPDATE deliveries d SET state = 'sending', attempt_count = d.attempt_count + 1, lease_owner = 'baseline',
    claimed_at = now(), lease_expires_at = now() + interval '60 seconds'
FROM l WHERE d.notification_id = l.notification_id AND d.channel = l.channel
RETURNING d.notification_id::text
"""
# A receipt may have overtaken the answer (the row is delivered already): it keeps its state and learns its time.
OUTCOME_SQL = _locked("d.state IN ('sending', 'delivered')", answers=True) + """
UPDATE deliveries d SET state = CASE WHEN d.state = 'sending' THEN 'accepted' ELSE d.state END,
    provider = k.provider, provider_message_id = k.pid, accepted_at = now(), lease_owner = NULL,
    lease_expires_at = NULL
FROM l JOIN k ON k.id = l.notification_id AND k.channel = l.channel
WHERE d.notification_id = l.notification_id AND d.channel = l.channel
"""
ATTEMPTS_SQL = """
INSERT INTO notification_attempts (notification_id, channel, attempt_no, provider, outcome, response_status,
    provider_message_id, started_at, finished_at, latency_ms)
SELECT k.id, k.channel, 1, k.provider, 'accepted', 200, k.pid, k.started, k.finished, k.latency
FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[], %s::int[])
    AS k(id, channel, provider, pid, started, finished, latency)
"""
_session: aiohttp.ClientSession | None = None


async def call_provider(settings: Settings, task: dict[str, Any]) -> tuple[str, str, datetime.datetime, float]:
    """One send, in the provider's wire format: (provider, its message id, started, seconds)."""
    global _session
    if _session is None:
        _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256),
                                         timeout=aiohttp.ClientTimeout(total=10))
    started, clock = datetime.datetime.now(datetime.UTC), time.perf_counter()
    nid = str(task["notification_id"])
    body_text = "Your login code is 123456. It expires in 5 minutes. Never share it."
    if task["channel"] == "sms":
        sid = settings.twilio_account_sid
        auth = "Basic " + base64.b64encode(f"{sid}:{settings.twilio_auth_token}".encode()).decode()
        form = {"To": task["address"], "From": settings.twilio_from, "Body": body_text,
                "StatusCallback": f"{settings.webhook_url('twilio')}?{urlencode({'nid': nid})}"}
        async with _session.post(f"{settings.provider_base_url('twilio')}/2010-04-01/Accounts/{sid}/Messages.json",
                                 data=urlencode(form).encode(), headers={
                                     "Authorization": auth, "Content-Type": "application/x-www-form-urlencoded"},
                                 ) as resp:
            answer = await resp.json(content_type=None)
        return "twilio", str(answer["sid"]), started, time.perf_counter() - clock
    name, address = parseaddr(settings.email_from)
    mail = {"personalizations": [{"to": [{"email": task["address"]}]}], "from": {"email": address, "name": name},
            "subject": "Portfolio update", "content": [{"type": "text/plain", "value": body_text}],
            "custom_args": {"notification_id": nid}}
    async with _session.post(f"{settings.provider_base_url('sendgrid')}/v3/mail/send", data=json.dumps(mail),
                             headers={"Authorization": f"Bearer {settings.sendgrid_api_key}",
                                      "Content-Type": "application/json"}) as resp:
        text = await resp.text()
        if resp.status != 202:
            raise BenchError(f"SendGrid answered {resp.status}: {text[:300]}")
        return "sendgrid", resp.headers["X-Message-Id"], started, time.perf_counter() - clock


async def sender(hop: Hop, messages: list[Message]) -> list[Output]:
    tasks = {str(t["notification_id"]): t for t in (hop.decode(m.value() or b"", serde.DELIVERY_TASK)
                                                    for m in messages)}
    async with hop.conn.cursor() as cur:
        await cur.execute(db.BY_KEY_PLANS)  # as the pipeline's sender: each key probed, whatever `queued` holds
        await cur.execute(CLAIM_SQL, (list(tasks), [t["channel"] for t in tasks.values()]))
        claimed = [row[0] for row in await cur.fetchall()]
    await hop.conn.commit()
    answers = await asyncio.gather(*(call_provider(hop.settings, tasks[nid]) for nid in claimed))
    finished = datetime.datetime.now(datetime.UTC)
    channels = [tasks[nid]["channel"] for nid in claimed]
    async with hop.conn.cursor() as cur:
        await cur.execute(db.BY_KEY_PLANS)
        await cur.execute(OUTCOME_SQL, (claimed, channels, [a[0] for a in answers], [a[1] for a in answers]))
        await cur.execute(ATTEMPTS_SQL, (claimed, channels, [a[0] for a in answers], [a[1] for a in answers],
                                         [a[2] for a in answers], [finished] * len(answers),
                                         [round(a[3] * 1000) for a in answers]))
    await hop.conn.commit()
    out: list[Output] = []
    for nid, (provider, _pid, _s, _l) in zip(claimed, answers, strict=True):
        out.append(hop.event(tasks[nid], "sending", "sender", tasks[nid]["channel"]))
        out.append(hop.event(tasks[nid], "accepted", "sender", tasks[nid]["channel"], provider))
    return out


RECEIPTS_SQL = _locked("d.state IN ('sending', 'accepted')", answers=True) + """
UPDATE deliveries d SET state = 'delivered', final_at = now(), provider = k.provider,
    provider_message_id = COALESCE(d.provider_message_id, k.pid)
FROM l JOIN k ON k.id = l.notification_id AND k.channel = l.channel
WHERE d.notification_id = l.notification_id AND d.channel = l.channel
RETURNING d.notification_id::text, d.channel,
          (SELECT n.user_id FROM notifications n WHERE n.notification_id = d.notification_id)
"""


async def receipts(hop: Hop, messages: list[Message]) -> list[Output]:
    found = [hop.decode(m.value() or b"", serde.PROVIDER_RECEIPT) for m in messages]
    final = [r for r in found if r["status"] == "delivered" and r.get("notification_id")]
    async with hop.conn.cursor() as cur:
        await cur.execute(RECEIPTS_SQL, ([r["notification_id"] for r in final],
                                         ["sms" if r["provider"] == "twilio" else "email" for r in final],
                                         [r["provider"] for r in final], [r["provider_message_id"] for r in final]))
        moved = await cur.fetchall()
    await hop.conn.commit()
    return [hop.event({"notification_id": nid, "user_id": user, "type": "otp"}, "delivered", "receipts", channel)
            for nid, channel, user in moved]


BODIES: dict[str, HopBody] = {"intake": intake, "preferences": preferences, "routing": routing, "sender": sender,
                              "receipts": receipts}
INPUTS: dict[str, Callable[[str], list[str]]] = {
    "intake": lambda lane: [topics.requests_topic(lane)], "preferences": lambda lane: [topics.accepted_topic(lane)],
    "routing": lambda lane: [topics.routed_topic(lane)],
    "sender": lambda lane: [topics.send_topic(ch, lane) for ch in topics.CHANNELS],
    "receipts": lambda _lane: [topics.RECEIPTS]}


async def run_hop(name: str, lane: str) -> None:
    settings = config.settings()
    consumer: Consumer = clients.consumer(settings, f"{settings.topic_prefix}baseline-{name}-{lane}")
    producer: Producer = clients.producer(settings)
    conn = await psycopg.AsyncConnection.connect(settings.dsn)
    hop = Hop(settings, lane, serde.AvroSerde(), producer, conn)
    consumer.subscribe([settings.topic(t) for t in INPUTS[name](lane)])
    stopping = threading.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    body = BODIES[name]
    batches = records = 0
    while not stopping.is_set():
        first = await asyncio.to_thread(consumer.poll, 0.5)
        if first is None:
            continue
        messages = [m for m in [first, *consumer.consume(BATCH - 1, 0)] if m.error() is None]
        if not messages:
            continue
        batches, records = batches + 1, records + len(messages)
        for topic, key, value in await body(hop, messages):
            while True:
                try:
                    producer.produce(topic, value, key)
                    break
                except BufferError:
                    producer.poll(0.05)
        await asyncio.to_thread(producer.flush, 30)
        last: dict[tuple[str, int], int] = {}
        for m in messages:
            last[(m.topic() or "", m.partition() or 0)] = (m.offset() or 0) + 1
        consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in last.items()], asynchronous=True)
    print(f"baseline {name}/{lane}: {records} records in {batches} batches", flush=True)
    consumer.close()
    await conn.close()
