"""The producer helper against the real broker: acknowledged sends on the right lane, clear errors otherwise."""

from __future__ import annotations

import dataclasses
import datetime
import socket
import time
import uuid
from typing import Any

import pytest
from harness import lane_records

from pipeline import serde
from pipeline.client import InvalidRequest, NotificationProducer, ProduceError, normalize_request
from pipeline.config import Settings


@pytest.fixture
def unreachable(settings: Settings) -> Settings:
    """Settings whose Kafka is a closed port on this machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return dataclasses.replace(settings, kafka_bootstrap_servers=f"127.0.0.1:{port}")


def otp(user_id: str, **overrides: Any) -> dict[str, Any]:
    return {"idempotency_key": f"login-{uuid.uuid4().hex[:8]}", "user_id": user_id, "type": "otp",
            "channels": ["sms"], "recipient": {"phone": "+2348012345678"}, "template_id": "otp.login",
            "template_params": {"code": "123456"}, "source_service": "auth", **overrides}



async def test_send_returns_the_id_once_the_broker_holds_the_request_keyed_by_user_on_its_lane(
        applied: Settings, unique: str) -> None:
    async with NotificationProducer(applied) as producer:
        otp_id = await producer.send(otp(f"user-{unique}"))
        # Counted right after send returned: the acknowledgement came first.
        critical = lane_records(applied, "critical")
        marketing_id = await producer.send(otp(f"fan-{unique}", type="marketing", channels=[], template_id="promo"))
    bulk = lane_records(applied, "bulk")
    assert len(critical) == 1 and len(bulk) == 1
    codec = serde.AvroSerde()
    for record, notification_id, user in ((critical[0], otp_id, f"user-{unique}"), (bulk[0], marketing_id,
                                                                                    f"fan-{unique}")):
        value = codec.decode(record.value(), expected=serde.NOTIFICATION_REQUEST).value
        assert record.key() == user.encode()
        assert value["notification_id"] == uuid.UUID(notification_id)
        assert uuid.UUID(notification_id).version == 4
        age = datetime.datetime.now(datetime.UTC) - value["created_at"]
        assert datetime.timedelta(0) <= age < datetime.timedelta(seconds=60)
    assert codec.decode(critical[0].value()).value["recipient"]["phone"] == "+2348012345678"


async def test_send_many_acknowledges_every_request_and_reports_outcomes_in_order(
        applied: Settings, unique: str) -> None:
    ids = [str(uuid.uuid4()) for _ in range(5)]
    kinds = ["otp", "marketing", "security", "price_alert", "transaction"]
    requests = [otp(f"user-{unique}-{n}", notification_id=ids[n], type=kinds[n]) for n in range(5)]
    async with NotificationProducer(applied) as producer:
        outcomes = await producer.send_many(requests)
    assert [o.notification_id for o in outcomes] == ids
    assert all(o.acked for o in outcomes)
    assert [o.lane for o in outcomes] == ["critical", "bulk", "critical", "bulk", "critical"]
    assert len(lane_records(applied, "critical")) == 3
    assert len(lane_records(applied, "bulk")) == 2


async def test_send_many_with_one_invalid_request_names_it_and_produces_nothing(
        applied: Settings, unique: str) -> None:
    requests = [otp(f"user-{unique}"), otp(f"user-{unique}", recipient={"phone": "08012345678"})]
    async with NotificationProducer(applied) as producer:
        with pytest.raises(InvalidRequest) as caught:
            await producer.send_many(requests)
    assert [(p.field, p.problem.startswith("not E.164")) for p in caught.value.problems] == [
        ("[1].recipient.phone", True)]
    assert lane_records(applied, "critical") == []


async def test_unreachable_kafka_is_a_retryable_produce_error_within_the_delivery_timeout(
        unreachable: Settings, unique: str) -> None:
    producer = NotificationProducer(unreachable, delivery_timeout_s=1.5)
    started = time.monotonic()
    try:
        with pytest.raises(ProduceError) as caught:
            await producer.send(otp(f"user-{unique}"))
    finally:
        producer.close(timeout_s=1)
    assert caught.value.retryable
    assert caught.value.reason == "delivery_failed"
    assert caught.value.notification_id is not None
    assert time.monotonic() - started < 6


async def test_a_full_local_queue_is_a_retryable_queue_full_error_for_the_item_that_did_not_fit(
        unreachable: Settings, unique: str) -> None:
    producer = NotificationProducer(unreachable, delivery_timeout_s=1.0,
                                    producer_config={"queue.buffering.max.messages": 1})
    try:
        outcomes = await producer.send_many([otp(f"user-{unique}"), otp(f"user-{unique}")])
    finally:
        producer.close(timeout_s=1)
    assert outcomes[1].error is not None and outcomes[1].error.reason == "queue_full"
    assert outcomes[1].error.retryable
    assert outcomes[0].error is not None and outcomes[0].error.reason == "delivery_failed"


async def test_a_closed_producer_refuses_new_requests_as_retryable(settings: Settings, unique: str) -> None:
    producer = NotificationProducer(settings)
    await producer.aclose()
    with pytest.raises(ProduceError) as caught:
        await producer.send(otp(f"user-{unique}"))
    assert caught.value.reason == "closed" and caught.value.retryable


def problems_of(request: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidRequest) as caught:
        normalize_request(request)
    return {p.field: p.problem for p in caught.value.problems}


def test_normalizing_fills_the_id_the_creation_time_and_every_schema_default() -> None:
    now = datetime.datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=datetime.UTC)
    value = normalize_request(otp("u1", recipient=None, channels=None), now=now)
    assert uuid.UUID(value["notification_id"]).version == 4
    assert value["created_at"] == now.replace(microsecond=123000)
    assert value["recipient"] == {"phone": None, "email": None, "device_tokens": []}
    assert (value["channels"], value["locale"], value["content"], value["expires_at"]) == ([], "en", None, None)


def test_every_wrong_field_is_named_at_once() -> None:
    problems = problems_of(otp("", type="sms", channels=["sms", "fax", "sms"], notes="x",
                               recipient={"phone": "+1", "email": "a@b", "device_tokens": [{"platform": "nokia"}]},
                               template_params={"code": 123456}, created_at=datetime.datetime(2026, 1, 1)))
    assert problems == {
        "notes": "unknown field",
        "user_id": "must not be empty",
        "type": "must be one of otp, transaction, security, price_alert, portfolio, marketing",
        "channels[1]": "must be one of sms, email, push",
        "channels[2]": "sms is listed twice",
        "recipient.phone": "not E.164 (e.g. +2348012345678)",
        "recipient.email": "not an email address",
        "recipient.device_tokens[0].platform": "must be one of android, ios, web",
        "recipient.device_tokens[0].token": "required",
        "template_params.code": "must be a string",
        "created_at": "must carry a time zone offset",
    }


def test_a_request_needs_exactly_one_of_template_and_content_and_a_future_expiry() -> None:
    now = datetime.datetime.now(datetime.UTC)
    assert problems_of(otp("u", content={"body": "hi"})) == {
        "template_id": "give exactly one of template_id and content"}
    assert problems_of(otp("u", template_id=None)) == {"template_id": "give exactly one of template_id and content"}
    assert problems_of(otp("u", created_at=now, expires_at=now - datetime.timedelta(seconds=1))) == {
        "expires_at": "must be later than created_at"}
    old = now - datetime.timedelta(hours=1)
    assert problems_of(otp("u", created_at=old, expires_at=old + datetime.timedelta(minutes=5))) == {
        "expires_at": "already passed: the notification would never be sent"}
