"""The provider webhook receivers against the real broker: requests signed with each provider's real scheme (the
simulator's own builders) become ProviderReceipt records before the 200; forged and unsigned ones are refused."""

from __future__ import annotations

import dataclasses
import json
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY
from support.harness import serving, topic_records
from twilio.request_validator import RequestValidator

from connectors.simulator import mailgun, sendgrid, termii, twilio
from connectors.simulator.state import LedgerEntry
from pipeline.api import create_app, ingest, webhooks
from pipeline.config import Settings
from pipeline.kafka import serde, topics

PUBLIC_BASE = "https://hooks.notify.example/webhooks"
Signed = tuple[str, bytes, dict[str, str]]  # the path (with query) to post to, the body, the headers


@pytest.fixture
def hooks(applied: Settings) -> Settings:
    """The test's own topics, with the public webhook URL set as a deployment sets it."""
    return dataclasses.replace(applied, webhook_base_url=PUBLIC_BASE)


def entry(provider: str, *, pending: bool = False) -> LedgerEntry:
    """A message the provider accepted; delivered 30 s ago, or (pending) not yet."""
    now = time.time()
    to = "user@example.com" if provider in ("sendgrid", "mailgun") else "2348012345678"
    return LedgerEntry(seq=1, provider=provider, provider_message_id=f"{provider}-{uuid.uuid4().hex}",
                       notification_id=None, to=to, sender="Notify", body="Your code is 123456", subject="Code",
                       accepted_at=now - 60, deliver_at=now + 3600 if pending else now - 30, final_status="delivered")


def signed(settings: Settings, provider: str, message: LedgerEntry, nid: str, *, forged: bool = False) -> Signed:
    """A receipt request as the provider sends it (signed with a wrong secret when `forged`)."""
    if provider == "twilio":
        query = f"?nid={nid}"
        token = "forged-token" if forged else settings.twilio_auth_token
        body, headers = twilio.status_callback(message, f"{PUBLIC_BASE}/twilio{query}", settings.twilio_account_sid,
                                               token)
        return f"/webhooks/twilio{query}", body, headers
    if provider == "termii":
        body, headers = termii.delivery_report(message, "forged-secret" if forged else settings.termii_secret_key)
        return "/webhooks/termii", body, headers
    if provider == "sendgrid":
        # One event while the message is pending ("processed"); a forger changes a signed body.
        body, headers = sendgrid.event_webhook(message, {"notification_id": nid})
        if forged:
            body = body.replace(b'"processed"', b'"delivered"')
        return "/webhooks/sendgrid", body, headers
    key = "forged-key" if forged else settings.mailgun_webhook_signing_key
    body, headers = mailgun.webhook(message, {"notification_id": nid}, key)
    return "/webhooks/mailgun", body, headers


def unsigned(request: Signed) -> Signed:
    path, body, headers = request
    if path.startswith("/webhooks/mailgun"):
        payload = json.loads(body)
        del payload["signature"]
        return path, json.dumps(payload).encode(), headers
    kept = {k: v for k, v in headers.items() if "Signature" not in k and "Timestamp" not in k}
    return path, body, kept


# provider -> (pending message?, the expected notification id given ours, the expected status)
EXPECTED: dict[str, tuple[bool, Callable[[str], uuid.UUID | None], str]] = {
    "twilio": (False, uuid.UUID, "delivered"),  # the id travels in the signed StatusCallback URL
    "termii": (False, lambda _nid: None, "delivered"),  # Termii echoes no reference of ours
    "sendgrid": (True, uuid.UUID, "accepted"),  # a custom arg: "processed" -> accepted
    "mailgun": (False, uuid.UUID, "delivered"),  # a user variable
}


def receipts(settings: Settings) -> list[tuple[bytes, dict[str, Any]]]:
    """Every record on the test's receipts topic (up to its end offsets), as (key, decoded ProviderReceipt)."""
    records = topic_records(settings, topics.RECEIPTS)
    codec = serde.AvroSerde()
    return [(r.key(), codec.decode(r.value(), expected=serde.PROVIDER_RECEIPT).value) for r in records]


def counted(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


@pytest.mark.parametrize("provider", webhooks.RECEIPT_PROVIDERS)
async def test_a_signed_receipt_is_200_once_kafka_holds_its_provider_receipt(hooks: Settings, provider: str) -> None:
    pending, expected_nid, status = EXPECTED[provider]
    message, nid = entry(provider, pending=pending), str(uuid.uuid4())
    before = counted("notify_webhook_receipts_total", provider=provider, status=status)
    path, body, headers = signed(hooks, provider, message, nid)
    async with serving(hooks) as client:
        response = await client.post(path, data=body, headers=headers)  # no API key: the signature is the auth
        assert response.status == 200, await response.text()
        assert await response.json() == {"accepted": 1}
        ((key, value),) = receipts(hooks)  # read right after the 200: already there
    assert (value["provider"], value["provider_message_id"], value["status"]) == (
        provider, message.provider_message_id, status)
    assert value["notification_id"] == expected_nid(nid)
    assert key == (nid if value["notification_id"] else message.provider_message_id).encode()
    assert value["received_at"].tzinfo is not None and abs(value["received_at"].timestamp() - time.time()) < 60
    assert counted("notify_webhook_receipts_total", provider=provider, status=status) == before + 1


@pytest.mark.parametrize("provider", webhooks.RECEIPT_PROVIDERS)
async def test_a_forged_receipt_is_403_counted_and_nothing_is_produced(hooks: Settings, provider: str) -> None:
    pending = EXPECTED[provider][0]
    before = counted("notify_webhook_rejected_total", provider=provider, reason="bad_signature")
    path, body, headers = signed(hooks, provider, entry(provider, pending=pending), str(uuid.uuid4()), forged=True)
    async with serving(hooks) as client:
        response = await client.post(path, data=body, headers=headers)
        assert response.status == 403
        assert "signature" in (await response.json())["error"]
    assert receipts(hooks) == []
    assert counted("notify_webhook_rejected_total", provider=provider, reason="bad_signature") == before + 1


@pytest.mark.parametrize("provider", webhooks.RECEIPT_PROVIDERS)
async def test_an_unsigned_receipt_is_403_counted_and_nothing_is_produced(hooks: Settings, provider: str) -> None:
    pending = EXPECTED[provider][0]
    before = counted("notify_webhook_rejected_total", provider=provider, reason="unsigned")
    path, body, headers = unsigned(signed(hooks, provider, entry(provider, pending=pending), str(uuid.uuid4())))
    async with serving(hooks) as client:
        response = await client.post(path, data=body, headers=headers)
        assert response.status == 403
        assert (await response.json())["error"] == f"no {provider} signature"
    assert receipts(hooks) == []
    assert counted("notify_webhook_rejected_total", provider=provider, reason="unsigned") == before + 1


async def test_twilio_is_checked_against_the_public_url_with_the_query_it_signed(hooks: Settings) -> None:
    message, nid = entry("twilio"), str(uuid.uuid4())
    path, body, headers = signed(hooks, "twilio", message, nid)
    other = f"/webhooks/twilio?nid={uuid.uuid4()}"
    async with serving(hooks) as client:
        swapped_query = await client.post(other, data=body, headers=headers)
        no_query = await client.post("/webhooks/twilio", data=body, headers=headers)
        # Signed for the URL the request reached, not the public one the provider was given.
        local_url = str(client.make_url(path))
        local_body, local_headers = twilio.status_callback(message, local_url, hooks.twilio_account_sid,
                                                           hooks.twilio_auth_token)
        local = await client.post(path, data=local_body, headers=local_headers)
        assert (swapped_query.status, no_query.status, local.status) == (403, 403, 403)
        assert receipts(hooks) == []
        genuine = await client.post(path, data=body, headers=headers)
        assert genuine.status == 200
    ((_, value),) = receipts(hooks)
    assert value["notification_id"] == uuid.UUID(nid)


async def test_without_a_public_base_url_the_url_the_request_reached_is_the_signed_one(applied: Settings) -> None:
    message, nid = entry("twilio"), str(uuid.uuid4())
    async with serving(applied) as client:
        path = f"/webhooks/twilio?nid={nid}"
        body, headers = twilio.status_callback(message, str(client.make_url(path)), applied.twilio_account_sid,
                                               applied.twilio_auth_token)
        public_body, public_headers = twilio.status_callback(message, f"{PUBLIC_BASE}/twilio?nid={nid}",
                                                             applied.twilio_account_sid, applied.twilio_auth_token)
        assert (await client.post(path, data=public_body, headers=public_headers)).status == 403
        response = await client.post(path, data=body, headers=headers)
        assert response.status == 200, await response.text()
    ((_, value),) = receipts(applied)
    assert (value["provider_message_id"], value["notification_id"]) == (message.provider_message_id, uuid.UUID(nid))


async def test_every_receipt_of_one_request_is_produced_and_unmapped_events_are_accepted_as_none(
        hooks: Settings) -> None:
    message, nid = entry("sendgrid"), str(uuid.uuid4())  # delivered: "processed" then "delivered"
    path, body, headers = signed(hooks, "sendgrid", message, nid)
    # A signed Twilio callback without a MessageSid: nothing we map.
    params = {"AccountSid": hooks.twilio_account_sid, "SmsStatus": "received"}
    odd = {"X-Twilio-Signature": RequestValidator(hooks.twilio_auth_token).compute_signature(
        f"{PUBLIC_BASE}/twilio", params)}
    async with serving(hooks) as client:
        response = await client.post(path, data=body, headers=headers)
        unmapped = await client.post("/webhooks/twilio", data=params, headers=odd)
        assert (response.status, await response.json()) == (200, {"accepted": 2})
        assert (unmapped.status, await unmapped.json()) == (200, {"accepted": 0})
    records = receipts(hooks)
    assert sorted(value["status"] for _, value in records) == ["accepted", "delivered"]
    assert {key for key, _ in records} == {nid.encode()}


async def test_push_providers_have_no_webhook_and_bodies_are_bounded(hooks: Settings) -> None:
    async with serving(hooks) as client:
        fcm = await client.post("/webhooks/fcm", json={"message_id": "x"})
        apns = await client.post("/webhooks/apns", json={})
        huge = await client.post("/webhooks/termii", data=b"x" * (ingest.MAX_BODY_BYTES + 1),
                                 headers={"X-Termii-Signature": "00"})
        assert (fcm.status, apns.status) == (404, 404)  # no API key needed to learn that
        assert "no webhook for 'fcm'" in (await fcm.json())["error"]
        assert huge.status == 413
        assert (await client.post("/webhooks/mailgun", data=b"{not json")).status == 403
    assert receipts(hooks) == []


async def test_unreachable_kafka_is_503_with_retry_after_so_the_provider_retries(hooks: Settings) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = int(probe.getsockname()[1])
    broken = dataclasses.replace(hooks, kafka_bootstrap_servers=f"127.0.0.1:{closed}")
    app = create_app(broken)
    app[webhooks.WEBHOOKS].delivery_timeout_s = 1.0
    path, body, headers = signed(broken, "termii", entry("termii"), str(uuid.uuid4()))
    async with TestClient(TestServer(app)) as client:
        response = await client.post(path, data=body, headers=headers)
        assert response.status == 503
        assert int(response.headers["Retry-After"]) > 0
        assert "Kafka did not take the receipts" in (await response.json())["error"]


THIRTY_DAYS_S = 30 * 86_400


@pytest.mark.parametrize("provider", ["sendgrid", "mailgun"])
async def test_a_receipt_signed_thirty_days_ago_or_ahead_is_403_stale_and_nothing_is_produced(
        hooks: Settings, provider: str) -> None:
    message, nid = entry(provider), str(uuid.uuid4())
    before = counted("notify_webhook_rejected_total", provider=provider, reason="stale")
    requests = []
    for signed_at in (time.time() - THIRTY_DAYS_S, time.time() + 3600):
        if provider == "sendgrid":
            body, headers = sendgrid.event_webhook(message, {"notification_id": nid}, signed_at)
        else:
            body, headers = mailgun.webhook(message, {"notification_id": nid}, hooks.mailgun_webhook_signing_key,
                                            signed_at)
        requests.append((f"/webhooks/{provider}", body, headers))
    async with serving(hooks) as client:
        for path, body, headers in requests:
            response = await client.post(path, data=body, headers=headers)
            assert response.status == 403
            assert "possible replay" in (await response.json())["error"]
    assert receipts(hooks) == []
    assert counted("notify_webhook_rejected_total", provider=provider, reason="stale") == before + 2


@pytest.mark.parametrize("provider", webhooks.RECEIPT_PROVIDERS)
async def test_a_replayed_receipt_is_answered_200_and_changes_nothing(hooks: Settings, provider: str) -> None:
    pending = EXPECTED[provider][0]
    path, body, headers = signed(hooks, provider, entry(provider, pending=pending), str(uuid.uuid4()))
    before = counted("notify_webhook_rejected_total", provider=provider, reason="replay")
    async with serving(hooks) as client:
        first = await client.post(path, data=body, headers=headers)
        again = [await client.post(path, data=body, headers=headers) for _ in range(3)]
        assert (first.status, await first.json()) == (200, {"accepted": 1})
        for response in again:
            assert (response.status, await response.json()) == (200, {"accepted": 0, "replayed": True})
    assert len(receipts(hooks)) == 1
    assert counted("notify_webhook_rejected_total", provider=provider, reason="replay") == before + 3


async def test_a_captured_mailgun_signature_with_other_event_data_changes_nothing(hooks: Settings) -> None:
    message, nid = entry("mailgun"), str(uuid.uuid4())
    path, body, headers = signed(hooks, "mailgun", message, nid)
    forged = json.loads(body)
    forged["event-data"]["event"] = "failed"  # delivered -> failed, under the same (timestamp, token, signature)
    forged["event-data"]["severity"] = "permanent"
    async with serving(hooks) as client:
        genuine = await client.post(path, data=body, headers=headers)
        swapped = await client.post(path, data=json.dumps(forged).encode(), headers=headers)
        assert (genuine.status, swapped.status) == (200, 200)
        assert await swapped.json() == {"accepted": 0, "replayed": True}
    ((_, value),) = receipts(hooks)
    assert value["status"] == "delivered"


async def test_without_redis_a_fresh_signed_receipt_still_goes_through_and_the_skip_is_counted(
        hooks: Settings) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    no_redis = dataclasses.replace(hooks, redis_url=f"redis://127.0.0.1:{closed}/0")
    path, body, headers = signed(no_redis, "twilio", entry("twilio"), str(uuid.uuid4()))
    before = counted("notify_webhook_replay_unchecked_total", provider="twilio")
    async with serving(no_redis) as client:
        response = await client.post(path, data=body, headers=headers)
        assert (response.status, await response.json()) == (200, {"accepted": 1})
    assert len(receipts(hooks)) == 1
    assert counted("notify_webhook_replay_unchecked_total", provider="twilio") == before + 1
