"""The ingest API against the real broker and database: 202 only after Kafka acknowledged, exact 4xx otherwise."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY
from support.harness import bearer, lane_records, serving

from pipeline.api import run_api
from pipeline.config import Settings
from pipeline.kafka import serde
from pipeline.kafka.upstream import NotificationProducer


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])



def otp(user_id: str, **overrides: Any) -> dict[str, Any]:
    return {"idempotency_key": f"login-{uuid.uuid4().hex[:8]}", "user_id": user_id, "type": "otp",
            "channels": ["sms"], "recipient": {"phone": "+2348012345678"}, "template_id": "otp.login",
            "template_params": {"code": "123456"}, "expires_at": "2099-01-01T00:05:00Z", **overrides}


async def test_a_posted_otp_is_answered_202_only_once_kafka_holds_it_on_the_critical_lane(
        applied: Settings, api_key: str, unique: str) -> None:
    async with serving(applied) as client:
        response = await client.post("/v1/notifications", json=otp(f"user-{unique}", correlation_id="c-1"),
                                     headers=bearer(api_key))
        assert response.status == 202, await response.text()
        notification_id = (await response.json())["notification_id"]
        # Read right after the 202: the record is already there.
        (record,) = lane_records(applied, "critical")
    assert lane_records(applied, "bulk") == []
    assert record.key() == f"user-{unique}".encode()
    value = serde.AvroSerde().decode(record.value(), expected=serde.NOTIFICATION_REQUEST).value
    assert value["notification_id"] == uuid.UUID(notification_id)
    assert value["source_service"] == f"test-{unique}"  # defaulted from the API key
    assert value["expires_at"].isoformat() == "2099-01-01T00:05:00+00:00"
    assert (value["type"], value["correlation_id"]) == ("otp", "c-1")


async def test_a_marketing_notification_goes_to_the_bulk_lane_with_the_api_key_header(
        applied: Settings, api_key: str, unique: str) -> None:
    async with serving(applied) as client:
        response = await client.post("/v1/notifications", headers={"X-API-Key": api_key},
                                     json=otp(f"fan-{unique}", type="marketing", source_service="growth"))
        assert response.status == 202, await response.text()
    (record,) = lane_records(applied, "bulk")
    assert lane_records(applied, "critical") == []
    assert record.key() == f"fan-{unique}".encode()
    assert serde.AvroSerde().decode(record.value()).value["source_service"] == "growth"


async def test_malformed_json_is_400_and_a_bad_phone_is_422_naming_the_field(
        applied: Settings, api_key: str, unique: str) -> None:
    async with serving(applied) as client:
        malformed = await client.post("/v1/notifications", data=b'{"user_id": "u",', headers=bearer(api_key))
        bad_phone = await client.post("/v1/notifications", headers=bearer(api_key),
                                      json=otp(f"user-{unique}", recipient={"phone": "0801 234 5678"}))
        several = await client.post("/v1/notifications", headers=bearer(api_key),
                                    json=otp("u", type="sms", created_at="yesterday", extra=1))
        assert malformed.status == 400
        assert "not well-formed JSON" in (await malformed.json())["error"]
        assert bad_phone.status == 422
        assert (await bad_phone.json())["details"] == [
            {"field": "recipient.phone", "problem": "not E.164 (e.g. +2348012345678)"}]
        assert several.status == 422
        assert {d["field"] for d in (await several.json())["details"]} == {"type", "created_at", "extra"}
    assert lane_records(applied, "critical") == []


async def test_a_missing_malformed_or_unknown_key_is_401(settings: Settings, api_key: str) -> None:
    unknown = "nk_000000000000_" + "A" * 43
    wrong_secret = api_key[: -43] + "B" * 43
    async with serving(settings) as client:
        for headers in ({}, bearer("not-a-key"), bearer(unknown), bearer(wrong_secret), {"X-API-Key": unknown}):
            response = await client.post("/v1/notifications", json=otp("u"), headers=headers)
            assert response.status == 401, headers
            assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_a_batch_is_accepted_with_ids_in_order_and_exactly_its_records_on_the_lanes(
        applied: Settings, api_key: str, unique: str) -> None:
    ids = [str(uuid.uuid4()) for _ in range(5)]
    kinds = ["otp", "marketing", "security", "portfolio", "transaction"]
    batch = [otp(f"user-{unique}-{n}", notification_id=ids[n], type=kinds[n]) for n in range(5)]
    async with serving(applied) as client:
        response = await client.post("/v1/notifications:batch", json={"notifications": batch},
                                     headers=bearer(api_key))
        assert response.status == 202, await response.text()
        assert (await response.json())["notification_ids"] == ids
    critical, bulk = lane_records(applied, "critical"), lane_records(applied, "bulk")
    assert sorted(r.key() for r in critical) == [f"user-{unique}-{n}".encode() for n in (0, 2, 4)]
    assert sorted(r.key() for r in bulk) == [f"user-{unique}-{n}".encode() for n in (1, 3)]


async def test_a_batch_with_one_invalid_item_is_422_naming_it_and_nothing_is_produced(
        applied: Settings, api_key: str, unique: str) -> None:
    batch = [otp(f"user-{unique}"), otp(f"user-{unique}"), otp(f"user-{unique}", recipient={"phone": "+0"})]
    repeated = [otp(f"user-{unique}", idempotency_key="same"), otp(f"user-{unique}", idempotency_key="same")]
    async with serving(applied) as client:
        response = await client.post("/v1/notifications:batch", json={"notifications": batch},
                                     headers=bearer(api_key))
        duplicate = await client.post("/v1/notifications:batch", json={"notifications": repeated},
                                      headers=bearer(api_key))
        too_many = await client.post("/v1/notifications:batch", json={"notifications": [otp("u")] * 501},
                                     headers=bearer(api_key))
        empty = await client.post("/v1/notifications:batch", json={"notifications": []}, headers=bearer(api_key))
        body = await response.json()
        assert response.status == 422
        assert body["invalid_items"] == [2]
        assert [d["field"] for d in body["details"]] == ["notifications[2].recipient.phone"]
        assert duplicate.status == 422 and (await duplicate.json())["invalid_items"] == [1]
        assert too_many.status == 422 and empty.status == 422
    assert lane_records(applied, "critical") == []


async def test_a_body_over_one_mebibyte_is_413(settings: Settings, api_key: str) -> None:
    huge = json.dumps(otp("u", template_params={"pad": "x" * (1024 * 1024)}))
    async with serving(settings) as client:
        response = await client.post("/v1/notifications", data=huge, headers=bearer(api_key))
        assert response.status == 413
        assert "larger than" in (await response.json())["error"]


async def test_unreachable_kafka_is_503_with_retry_after_never_500(
        settings: Settings, api_key: str, unique: str) -> None:
    broken = dataclasses.replace(settings, kafka_bootstrap_servers=f"127.0.0.1:{closed_port()}")
    producer = NotificationProducer(broken, delivery_timeout_s=1.0)
    try:
        async with serving(settings, producer) as client:
            one = await client.post("/v1/notifications", json=otp(f"user-{unique}"), headers=bearer(api_key))
            batch = await client.post("/v1/notifications:batch", headers=bearer(api_key),
                                      json={"notifications": [otp(f"user-{unique}"), otp(f"user-{unique}")]})
            assert one.status == 503
            assert int(one.headers["Retry-After"]) > 0
            assert (await one.json())["retryable"] is True
            assert batch.status == 503 and int(batch.headers["Retry-After"]) > 0
            results = (await batch.json())["results"]
            assert [(r["index"], r["status"], r["retryable"]) for r in results] == [(0, "failed", True),
                                                                                    (1, "failed", True)]
    finally:
        producer.close(timeout_s=1)


async def test_the_openapi_document_and_liveness_need_no_key_and_describe_both_posts(settings: Settings) -> None:
    async with serving(settings) as client:
        live = await client.get("/health/live")
        response = await client.get("/openapi.json")
        assert live.status == 200
        assert response.status == 200
        document = json.loads(await response.text())
    assert document["openapi"].startswith("3.1")
    assert "post" in document["paths"]["/v1/notifications"]
    assert "post" in document["paths"]["/v1/notifications:batch"]

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            yield from ([node["$ref"]] if "$ref" in node else [])
            for child in node.values():
                yield from refs(child)
        elif isinstance(node, list):
            for child in node:
                yield from refs(child)

    schemas = document["components"]["schemas"]
    assert all(ref.removeprefix("#/components/schemas/") in schemas for ref in refs(document))


def requests_counted(status: str) -> float:
    value = REGISTRY.get_sample_value("notify_api_requests_total",
                                      {"route": "/v1/notifications", "method": "POST", "status": status})
    return value or 0.0


async def test_requests_are_counted_by_route_template_and_status(settings: Settings) -> None:
    before = requests_counted("401")
    async with serving(settings) as client:
        await client.post("/v1/notifications", json={})
        await client.post("/v1/notifications", json={})
        unmatched = await client.get(f"/nothing/{uuid.uuid4()}")
        assert unmatched.status == 401
    assert requests_counted("401") == before + 2
    assert REGISTRY.get_sample_value("notify_api_requests_total",
                                     {"route": "unmatched", "method": "GET", "status": "401"})


async def test_run_api_serves_until_stopped_then_shuts_down_cleanly(settings: Settings) -> None:
    port = closed_port()
    stop = asyncio.Event()
    server = asyncio.create_task(run_api(settings, "127.0.0.1", port, stop=stop))
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            for _ in range(50):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/health/live") as response:
                        assert response.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail("the API never answered")
    finally:
        stop.set()
        await asyncio.wait_for(server, timeout=30)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
