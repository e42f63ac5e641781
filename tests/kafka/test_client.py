"""The producer helper against the real broker: acknowledged sends on the right lane, clear errors otherwise."""

from __future__ import annotations

import dataclasses
import datetime
import socket
import time
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from support.harness import lane_records

from pipeline.config import Settings
from pipeline.domain import MAX_USER_ID_LENGTH
from pipeline.kafka import serde
from pipeline.kafka.upstream import NotificationProducer, ProduceError
from pipeline.policy import intake, templates
from pipeline.policy.request_contract import InvalidRequest, normalize_request


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
        marketing_id = await producer.send(otp(f"fan-{unique}", type="marketing", channels=[],
                                                      template_id="marketing.default"))
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


def test_a_template_the_sender_could_not_render_is_refused_before_anything_is_produced() -> None:
    known = ", ".join(templates.template_ids())
    assert problems_of(otp("u", template_id="promo.nov")) == {
        "template_id": f"no template 'promo.nov'; known: {known}"}
    assert problems_of(otp("u", template_params={})) == {"template_params": "template 'otp.login' needs code"}
    assert problems_of(otp("u", template_id="transaction.debit", template_params={"amount": "5"})) == {
        "template_params": "template 'transaction.debit' needs account, currency, merchant"}
    # a locale without its own text falls back to English, whose placeholders count
    assert normalize_request(otp("u", locale="yo-NG"))["locale"] == "yo-NG"
    assert normalize_request(otp("u", locale="fr-FR", template_params={"code": "1"}))["locale"] == "fr-FR"


def test_an_sms_longer_than_the_providers_take_is_refused_when_sms_may_carry_it() -> None:
    long_code = {"code": "0" * 1600}
    assert problems_of(otp("u", template_params=long_code)) == {
        "template_params": "the SMS would be 1661 characters; SMS providers take at most 1600"}
    assert problems_of(otp("u", channels=[], content={"body": "\U0001f984" * 801}, template_id=None)) == {
        "content.body": "the SMS would be 1602 characters; SMS providers take at most 1600"}
    assert normalize_request(otp("u", channels=["email"], template_params=long_code))["channels"] == ["email"]
    assert normalize_request(otp("u", content={"body": "\U0001f984" * 800}, template_id=None))


def test_the_client_holds_a_user_id_to_the_length_intake_takes() -> None:
    longest = "u" * MAX_USER_ID_LENGTH
    assert normalize_request(otp(longest))["user_id"] == longest
    assert problems_of(otp(longest + "u")) == {"user_id": f"longer than {MAX_USER_ID_LENGTH} characters"}
    codec = serde.AvroSerde()  # what intake sees: the request as it comes off Kafka
    wire = codec.encode(serde.NOTIFICATION_REQUEST, normalize_request(otp(longest)))
    assert intake.problems(codec.decode(wire, expected=serde.NOTIFICATION_REQUEST).value) == []


@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(user_id=st.text(max_size=140), key=st.text(max_size=260), source=st.text(max_size=20),
       kind=st.sampled_from(["otp", "transaction", "security", "price_alert", "portfolio", "marketing"]),
       channels=st.lists(st.sampled_from(["sms", "email", "push"]), unique=True),
       phone=st.sampled_from([None, "", " ", "+2348012345678", "+1", "+44 20 7946 0958", "08012345678"]),
       email=st.sampled_from([None, "", "ada@example.com", "a.b+tag@sub.example.co.uk", "üñî@example.com", "a@b",
                              "@example.com", "ada@exa mple.com"]),
       body=st.one_of(st.none(), st.text(max_size=40)), subject=st.one_of(st.none(), st.text(max_size=20)),
       locale=st.one_of(st.none(), st.text(max_size=40)), expires_in_s=st.one_of(st.none(), st.integers(-60, 600)))
def test_whatever_the_client_accepts_intake_accepts(user_id: str, key: str, source: str, kind: str,
                                                     channels: list[str], phone: str | None, email: str | None,
                                                     body: str | None, subject: str | None, locale: str | None,
                                                     expires_in_s: int | None) -> None:
    """The API's and the client's rules cover intake's: a request answered 202 is never `invalid` later."""
    now = datetime.datetime.now(datetime.UTC)
    request: dict[str, Any] = {
        "idempotency_key": key, "user_id": user_id, "type": kind, "channels": channels, "source_service": source,
        "recipient": {"phone": phone, "email": email}, "locale": locale,
        "expires_at": None if expires_in_s is None else now + datetime.timedelta(seconds=expires_in_s)}
    if body is None:
        request.update(template_id=f"{kind}.default")
    else:
        request.update(content={"subject": subject, "body": body})
    try:
        value = normalize_request(request, now=now)
    except InvalidRequest:
        return
    codec = serde.AvroSerde()
    decoded = codec.decode(codec.encode(serde.NOTIFICATION_REQUEST, value), expected=serde.NOTIFICATION_REQUEST)
    assert intake.problems(decoded.value) == []


def test_a_collapse_key_is_for_non_critical_types_and_never_blank() -> None:
    assert normalize_request(otp("u", type="price_alert", template_id="price_alert.default",
                                 template_params={}, collapse_key="BTC"))["collapse_key"] == "BTC"
    assert normalize_request(otp("u"))["collapse_key"] is None
    assert problems_of(otp("u", collapse_key="login")) == {
        "collapse_key": "not for otp notifications (critical types are each delivered)"}
    assert problems_of(otp("u", type="price_alert", template_id="price_alert.default", collapse_key=" ")) == {
        "collapse_key": "must not be blank (leave it out for no collapsing)"}
