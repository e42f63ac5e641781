"""Producing notification requests to Kafka: the helper for upstream services (and the ingest API's engine).

`NotificationProducer` checks a `NotificationRequest` (schemas/NotificationRequest.avsc), fills
`notification_id` (uuid4) and `created_at` (now) when absent, produces it to the lane of its type
(`requests.critical` or `requests.bulk`) keyed by the user id, and lets you await the broker's acknowledgement
(acks=all, idempotent producer: `pipeline.kafka.producer`). A request is never "sent" before Kafka holds it.

Usage (one producer per process; it is safe to share between tasks)::

    from pipeline import config
    from pipeline.kafka.upstream import NotificationProducer, ProduceError

    async with NotificationProducer(config.settings()) as producer:
        notification_id = await producer.send({
            "idempotency_key": f"login-{attempt_id}", "user_id": user.id, "type": "otp", "channels": ["sms"],
            "recipient": {"phone": user.phone}, "template_id": "otp.login", "template_params": {"code": code},
            "expires_at": now + timedelta(minutes=5), "source_service": "auth",
        })  # raises InvalidRequest (fix the request) or ProduceError (see .retryable)

`send` raises `InvalidRequest` (with one `FieldProblem` per wrong field) before anything is produced, and
`ProduceError` when Kafka did not take the request within the delivery timeout. A retry after a ProduceError
is safe when it carries the same idempotency key: the pipeline drops the duplicate (even if the first attempt
did reach Kafka after all). `send_many` produces a list and reports each item's outcome.

confluent-kafka calls delivery callbacks from whichever thread calls `poll()`: a background thread polls, and
each callback hands its result to the awaiting event loop with `call_soon_threadsafe`.

The checking itself (`normalize_request`, `InvalidRequest`, `FieldProblem`) is pipeline.policy.request_contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from confluent_kafka import KafkaError, KafkaException, Message

from pipeline import metrics
from pipeline.config import Settings
from pipeline.domain import Lane, lane_for
from pipeline.errors import NotifyError
from pipeline.kafka import clients, serde, topics
from pipeline.policy.request_contract import FieldProblem, InvalidRequest, normalize_request

log = logging.getLogger(__name__)

# Kafka must acknowledge within this (librdkafka's delivery.timeout.ms, retries included); a caller waiting
# longer than this for an OTP is better served by an error it can act on.
DELIVERY_TIMEOUT_S: Final = 10.0
# Backstop on top of the delivery timeout, should a delivery report never arrive.
ACK_GRACE_S: Final = 5.0
FLUSH_TIMEOUT_S: Final = 15.0
POLL_INTERVAL_S: Final = 0.1

ACK_SECONDS = metrics.histogram(
    "notify_produce_ack_seconds", "From produce() to the broker's acknowledgement (or failure) of a request.",
    ["lane", "outcome"], buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
PRODUCE_FAILURES = metrics.counter(
    "notify_produce_failures_total", "Requests Kafka did not take, by reason.", ["lane", "reason"])


class ProduceError(NotifyError):
    """Kafka did not take the request. `retryable`: trying again later (same idempotency key) may succeed.

    `reason`: queue_full (the producer's local queue is full: back off), delivery_failed (the broker refused or
    could not be reached before the delivery timeout), timeout (no delivery report in time), closed.
    """

    def __init__(self, message: str, *, retryable: bool, reason: str, notification_id: str | None = None) -> None:
        self.retryable = retryable
        self.reason = reason
        self.notification_id = notification_id
        super().__init__(message)


@dataclass(frozen=True)
class PreparedNotification:
    """A checked, complete request, encoded and addressed: producing it can only fail on Kafka's side."""

    notification_id: str
    lane: Lane
    topic: str
    key: bytes
    value: bytes
    request: Mapping[str, Any]


@dataclass(frozen=True)
class SendOutcome:
    notification_id: str
    lane: Lane
    error: ProduceError | None = None

    @property
    def acked(self) -> bool:
        return self.error is None


def _delivery_error(error: KafkaError, notification_id: str) -> ProduceError:
    # Timeouts, transport errors and requests purged at shutdown are Kafka being away, not the request being
    # wrong: worth retrying.
    retryable = bool(error.retriable()) or error.code() in (
        KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
        KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT)
    return ProduceError(f"Kafka did not take notification {notification_id}: {error.str()}",
                        retryable=retryable and not error.fatal(), reason="delivery_failed",
                        notification_id=notification_id)


def _closed_error(item: PreparedNotification) -> ProduceError:
    return ProduceError("the producer is closed", retryable=True, reason="closed",
                        notification_id=item.notification_id)


class ProducerClosed(NotifyError):
    """The producer was closed: it takes nothing more."""


class AckedProducer:
    """An idempotent Kafka producer whose `produce` hands back an asyncio future of the broker's answer: a thread
    polls the client, and each delivery report is passed to the loop that waits for it. Thread- and task-safe.
    Used by everything that answers a caller only once Kafka holds its record (ingest, webhooks)."""

    def __init__(self, settings: Settings, *, delivery_timeout_s: float = DELIVERY_TIMEOUT_S,
                 producer_config: Mapping[str, Any] | None = None) -> None:
        self.delivery_timeout_s = delivery_timeout_s
        timeout_ms = int(delivery_timeout_s * 1000)
        self._producer = clients.producer(settings, **{
            "delivery.timeout.ms": timeout_ms,
            "request.timeout.ms": min(timeout_ms, clients.PRODUCER_DEFAULTS["request.timeout.ms"]),
            "socket.connection.setup.timeout.ms": min(timeout_ms, 10_000),
            **(producer_config or {}),
        })
        self.closed = False  # no new records
        self._released = False  # the Kafka client is closed
        self._close_lock = threading.Lock()
        self._stop_polling = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="notify-producer-poll", daemon=True)
        self._poller.start()

    @property
    def wait_s(self) -> float:
        """How long a caller waits for an acknowledgement before giving up on it."""
        return self.delivery_timeout_s + ACK_GRACE_S

    def _poll(self) -> None:
        with contextlib.suppress(RuntimeError):  # the client was closed under us: nothing left to serve
            while not self._stop_polling.is_set():
                self._producer.poll(POLL_INTERVAL_S)  # serves delivery callbacks in this thread

    def produce(self, topic: str, key: bytes, value: bytes,
                on_settle: Callable[[KafkaError | None], None] | None = None) -> asyncio.Future[KafkaError | None]:
        """Queue one record; the future gets None once Kafka acknowledged it, or the KafkaError it failed with.
        `on_settle` runs first, in the loop's thread. Raises BufferError (the local queue is full),
        KafkaException (refused at once, e.g. too large) and ProducerClosed."""
        if self.closed:
            raise ProducerClosed("the producer is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[KafkaError | None] = loop.create_future()

        def settle(error: KafkaError | None) -> None:  # in the loop's thread
            if on_settle is not None:
                on_settle(error)
            if not future.done():  # the waiter may have given up
                future.set_result(error)

        def on_delivery(error: KafkaError | None, _message: Message) -> None:  # in the polling thread
            try:
                loop.call_soon_threadsafe(settle, error)
            except RuntimeError:  # the loop is closed: nobody waits for this result any more
                log.warning("a delivery report for %s came after its event loop closed", topic)

        try:
            self._producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
        except RuntimeError:  # closed by another thread since the check above
            raise ProducerClosed("the producer is closed") from None
        return future

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> int:
        """Wait (blocking) until queued records are acknowledged or failed; how many are still queued."""
        return 0 if self._released else int(self._producer.flush(timeout_s))

    def close(self, timeout_s: float = FLUSH_TIMEOUT_S) -> int:
        """Refuse new records, flush what is queued (bounded), fail what is left (its waiters get an error rather
        than a hang), release the client; how many records were not acknowledged."""
        with self._close_lock:
            if self._released:
                return 0
            self.closed = True
            remaining = self.flush(timeout_s)
            if remaining:
                log.error("%d record(s) unacknowledged at close: failing them", remaining)
                self._producer.purge()
                self._producer.flush(1.0)  # serves the purged records' delivery reports
            self._stop_polling.set()
            self._poller.join(timeout=POLL_INTERVAL_S * 10)
            self._producer.close()  # nothing is queued any more, so this returns at once
            self._released = True
            return remaining

    async def aclose(self, timeout_s: float = FLUSH_TIMEOUT_S) -> int:
        """`close` without blocking the event loop (delivery callbacks still reach their waiters)."""
        return await asyncio.to_thread(self.close, timeout_s)


class NotificationProducer:
    """Produces NotificationRequests and awaits their acknowledgement. Thread- and task-safe; close it when
    done (`aclose`, `close` or `async with`) so that nothing queued is lost silently."""

    def __init__(self, settings: Settings, *, delivery_timeout_s: float = DELIVERY_TIMEOUT_S,
                 codec: serde.AvroSerde | None = None, producer_config: Mapping[str, Any] | None = None) -> None:
        self._settings = settings
        self._codec = codec or serde.serde(settings)
        self._acked = AckedProducer(settings, delivery_timeout_s=delivery_timeout_s, producer_config=producer_config)

    def prepare(self, request: Mapping[str, Any]) -> PreparedNotification:
        """Check, complete, encode and address `request`; InvalidRequest if it does not fit the contract."""
        value = normalize_request(request)
        try:
            encoded = self._codec.encode(serde.NOTIFICATION_REQUEST, value)
        except serde.EncodeError as exc:  # a gap between normalize_request and the schema; still the caller's
            raise InvalidRequest([FieldProblem("", str(exc))]) from None
        lane = lane_for(value["type"])
        return PreparedNotification(value["notification_id"], lane, self._settings.topic(topics.requests_topic(lane)),
                                    value["user_id"].encode("utf-8"), encoded, value)

    async def send(self, request: Mapping[str, Any] | PreparedNotification) -> str:
        """Produce one request; its notification id once Kafka acknowledged it. InvalidRequest, ProduceError."""
        prepared = request if isinstance(request, PreparedNotification) else self.prepare(request)
        (outcome,) = await self.send_prepared([prepared])
        if outcome.error is not None:
            raise outcome.error
        return outcome.notification_id

    async def send_many(self, requests: Sequence[Mapping[str, Any]]) -> list[SendOutcome]:
        """Check every request first (InvalidRequest naming `[index].field`, and nothing produced), then produce
        all and await every acknowledgement; one outcome per request, in order. Never raises ProduceError:
        retry the items whose outcome has an error."""
        prepared: list[PreparedNotification] = []
        problems: list[FieldProblem] = []
        for index, request in enumerate(requests):
            try:
                prepared.append(self.prepare(request))
            except InvalidRequest as exc:
                problems.extend(FieldProblem(f"[{index}].{p.field}".rstrip("."), p.problem) for p in exc.problems)
        if problems:
            raise InvalidRequest(problems)
        return await self.send_prepared(prepared)

    async def send_prepared(self, items: Sequence[PreparedNotification]) -> list[SendOutcome]:
        """Produce prepared requests and await every acknowledgement (bounded); one outcome per item, in order."""
        pending: list[tuple[PreparedNotification, asyncio.Future[KafkaError | None] | ProduceError]] = [
            (item, self._produce(item)) for item in items]
        futures = [f for _, f in pending if isinstance(f, asyncio.Future)]
        if futures:
            await asyncio.wait(futures, timeout=self._acked.wait_s)
        outcomes: list[SendOutcome] = []
        for item, future in pending:
            error = future if isinstance(future, ProduceError) else self._outcome(item, future)
            if error is not None and error.reason != "delivery_failed":  # delivery failures counted on arrival
                PRODUCE_FAILURES.labels(item.lane, error.reason).inc()
            outcomes.append(SendOutcome(item.notification_id, item.lane, error))
        return outcomes

    def _outcome(self, item: PreparedNotification, future: asyncio.Future[KafkaError | None]) -> ProduceError | None:
        if not future.done():
            future.cancel()
            return ProduceError(
                f"no acknowledgement for notification {item.notification_id} within "
                f"{self._acked.wait_s:.0f} s", retryable=True, reason="timeout",
                notification_id=item.notification_id)
        error = future.result()
        return None if error is None else _delivery_error(error, item.notification_id)

    def _produce(self, item: PreparedNotification) -> asyncio.Future[KafkaError | None] | ProduceError:
        started = time.perf_counter()

        def count(error: KafkaError | None) -> None:
            outcome = "acked" if error is None else "failed"
            ACK_SECONDS.labels(item.lane, outcome).observe(time.perf_counter() - started)
            if error is not None:
                PRODUCE_FAILURES.labels(item.lane, "delivery_failed").inc()
                log.warning("notification %s not produced: %s", item.notification_id, error.str())

        try:
            return self._acked.produce(item.topic, item.key, item.value, on_settle=count)
        except BufferError:
            return ProduceError("the producer's queue is full; back off and retry", retryable=True,
                                reason="queue_full", notification_id=item.notification_id)
        except KafkaException as exc:  # e.g. a message larger than the broker accepts
            return _delivery_error(exc.args[0], item.notification_id)
        except ProducerClosed:
            return _closed_error(item)

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> int:
        """Wait (blocking) until queued requests are acknowledged or failed; how many are still queued."""
        return self._acked.flush(timeout_s)

    def close(self, timeout_s: float = FLUSH_TIMEOUT_S) -> int:
        """Refuse new requests, flush what is queued (bounded), fail what is left (its waiters get a retryable
        ProduceError rather than a hang), release the client; how many requests were not acknowledged."""
        return self._acked.close(timeout_s)

    async def aclose(self, timeout_s: float = FLUSH_TIMEOUT_S) -> int:
        """`close` without blocking the event loop (delivery callbacks still reach their waiters)."""
        return await self._acked.aclose(timeout_s)

    async def __aenter__(self) -> NotificationProducer:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
