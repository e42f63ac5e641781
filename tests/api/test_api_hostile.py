"""Hostile bodies and a database that goes away, against the real API, broker and database: every bad body is a
4xx that names what is wrong and nothing reaches Kafka; a reused notification id is 409 before anything is
produced; ingest goes on accepting on a verified key while PostgreSQL cannot be reached."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from psycopg.conninfo import make_conninfo
from support.harness import TcpForwarder, bearer, lane_records, serving

from pipeline.api.ingest import MAX_JSON_DEPTH
from pipeline.config import Settings
from pipeline.policy.request_contract import InvalidRequest, normalize_request
from pipeline.state import db


def otp(user_id: str, **overrides: Any) -> dict[str, Any]:
    return {"idempotency_key": f"login-{uuid.uuid4().hex[:8]}", "user_id": user_id, "type": "otp",
            "channels": ["sms"], "recipient": {"phone": "+2348012345678"}, "template_id": "otp.login",
            "template_params": {"code": "123456"}, "expires_at": "2099-01-01T00:05:00Z", **overrides}


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def test_the_client_refuses_a_nul_or_a_lone_surrogate_anywhere_naming_the_field() -> None:
    for bad, field, flaw in [
        (otp("u", source_service="a\x00b"), "source_service", "contains a NUL character"),
        (otp("u", template_params={"code": "12\x003456"}), "template_params.code", "contains a NUL character"),
        (otp("u", recipient={"phone": "+2348012345678", "email": "\ud800@example.com"}), "recipient.email",
         "contains a lone surrogate (not valid Unicode)"),
        (otp("u", template_params={"k\x00": "v"}), "template_params", "has a key that contains a NUL character"),
    ]:
        with pytest.raises(InvalidRequest) as caught:
            normalize_request(bad)
        assert (field, flaw) in {(p.field, p.problem) for p in caught.value.problems}, caught.value.problems


async def test_nul_surrogates_and_deep_nesting_are_4xx_on_every_json_endpoint_and_nothing_is_produced(
        applied: Settings, api_key: str, unique: str) -> None:
    key = bearer(api_key)
    async with serving(applied) as client:
        nul = await client.post("/v1/notifications", headers=key,
                                json=otp(f"u-{unique}", template_params={"code": "1\x002"}))
        # A lone surrogate can only arrive as a JSON escape: the raw bytes would not be UTF-8 at all.
        surrogate = await client.post("/v1/notifications", headers={**key, "Content-Type": "application/json"},
                                      data=b'{"user_id": "\\ud800", "type": "otp", "idempotency_key": "k",'
                                           b' "channels": ["sms"], "recipient": {"phone": "+2348012345678"},'
                                           b' "content": {"body": "hi"}}')
        in_batch = await client.post("/v1/notifications:batch", headers=key, json={"notifications": [
            otp(f"u-{unique}"), otp(f"u-{unique}", correlation_id="c\x00")]})
        deep = {path: await client.post(path, headers={**key, "Content-Type": "application/json"}, data=body)
                for path, body in [("/v1/notifications", nested(5000)),
                                   ("/v1/notifications:batch", nested(MAX_JSON_DEPTH + 1)),
                                   (f"/v1/users/u-{unique}/settings", nested(5000)),
                                   ("/webhooks/sendgrid", nested(5000)),
                                   ("/webhooks/mailgun", nested(5000))]}
        deep_put = await client.put(f"/v1/users/u-{unique}/settings", data=nested(5000),
                                    headers={**key, "Content-Type": "application/json"})
        settings_nul = await client.put(f"/v1/users/u-{unique}/settings", headers=key,
                                        json={"contacts": {"email": "a\x00@example.com"}})
        settings_surrogate = await client.put(
            f"/v1/users/u-{unique}/settings", headers={**key, "Content-Type": "application/json"},
            data=b'{"contacts": {"phone": "+234\\udfff"}}')
        path_nul = await client.get("/v1/users/" + urllib.parse.quote("u\x00x") + "/settings", headers=key)
        fine = await client.post("/v1/notifications", headers=key, json=otp(f"u-{unique}"))

        assert nul.status == 422
        assert (await nul.json())["details"] == [
            {"field": "template_params.code", "problem": "contains a NUL character"}]
        assert surrogate.status == 422
        assert {"field": "user_id", "problem": "contains a lone surrogate (not valid Unicode)"} in (
            await surrogate.json())["details"]
        assert in_batch.status == 422
        assert (await in_batch.json())["invalid_items"] == [1]
        for path, response in deep.items():
            assert response.status in (400, 403, 404, 405, 422), (path, response.status)
        assert deep["/v1/notifications"].status == 422
        assert (await deep["/v1/notifications"].json())["error"] == f"body nests deeper than {MAX_JSON_DEPTH} levels"
        assert deep["/v1/notifications:batch"].status == 422
        assert deep["/webhooks/sendgrid"].status == 403  # not signed: refused before anything else
        assert deep["/webhooks/mailgun"].status == 403
        assert deep_put.status == 422
        assert settings_nul.status == 422
        assert {"field": "contacts.email", "problem": "contains a NUL character"} in (
            await settings_nul.json())["details"]
        assert settings_surrogate.status == 422
        assert path_nul.status == 422
        assert "NUL" in (await path_nul.json())["error"]
        assert fine.status == 202, await fine.text()
    # Only the one good request reached the lane.
    (record,) = lane_records(applied, "critical")
    assert record.key() == f"u-{unique}".encode()
    with db.connect(applied) as conn:
        row = conn.execute("SELECT count(*) FROM user_notification_settings WHERE user_id = %s",
                           (f"u-{unique}",)).fetchone()
    assert row is not None and row[0] == 0


@pytest.fixture
def stored_notification(applied: Settings, unique: str) -> Iterator[str]:
    """A notification intake has stored (user `owner-<unique>`, idempotency key `first`); removed afterwards."""
    notification_id = str(uuid.uuid4())
    with db.connect(applied) as conn, conn.transaction():
        conn.execute("INSERT INTO notifications (notification_id, user_id, notification_type, idempotency_key, lane,"
                     " source_service, created_at) VALUES (%s, %s, 'otp', 'first', 'critical', 'test', %s)",
                     (notification_id, f"owner-{unique}", datetime.datetime.now(datetime.UTC)))
    yield notification_id
    with db.connect(applied) as conn, conn.transaction():
        conn.execute("DELETE FROM notifications WHERE notification_id = %s", (notification_id,))


async def test_a_reused_notification_id_is_409_naming_the_field_and_a_retry_of_the_same_request_is_202(
        applied: Settings, api_key: str, unique: str, stored_notification: str) -> None:
    key = bearer(api_key)
    async with serving(applied) as client:
        other_key = await client.post("/v1/notifications", headers=key, json=otp(
            f"owner-{unique}", notification_id=stored_notification, idempotency_key="second"))
        other_user_in_batch = await client.post("/v1/notifications:batch", headers=key, json={"notifications": [
            otp(f"owner-{unique}"), otp(f"thief-{unique}", notification_id=stored_notification,
                                        idempotency_key="first")]})
        # The same request again (a retry after a timeout): intake reports it as a duplicate, the API lets it by.
        retry = await client.post("/v1/notifications", headers=key, json=otp(
            f"owner-{unique}", notification_id=stored_notification, idempotency_key="first"))
        assert other_key.status == 409
        assert [d["field"] for d in (await other_key.json())["details"]] == ["notification_id"]
        assert other_user_in_batch.status == 409
        assert [d["field"] for d in (await other_user_in_batch.json())["details"]] == [
            "notifications[1].notification_id"]
        assert retry.status == 202, await retry.text()
    assert [r.key() for r in lane_records(applied, "critical")] == [f"owner-{unique}".encode()]


async def test_ingest_accepts_on_a_verified_key_while_postgresql_is_unreachable_and_unknown_keys_get_503(
        applied: Settings, api_key: str, unique: str) -> None:
    forwarder = TcpForwarder(applied.postgres_port)
    through = dataclasses.replace(
        applied, database_url=make_conninfo(applied.dsn, port=forwarder.port))
    try:
        async with serving(through, key_cache_ttl_s=0.2) as client:
            before = await client.post("/v1/notifications", headers=bearer(api_key), json=otp(f"a-{unique}"))
            assert before.status == 202, await before.text()
            forwarder.cut()
            await asyncio.sleep(0.3)  # past the fresh-cache time: the key has to be looked up again, and cannot
            during = await client.post("/v1/notifications", headers=bearer(api_key), json=otp(f"b-{unique}"))
            unknown = await client.post("/v1/notifications", headers=bearer("nk_0123456789ab_" + "x" * 43),
                                        json=otp(f"c-{unique}"))
            assert during.status == 202, await during.text()
            assert unknown.status == 503  # well-formed, never verified: it cannot be checked now
            forwarder.mend()
    finally:
        forwarder.close()
    assert sorted(r.key() for r in lane_records(applied, "critical")) == [f"a-{unique}".encode(),
                                                                         f"b-{unique}".encode()]
