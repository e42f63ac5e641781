"""A running pipeline for end-to-end tests: topics under a prefix of its own, `notify worker --all` as a real
process tree, and readers of what came out (delivery events, send topics, the quarantine topic, the ledger)."""

from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from pipeline.api import create_app
from pipeline.bench.rig import free_port_block
from pipeline.config import Settings
from pipeline.domain import STAGES, Lane
from pipeline.kafka import clients, serde, topics
from pipeline.kafka.upstream import NotificationProducer
from pipeline.stages.worker import metrics_port
from pipeline.state import db

REPO = Path(__file__).resolve().parents[2]


class TopicReader:
    """Reads one topic from the beginning in a thread, keeping every record (decoded when it is ours)."""

    def __init__(self, settings: Settings, logical_topic: str) -> None:
        self.records: list[Any] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._consumer: Consumer = clients.consumer(settings, f"reader-{uuid.uuid4().hex[:8]}")
        self._consumer.subscribe([settings.topic(logical_topic)])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._consumer.poll(0.2)
            if message is None or message.error() is not None:
                continue
            with self._lock:
                self.records.append(message)
        self._consumer.close()

    def snapshot(self) -> list[Any]:
        with self._lock:
            return list(self.records)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclasses.dataclass
class Pipeline:
    settings: Settings
    process: subprocess.Popen[bytes]
    events: TopicReader
    codec: serde.AvroSerde = dataclasses.field(default_factory=serde.AvroSerde)

    # --- input -----------------------------------------------------------------------------------------------
    def request(self, user_id: str, notification_type: str = "otp", **fields: Any) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.UTC)
        value: dict[str, Any] = {
            "notification_id": str(uuid.uuid4()),
            "idempotency_key": uuid.uuid4().hex,
            "user_id": user_id,
            "type": notification_type,
            "channels": ["sms"],
            "recipient": {"phone": "+2348012345678", "email": "ada@example.com", "device_tokens": []},
            "template_id": f"{notification_type}.default",
            "template_params": {},
            "created_at": now,
            "expires_at": now + datetime.timedelta(minutes=10),
            "source_service": "e2e",
        }
        value.update(fields)
        return value

    def produce(self, *requests: dict[str, Any], raw: bytes | None = None, lane: str = "critical",
                headers: dict[str, str | bytes | None] | None = None) -> None:
        producer = clients.producer(self.settings)
        for request in requests:
            topic = topics.requests_topic("critical" if request["type"] in ("otp", "security", "transaction")
                                          else "bulk")
            producer.produce(self.settings.topic(topic), key=request["user_id"].encode(),
                             value=self.codec.encode(serde.NOTIFICATION_REQUEST, request), headers=headers)
        if raw is not None:
            producer.produce(self.settings.topic(topics.requests_topic(lane)), key=b"garbage", value=raw)
        assert producer.flush(30) == 0

    def put_settings(self, user_settings: dict[str, Any]) -> None:
        producer = clients.producer(self.settings)
        producer.produce(self.settings.topic(topics.USER_SETTINGS), key=user_settings["user_id"].encode(),
                         value=self.codec.encode(serde.USER_SETTINGS, user_settings))
        assert producer.flush(30) == 0

    # --- output ----------------------------------------------------------------------------------------------
    def events_for(self, notification_id: str) -> list[dict[str, Any]]:
        decoded = (self.codec.decode(m.value(), expected=serde.DELIVERY_EVENT).value for m in self.events.snapshot())
        return [e for e in decoded if str(e["notification_id"]) == notification_id]

    def statuses(self, notification_id: str) -> list[str]:
        return [e["status"] for e in self.events_for(notification_id)]

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return
            assert self.process.poll() is None, "the workers exited"
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")

    def deliveries(self, notification_id: str) -> list[tuple[str, str, str | None]]:
        with db.connect(self.settings) as conn:
            rows = conn.execute(
                "SELECT channel, state, last_error_code FROM deliveries WHERE notification_id = %s ORDER BY channel",
                (notification_id,)).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def metric(self, stage: str, lane: str, name: str, **labels: str) -> float:
        """Sum of the samples of `name` matching `labels` on one worker's /metrics."""
        url = f"http://127.0.0.1:{metrics_port(self.settings, stage, cast(Lane, lane))}/metrics"
        try:
            text = urllib.request.urlopen(url, timeout=2).read().decode()
        except OSError:
            return 0.0
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{"):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def worker_pid(self, stage: str, lane: str) -> int:
        """The pid of one stage worker (a child of the `--all` supervisor)."""
        wanted = ["--stage", stage, "--lane", lane]
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                argv = (proc / "cmdline").read_bytes().decode().split("\0")
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.process.pid and all(part in argv for part in wanted):
                return int(proc.name)
        raise AssertionError(f"no worker process for {stage}/{lane}")


Client = TestClient[web.Request, web.Application]


@asynccontextmanager
async def serving(settings: Settings, producer: NotificationProducer | None = None, **options: Any
                  ) -> AsyncIterator[Client]:
    """The API app on a local port, with a client."""
    try:
        async with TestClient(TestServer(create_app(settings, producer=producer, **options))) as client:
            yield client
    finally:
        await db.close_async_pools()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def read_topic(settings: Settings, logical_topic: str, timeout_s: float = 5.0) -> list[Any]:
    """Everything on a topic right now (from the beginning)."""
    reader = TopicReader(settings, logical_topic)
    time.sleep(timeout_s)
    reader.close()
    return reader.snapshot()


def start_pipeline(settings: Settings, prefix: str, env: dict[str, str] | None = None,
                   stages: tuple[str, ...] = ("intake", "preferences", "routing"),
                   ) -> Generator[Pipeline, None, None]:
    """Topics under `prefix`, the workers of `stages` running (with `env` added to their environment); everything
    stopped and deleted afterwards. Without the sender, deliveries stop at `queued`."""
    mine = dataclasses.replace(settings, topic_prefix=prefix, metrics_port=free_port_block())
    topics.apply(mine)
    env = {**os.environ, "NOTIFY_TOPIC_PREFIX": prefix, "NOTIFY_METRICS_PORT": str(mine.metrics_port), **(env or {})}
    log = open(mine.stack_dir / f"e2e-{prefix.strip('.')}.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "worker", "--all", "--stages", ",".join(stages)],
                               env=env, cwd=REPO,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pipeline = Pipeline(settings=mine, process=process, events=TopicReader(mine, topics.DELIVERY_EVENTS))
    try:
        # ready when a probe of each lane went through routing (`queued`, or `deferred` when Redis is down):
        # every lane's groups have joined by then
        for lane_type in ("otp", "portfolio"):
            probe = pipeline.request(f"probe-{uuid.uuid4().hex[:8]}", lane_type)
            pipeline.produce(probe)
            probe_id = probe["notification_id"]
            pipeline.wait_for(lambda: bool({"queued", "deferred"} & set(pipeline.statuses(probe_id))),  # noqa: B023
                              120, f"the {lane_type} probe to pass routing")
        yield pipeline
    finally:
        pipeline.events.close()
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
        clients.delete_prefixed(mine)


def lane_records(settings: Settings, lane: str) -> list[Any]:
    """Every record on the lane's request topic (the topic is this test's own, so these are ours)."""
    return topic_records(settings, topics.requests_topic(lane))


def topic_records(settings: Settings, logical_topic: str) -> list[Any]:
    """Every record on a topic, up to the end offsets it has now (asserted: none missing)."""
    topic = settings.topic(logical_topic)
    consumer = clients.consumer(settings, group_id=f"reader-{uuid.uuid4().hex}")
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        expected = sum(clients.end_offset(consumer, TopicPartition(topic, p)) for p in partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        records: list[Any] = []
        deadline = time.monotonic() + 30
        while len(records) < expected and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                records.append(message)
        assert len(records) == expected
        return records
    finally:
        consumer.close()


__all__ = ["STAGES", "Client", "Pipeline", "bearer", "free_port_block", "lane_records", "read_topic", "serving",
           "start_pipeline", "topic_records"]


class TcpForwarder:
    """A loopback TCP forwarder to a real server (PostgreSQL, say), run in a thread of its own: `cut()` drops every
    connection and refuses new ones, `mend()` forwards again. What a process sees when its database goes away,
    without stopping the database every other test shares."""

    def __init__(self, target_port: int) -> None:
        import asyncio

        self._asyncio = asyncio
        self._target_port = target_port
        self._loop = asyncio.new_event_loop()
        self._server: Any = None
        self._writers: set[Any] = set()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.mend()

    def _call(self, coroutine: Any) -> Any:
        return self._asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    async def _pipe(self, reader: Any, writer: Any, passes: Callable[[bytes], bool] | None = None) -> None:
        """Forward until either side closes; `passes` sees each chunk first, and False ends the pipe there."""
        try:
            while data := await reader.read(65536):
                if passes is not None and not passes(data):
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _accept(self, reader: Any, writer: Any) -> None:
        try:
            upstream_reader, upstream_writer = await self._asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, upstream_writer}
        await self._relay(reader, writer, upstream_reader, upstream_writer)

    async def _relay(self, reader: Any, writer: Any, upstream_reader: Any, upstream_writer: Any) -> None:
        await self._asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))

    async def _start(self) -> None:
        if self._server is None:
            self._server = await self._asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    def cut(self) -> None:
        self._call(self._stop())

    def mend(self) -> None:
        self._call(self._start())

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class CommitAnswerLoser(TcpForwarder):
    """A forwarder to PostgreSQL that, when armed, lets a transaction commit and loses the answer: in a transaction
    whose statements carried `marker`, the COMMIT reaches the server, the server's reply is read and thrown away,
    and the client's connection is broken. The client cannot tell whether its transaction committed; it did."""

    def __init__(self, target_port: int, marker: bytes) -> None:
        self.marker = marker
        self.armed = 0  # how many more commit answers to lose
        self.lost = 0  # how many were lost
        super().__init__(target_port)

    def arm(self, count: int = 1) -> None:
        self.armed = count

    async def _relay(self, reader: Any, writer: Any, upstream_reader: Any, upstream_writer: Any) -> None:
        state = {"marked": False, "swallowing": False}

        def to_server(data: bytes) -> bool:
            if self.armed > 0 and self.marker in data:
                state["marked"] = True  # this transaction is the one
            if b"COMMIT\x00" in data or b"ROLLBACK\x00" in data:
                if state["marked"] and b"COMMIT\x00" in data and self.armed > 0:
                    self.armed -= 1
                    state["swallowing"] = True
                state["marked"] = False
            return True

        def to_client(data: bytes) -> bool:
            if state["swallowing"] and b"COMMIT\x00" in data:  # CommandComplete of the COMMIT: it committed
                self.lost += 1
                writer.transport.abort()
                upstream_writer.close()
                return False
            return True

        await self._asyncio.gather(self._pipe(reader, upstream_writer, to_server),
                                   self._pipe(upstream_reader, writer, to_client))
