"""Avro records through a real topic of the real broker: the producer factory, the serializer and topics/ together."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError

from pipeline.config import Settings
from pipeline.errors import DecodeError
from pipeline.kafka import clients, serde, topics


def request(user_id: str, n: int) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    return {
        "notification_id": str(uuid.uuid4()),
        "idempotency_key": f"login-{n}",
        "user_id": user_id,
        "type": "otp",
        "channels": ["sms"],
        "recipient": {"phone": "+2348012345678", "email": None, "device_tokens": []},
        "template_id": "otp.login",
        "template_params": {"code": f"{n:06d}"},
        "created_at": now,
        "expires_at": now + datetime.timedelta(minutes=5),
        "source_service": "auth",
    }


def consume_all(consumer: Consumer, expected: int, timeout_s: float = 30.0) -> list[Any]:
    messages: list[Any] = []
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    while len(messages) < expected and datetime.datetime.now() < deadline:
        message = consumer.poll(0.5)
        if message is None:
            continue
        error = message.error()
        assert error is None or error.code() == KafkaError._PARTITION_EOF, error
        if error is None:
            messages.append(message)
    return messages


def test_requests_produced_to_a_real_topic_come_back_decoded_in_order_per_user(applied: Settings, unique: str) -> None:
    codec = serde.AvroSerde()
    topic = applied.topic(topics.requests_topic("critical"))
    sent = [request(f"user-{unique}-{n % 3}", n) for n in range(30)]
    producer = clients.producer(applied)
    acked: list[Any] = []
    for value in sent:
        producer.produce(topic, key=value["user_id"].encode(), value=codec.encode(serde.NOTIFICATION_REQUEST, value),
                         on_delivery=lambda err, msg: acked.append(err or msg))
    assert producer.flush(30) == 0
    assert all(not isinstance(a, KafkaError) for a in acked) and len(acked) == 30

    consumer = clients.consumer(applied, group_id=f"roundtrip-{unique}")
    consumer.subscribe([topic])
    try:
        received = consume_all(consumer, 30)
    finally:
        consumer.close()
    assert len(received) == 30
    decoded = [codec.decode(m.value(), expected=serde.NOTIFICATION_REQUEST).value for m in received]
    assert {d["notification_id"] for d in decoded} == {uuid.UUID(s["notification_id"]) for s in sent}
    # key = user id: one user's requests sit in one partition, in the order they were produced
    partitions_by_user: dict[str, set[int]] = {}
    for message, value in zip(received, decoded, strict=True):
        assert message.key().decode() == value["user_id"]
        partitions_by_user.setdefault(value["user_id"], set()).add(message.partition())
    assert all(len(p) == 1 for p in partitions_by_user.values())
    for user in partitions_by_user:
        keys = [v["idempotency_key"] for v in decoded if v["user_id"] == user]
        assert keys == [s["idempotency_key"] for s in sent if s["user_id"] == user]
    first = next(d for d in decoded if d["idempotency_key"] == "login-0")
    assert first["template_params"] == {"code": "000000"}
    assert first["expires_at"] - first["created_at"] == datetime.timedelta(minutes=5)


def test_garbage_on_a_real_topic_decodes_to_the_clear_error(applied: Settings, unique: str) -> None:
    topic = applied.topic(topics.requests_topic("bulk"))
    producer = clients.producer(applied)
    producer.produce(topic, key=b"u", value=b"\x00not avro at all")
    producer.produce(topic, key=b"u", value=b"{\"json\": true}")
    assert producer.flush(30) == 0
    consumer = clients.consumer(applied, group_id=f"garbage-{unique}")
    consumer.subscribe([topic])
    try:
        received = consume_all(consumer, 2)
    finally:
        consumer.close()
    reasons = []
    for message in received:
        with pytest.raises(DecodeError) as caught:
            serde.AvroSerde().decode(message.value())
        reasons.append(caught.value.reason)
    assert reasons == ["no_registry", "unknown_magic"]


def test_a_misspelt_topic_is_an_error_not_a_new_topic(applied: Settings) -> None:
    producer = clients.producer(applied, **{"message.timeout.ms": 3000})
    errors: list[KafkaError | None] = []
    producer.produce(applied.topic("requests.critcal"), value=b"x", on_delivery=lambda err, msg: errors.append(err))
    producer.flush(10)
    assert len(errors) == 1 and errors[0] is not None
    assert errors[0].code() in (KafkaError._MSG_TIMED_OUT, KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC)
    assert applied.topic("requests.critcal") not in clients.admin(applied).list_topics(timeout=10).topics
