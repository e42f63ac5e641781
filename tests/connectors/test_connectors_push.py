"""The push connectors (FCM through firebase-admin, APNs over HTTP/2): outcome classification of recorded provider
answers, then each connector end to end against the simulator (firebase-admin's OAuth2 token request and
messages:send, APNs over real HTTP/2 with prior knowledge). The simulator's ledger is the ground truth. No stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
import uuid
from typing import Any

import google.auth.exceptions
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from firebase_admin import exceptions as firebase_exceptions
from firebase_admin import messaging
from support.provider_sim import PUSH_TO, message, simulated

from connectors import apns_push, fcm_push
from connectors.apns_push import ApnsPush
from connectors.base import Message, ProviderQueryError, classify_httpx_exception, collapse_id
from connectors.factory import create_connector
from connectors.fcm_push import FcmPush
from connectors.simulator import run_simulator
from pipeline import config
from pipeline.domain import PROVIDERS

PUSH = ["fcm", "apns"]
NID = "0f8fad5b-d9cb-469f-a165-70867728950e"
UNREGISTERED = {"fcm": "unregistered-token-1", "apns": "0000" + "ab" * 30}
INVALID = {"fcm": "invalid token", "apns": "not-a-hex-device-token"}
ID_SHAPES = {"fcm": r"^projects/notify-simulator/messages/0:\d+%[0-9a-f]{16}$", "apns": f"^{NID}$"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fcm_error(status: int, canonical: str, message: str, code: str | None = None, **extra: Any) -> str:
    details: list[dict[str, Any]] = [{"@type": fcm_push.FCM_ERROR_TYPE, "errorCode": code}] if code else []
    details += extra.get("details", [])
    body: dict[str, Any] = {"code": status, "message": message, "status": canonical}
    if details:
        body["details"] = details
    return json.dumps({"error": body})


# --- FCM answers -----------------------------------------------------------------------------------------------

BAD_TOKEN_DETAILS = [{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [
    {"field": "message.token", "description": "Invalid registration token"}]}]


@pytest.mark.parametrize(("status", "body", "headers", "kind", "reason", "code"), [
    (200, json.dumps({"name": "projects/p/messages/0:1500415314455276%31bd1c9631bd1c96"}), {}, "accepted", "ok",
     None),
    (404, fcm_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED"), {}, "permanent",
     "invalid_recipient", "UNREGISTERED"),
    (400, fcm_error(400, "INVALID_ARGUMENT", "The registration token is not a valid FCM registration token",
                    "INVALID_ARGUMENT"), {}, "permanent", "invalid_recipient", "INVALID_ARGUMENT"),
    (400, fcm_error(400, "INVALID_ARGUMENT", "Invalid value", None, details=BAD_TOKEN_DETAILS), {}, "permanent",
     "invalid_recipient", "INVALID_ARGUMENT"),
    (400, fcm_error(400, "INVALID_ARGUMENT", "Invalid value at 'message.android.ttl' (type.googleapis.com/"
                    "google.protobuf.Duration), Field 'ttl', Illegal duration format", "INVALID_ARGUMENT"), {},
     "permanent", "bad_request", "INVALID_ARGUMENT"),
    (403, fcm_error(403, "PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH"), {}, "permanent",
     "invalid_recipient", "SENDER_ID_MISMATCH"),
    (401, fcm_error(401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service", "THIRD_PARTY_AUTH_ERROR"), {},
     "permanent", "auth", "THIRD_PARTY_AUTH_ERROR"),
    (401, fcm_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."), {}, "permanent",
     "auth", "UNAUTHENTICATED"),
    (403, fcm_error(403, "PERMISSION_DENIED", "Permission 'cloudmessaging.messages.create' denied"), {},
     "permanent", "auth", "PERMISSION_DENIED"),
    (429, fcm_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", "QUOTA_EXCEEDED"), {"Retry-After": "30"},
     "transient", "rate_limited", "QUOTA_EXCEEDED"),
    (503, fcm_error(503, "UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE"), {}, "transient",
     "server_error", "UNAVAILABLE"),
    (500, fcm_error(500, "INTERNAL", "Internal error encountered.", "INTERNAL"), {}, "transient", "server_error",
     "INTERNAL"),
    (502, "<html><title>502 Bad Gateway</title></html>", {}, "transient", "server_error", "502"),
    (404, fcm_error(404, "NOT_FOUND", "Requested entity was not found."), {}, "permanent", "bad_request",
     "NOT_FOUND"),
    (200, "{}", {}, "ambiguous", "server_error", "200"),
])
def test_fcm_answers_are_classified_by_fcm_error_code_then_status(
        status: int, body: str, headers: dict[str, str], kind: str, reason: str, code: str | None) -> None:
    outcome = fcm_push.classify(status, body, headers)
    assert (outcome.kind, outcome.reason, outcome.error_code, outcome.provider) == (kind, reason, code, "fcm")
    if kind == "accepted":
        assert outcome.provider_message_id == "projects/p/messages/0:1500415314455276%31bd1c9631bd1c96"
    if status == 429:
        assert outcome.retry_after_s == 30.0


def test_fcm_sdk_errors_are_classified_by_their_http_answer_or_their_cause() -> None:
    request = httpx.Request("POST", "https://fcm.googleapis.com/v1/projects/p/messages:send")
    answer = httpx.Response(404, request=request, content=fcm_error(404, "NOT_FOUND", "gone", "UNREGISTERED"))
    unregistered = messaging.UnregisteredError("gone", http_response=answer)
    assert (fcm_push.classify_error(unregistered).kind, fcm_push.classify_error(unregistered).reason) == (
        "permanent", "invalid_recipient")
    refused = firebase_exceptions.UnavailableError("no", cause=httpx.ConnectError("refused", request=request))
    lost = firebase_exceptions.DeadlineExceededError("late", cause=httpx.ReadTimeout("read", request=request))
    assert (fcm_push.classify_error(refused).kind, fcm_push.classify_error(refused).reason) == ("transient",
                                                                                             "connection")
    assert (fcm_push.classify_error(lost).kind, fcm_push.classify_error(lost).reason) == ("ambiguous", "timeout")
    auth_errors: Any = google.auth.exceptions  # its exception constructors are unannotated
    bad_key = auth_errors.RefreshError("invalid_grant: Invalid JWT Signature.", {}, retryable=False)
    busy = auth_errors.RefreshError("server_error", {}, retryable=True)
    down = auth_errors.TransportError("connection refused")
    assert (fcm_push.classify_error(bad_key).kind, fcm_push.classify_error(bad_key).reason) == ("permanent", "auth")
    assert fcm_push.classify_error(busy).kind == "transient"
    assert (fcm_push.classify_error(down).kind, fcm_push.classify_error(down).reason) == ("transient", "connection")
    broken = firebase_exceptions.UnknownError("Unknown error", cause=ValueError("Expecting value: line 1"))
    assert (fcm_push.classify_error(broken).kind, fcm_push.classify_error(broken).error_code) == ("ambiguous",
                                                                                               "unknown")


def test_the_fcm_message_carries_the_token_collapse_key_and_notification_id() -> None:
    encoded = messaging._MessagingService.encode_message(
        fcm_push.build_message(Message(NID, "push", "tok-1", "Debit of 5,000 NGN", subject="Debit"), 600))
    assert encoded["token"] == "tok-1"
    assert encoded["data"] == {"notification_id": NID}
    assert encoded["notification"] == {"title": "Debit", "body": "Debit of 5,000 NGN"}
    assert (encoded["android"]["collapse_key"], encoded["android"]["ttl"]) == (NID, "600s")
    assert encoded["apns"]["headers"]["apns-collapse-id"] == NID
    keyed = Message(NID, "push", "t", "b", collapse_key="balance")
    assert collapse_id(keyed) == "balance"
    long_key = Message(NID, "push", "t", "b", collapse_key="k" * 80)
    assert len(collapse_id(long_key)) == 32 and collapse_id(long_key) == collapse_id(long_key)


# --- APNs answers ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "body", "headers", "kind", "reason", "code"), [
    (200, "", {"apns-id": NID.upper()}, "accepted", "ok", None),
    (200, "", {}, "ambiguous", "server_error", "200"),
    (400, {"reason": "BadDeviceToken"}, {}, "permanent", "invalid_recipient", "BadDeviceToken"),
    (400, {"reason": "DeviceTokenNotForTopic"}, {}, "permanent", "invalid_recipient", "DeviceTokenNotForTopic"),
    (410, {"reason": "Unregistered", "timestamp": 1767225600000}, {}, "permanent", "invalid_recipient",
     "Unregistered"),
    (403, {"reason": "InvalidProviderToken"}, {}, "permanent", "auth", "InvalidProviderToken"),
    (403, {"reason": "ExpiredProviderToken"}, {}, "permanent", "auth", "ExpiredProviderToken"),
    (400, {"reason": "BadCollapseId"}, {}, "permanent", "bad_request", "BadCollapseId"),
    (413, {"reason": "PayloadTooLarge"}, {}, "permanent", "bad_request", "PayloadTooLarge"),
    (429, {"reason": "TooManyRequests"}, {"retry-after": "4"}, "transient", "rate_limited", "TooManyRequests"),
    (500, {"reason": "InternalServerError"}, {}, "transient", "server_error", "InternalServerError"),
    (503, {"reason": "ServiceUnavailable"}, {}, "transient", "server_error", "ServiceUnavailable"),
    (502, "", {}, "transient", "server_error", "502"),
])
def test_apns_answers_are_classified_by_reason(status: int, body: Any, headers: dict[str, str], kind: str,
                                               reason: str, code: str | None) -> None:
    outcome = apns_push.classify(status, body if isinstance(body, str) else json.dumps(body), headers)
    assert (outcome.kind, outcome.reason, outcome.error_code, outcome.provider) == (kind, reason, code, "apns")
    if kind == "accepted":
        assert outcome.provider_message_id == NID.upper()
    if status == 429:
        assert outcome.retry_after_s == 4.0


def test_httpx_errors_are_transient_before_the_request_left_and_ambiguous_after() -> None:
    request = httpx.Request("POST", "http://127.0.0.1:1/3/device/x")
    for exc, kind, reason in [
        (httpx.ConnectError("refused", request=request), "transient", "connection"),
        (httpx.ConnectTimeout("connect", request=request), "transient", "connection"),
        (httpx.PoolTimeout("pool", request=request), "transient", "connection"),
        (httpx.ReadTimeout("read", request=request), "ambiguous", "timeout"),
        (httpx.WriteTimeout("write", request=request), "ambiguous", "timeout"),
        (httpx.RemoteProtocolError("GOAWAY", request=request), "ambiguous", "connection_lost"),
        (httpx.ReadError("reset", request=request), "ambiguous", "connection_lost"),
    ]:
        outcome = classify_httpx_exception("apns", exc)
        assert (outcome.kind, outcome.reason) == (kind, reason), exc


def test_the_apns_provider_token_is_es256_with_kid_and_iss_and_renewed_after_50_minutes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    connector = create_connector("apns", config.load({}))
    assert isinstance(connector, ApnsPush)
    first = connector.provider_token()
    assert jwt.get_unverified_header(first) == {"alg": "ES256", "kid": "SIMKEY0001", "typ": "JWT"}
    claims = jwt.decode(first, connector.key.public_key(), algorithms=["ES256"])
    assert claims["iss"] == "SIMTEAM001" and abs(claims["iat"] - time.time()) < 5
    assert connector.provider_token() == first  # cached
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 49 * 60)
    assert connector.provider_token() == first
    monkeypatch.setattr(time, "time", lambda: now + 51 * 60)
    renewed = connector.provider_token()
    renewed_claims = jwt.decode(renewed, connector.key.public_key(), algorithms=["ES256"],
                                options={"verify_iat": False})
    assert renewed != first and renewed_claims["iat"] > now


def test_apns_id_is_our_notification_id_as_a_uuid() -> None:
    assert apns_push.apns_id(NID.upper()) == NID
    derived = apns_push.apns_id("n-1")
    assert uuid.UUID(derived).version == 5 and apns_push.apns_id("n-1") == derived != apns_push.apns_id("n-2")


async def test_push_has_no_status_api_and_no_receipts() -> None:
    settings = config.load({})
    for provider in PUSH:
        connector = create_connector(provider, settings)
        try:
            with pytest.raises(ProviderQueryError, match="no status API"):
                await connector.status("x")
            assert not connector.verify_receipt("https://hooks/x", b"{}", {})
            assert connector.parse_receipt("https://hooks/x", b"{}", {}) == []
        finally:
            await connector.close()


def test_push_settings_default_to_the_simulator() -> None:
    settings = config.load({"NOTIFY_SIMULATOR_PORT": "58111", "NOTIFY_SIMULATOR_APNS_PORT": "58112"})
    assert {"fcm", "apns"} <= set(PROVIDERS)
    assert settings.provider_base_url("fcm") == "http://127.0.0.1:58111/fcm"
    assert settings.provider_base_url("apns") == "http://127.0.0.1:58112"
    assert fcm_push.service_account(settings)["token_uri"] == "http://127.0.0.1:58111/fcm/token"
    real = config.load({"NOTIFY_APNS_BASE_URL": "https://api.push.apple.com/"})
    assert real.provider_base_url("apns") == "https://api.push.apple.com"


# --- through the simulator -------------------------------------------------------------------------------------

@pytest.mark.parametrize("provider", PUSH)
async def test_an_accepted_push_has_the_providers_id_and_one_ledger_entry_with_the_collapse_id(
        provider: str) -> None:
    async with simulated() as env:
        connector = env.connector(provider)
        outcome = await connector.send(message(provider, NID))
        assert (outcome.kind, outcome.reason) == ("accepted", "ok"), outcome
        assert outcome.provider_message_id is not None and re.match(ID_SHAPES[provider], outcome.provider_message_id)
        keyed = await connector.send(Message("n-2", "push", PUSH_TO[provider], "Balance", collapse_key="balance"))
        assert keyed.kind == "accepted", keyed
        first, second = await env.ledger(provider=provider)
        assert (first["provider_message_id"], first["notification_id"], first["to"], first["collapse_id"]) == (
            outcome.provider_message_id, NID, PUSH_TO[provider], NID)
        assert (first["body"], first["subject"], first["hung"]) == ("Your code is 123456", "Your code", False)
        assert (second["notification_id"], second["collapse_id"]) == ("n-2", "balance")


@pytest.mark.parametrize("provider", PUSH)
async def test_an_unregistered_or_malformed_token_is_permanent_and_nothing_is_accepted(provider: str) -> None:
    async with simulated() as env:
        connector = env.connector(provider)
        gone = await connector.send(message(provider, to=UNREGISTERED[provider]))
        bad = await connector.send(message(provider, to=INVALID[provider]))
        assert (gone.kind, gone.reason, gone.error_code) == (
            "permanent", "invalid_recipient", {"fcm": "UNREGISTERED", "apns": "Unregistered"}[provider]), gone
        assert (bad.kind, bad.reason) == ("permanent", "invalid_recipient"), bad
        assert await env.ledger() == []


@pytest.mark.parametrize("provider", PUSH)
async def test_a_programmed_5xx_and_an_outage_are_transient_and_sending_works_again(provider: str) -> None:
    async with simulated() as env:
        connector = env.connector(provider)
        await env.configure(provider, error_rates={"5xx": 1.0})
        failed = await connector.send(message(provider, "n-5xx"))
        assert (failed.kind, failed.reason, failed.retryable) == ("transient", "server_error", True), failed
        await env.configure(provider, error_rates={}, outage_s=60)
        down = await connector.send(message(provider, "n-down"))
        assert (down.kind, down.reason) == ("transient", "server_error"), down
        await env.configure(provider, outage_s=0)
        assert (await connector.send(message(provider, "n-up"))).kind == "accepted"
        assert [e["notification_id"] for e in await env.ledger()] == ["n-up"]


@pytest.mark.parametrize("provider", PUSH)
async def test_a_fault_programmed_for_one_device_token_fails_its_next_pushes_only(provider: str) -> None:
    flaky, steady = PUSH_TO[provider], {"fcm": "dXk3:APA91bH-steady-device", "apns": "cd" * 32}[provider]
    async with simulated() as env:
        connector = env.connector(provider)
        await env.configure(provider, device_faults={flaky: ["outage", "permanent"]})
        down = await connector.send(message(provider, "n-1", to=flaky))
        assert (down.kind, down.reason, down.error_code) == (
            "transient", "server_error", {"fcm": "UNAVAILABLE", "apns": "ServiceUnavailable"}[provider]), down
        assert (await connector.send(message(provider, "n-1", to=steady))).kind == "accepted"
        gone = await connector.send(message(provider, "n-1", to=flaky))
        assert (gone.kind, gone.reason) == ("permanent", "invalid_recipient"), gone
        assert (await connector.send(message(provider, "n-1", to=flaky))).kind == "accepted"  # the list is used up
        assert [e["to"] for e in await env.ledger()] == [steady, flaky]
        async with env.http.get(f"{env.sim_url}/_admin/providers") as resp:
            assert (await resp.json())[provider]["device_faults"] == {}
        async with env.http.post(f"{env.sim_url}/_admin/providers/twilio", json={"device_faults": {"x": ["5xx"]}}
                                 ) as resp:
            assert resp.status == 400  # push providers only
        async with env.http.post(f"{env.sim_url}/_admin/providers/{provider}",
                                 json={"device_faults": {flaky: ["down"]}}) as resp:
            assert resp.status == 400 and "device_faults" in await resp.text()


@pytest.mark.parametrize("provider", PUSH)
async def test_429_is_transient_with_the_retry_after_the_provider_asked_for(provider: str) -> None:
    async with simulated() as env:
        await env.configure(provider, error_rates={"429": 1.0}, retry_after_s=2)
        outcome = await env.connector(provider).send(message(provider))
        assert (outcome.kind, outcome.reason, outcome.retry_after_s) == ("transient", "rate_limited", 2.0), outcome
        assert await env.ledger() == []


@pytest.mark.parametrize("provider", PUSH)
async def test_accept_then_hang_is_ambiguous_with_exactly_one_ledger_entry(provider: str) -> None:
    async with simulated() as env:
        await env.configure(provider, accept_then_hang=True)
        connector = env.connector(provider, timeout_s=0.3)
        if isinstance(connector, FcmPush):
            await connector._access_token()  # the token request is not what this test times out
        outcome = await connector.send(message(provider, "n-hang"))
        assert (outcome.kind, outcome.reason, outcome.retryable) == ("ambiguous", "timeout", False), outcome
        assert 0.25 < outcome.latency_s < 2
        [entry] = await env.ledger(provider=provider)
        assert (entry["notification_id"], entry["hung"], entry["collapse_id"]) == ("n-hang", True, "n-hang")


def other_fcm_account() -> dict[str, Any]:
    """The simulator's service account with a key Google (the simulator) never saw."""
    info = fcm_push.service_account(config.load({}))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info["private_key"] = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()).decode()
    return info


def other_apns_key() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


async def test_wrong_push_credentials_are_a_permanent_auth_failure_and_nothing_is_accepted() -> None:
    async with simulated() as env:
        info = other_fcm_account()
        info["token_uri"] = f"{env.settings.provider_base_url('fcm')}/token"
        outcomes = [
            await env.connector("fcm", service_account=info).send(message("fcm")),
            await env.connector("apns", private_key=other_apns_key()).send(message("apns")),
            await env.connector("apns", team_id="OTHERTEAM1").send(message("apns")),
        ]
        assert [(o.kind, o.reason) for o in outcomes] == [("permanent", "auth")] * 3, outcomes
        assert [o.error_code for o in outcomes] == ["invalid_grant", "InvalidProviderToken", "InvalidProviderToken"]
        assert await env.ledger() == []
        async with env.http.get(f"{env.sim_url}/_admin/stats") as resp:
            stats = await resp.json()
        assert (stats["fcm"], stats["apns"]) == ({"token_400": 1}, {"403": 2})  # FCM: refused at the token endpoint


async def test_fcm_test_mode_is_validate_only_and_lands_in_test_sends_not_the_ledger() -> None:
    async with simulated() as env:
        fcm = env.connector("fcm")
        assert fcm.supports_test_mode and not env.connector("apns").supports_test_mode
        shadow = Message("n-shadow", "push", PUSH_TO["fcm"], "Your code is 123456", test_mode=True)
        outcome = await fcm.send(shadow)
        assert (outcome.kind, outcome.provider_message_id) == (
            "accepted", "projects/notify-simulator/messages/fake_message_id"), outcome
        assert await env.ledger() == []
        [entry] = await env.test_sends("fcm")
        assert (entry["notification_id"], entry["to"]) == ("n-shadow", PUSH_TO["fcm"])
        with pytest.raises(ValueError, match="no test mode"):
            await env.connector("apns").send(Message("n-shadow", "push", PUSH_TO["apns"], "x", test_mode=True))


async def test_fcm_gets_one_access_token_in_a_worker_thread_for_many_sends() -> None:
    async with simulated() as env:
        fcm = env.connector("fcm")
        assert isinstance(fcm, FcmPush)
        threads: list[str] = []
        refresh = fcm.google_credential.refresh

        def spy(request: Any) -> None:
            threads.append(threading.current_thread().name)
            refresh(request)

        object.__setattr__(fcm.google_credential, "refresh", spy)
        outcomes = await asyncio.gather(*(fcm.send(message("fcm", f"n-{i}")) for i in range(10)))
        assert [o.kind for o in outcomes] == ["accepted"] * 10
        assert len(threads) == 1 and threads[0] != threading.main_thread().name
        async with env.http.get(f"{env.sim_url}/_admin/stats") as resp:
            assert (await resp.json())["fcm"] == {"200": 10, "accepted": 10, "token_200": 1}


async def test_the_fcm_simulator_refuses_a_forged_access_token_and_another_project() -> None:
    async with simulated() as env:
        url = f"{env.sim_url}/fcm/v1/projects/notify-simulator/messages:send"
        body = {"message": {"token": PUSH_TO["fcm"], "notification": {"body": "x"}}}
        async with env.http.post(url, json=body, headers={"Authorization": "Bearer ya29.sim.e30.forged"}) as resp:
            assert (resp.status, (await resp.json())["error"]["status"]) == (401, "UNAUTHENTICATED")
        fcm = env.connector("fcm", project_id="someone-elses-project")
        outcome = await fcm.send(message("fcm"))
        assert (outcome.kind, outcome.reason, outcome.error_code) == ("permanent", "auth", "PERMISSION_DENIED")
        assert await env.ledger() == []


async def test_an_expired_apns_provider_token_is_renewed_and_the_push_sent_once() -> None:
    async with simulated() as env:
        apns = env.connector("apns")
        assert isinstance(apns, ApnsPush)
        stale = jwt.encode({"iss": apns.team_id, "iat": int(time.time()) - 2 * 3600}, apns.key, algorithm="ES256",
                           headers={"kid": apns.key_id})
        apns._jwt = (stale, time.time())  # cached as fresh: our clock and APNs' disagree
        outcome = await apns.send(message("apns", NID))
        assert outcome.kind == "accepted", outcome
        assert len(await env.ledger(provider="apns")) == 1
        async with env.http.get(f"{env.sim_url}/_admin/stats") as resp:
            assert (await resp.json())["apns"] == {"403": 1, "200": 1, "accepted": 1}


async def test_apns_multiplexes_concurrent_pushes_over_http2() -> None:
    async with simulated() as env:
        await env.configure("apns", latency_ms=100)
        apns = env.connector("apns")
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(apns.send(message("apns", f"n-{i}")) for i in range(20)))
        assert [o.kind for o in outcomes] == ["accepted"] * 20
        assert time.perf_counter() - started < 0.9  # 20 x 100 ms in parallel streams, not one after another
        assert len({o.provider_message_id for o in outcomes}) == 20
        assert len(await env.ledger(provider="apns")) == 20
        assert isinstance(apns, ApnsPush) and apns._client is not None
        async with httpx.AsyncClient(http1=True, http2=False) as http1:  # APNs speaks HTTP/2 only
            with pytest.raises(httpx.HTTPError):
                await http1.post(f"{env.settings.provider_base_url('apns')}/3/device/{PUSH_TO['apns']}")


async def test_the_apns_simulator_checks_the_topic_and_headers() -> None:
    async with simulated() as env:
        apns = env.connector("apns")
        assert isinstance(apns, ApnsPush)
        url, headers, body = apns.request_parts(message("apns", NID))
        auth = {"authorization": f"bearer {apns.provider_token()}"}
        async with httpx.AsyncClient(http1=False, http2=True) as client:
            async def post(changes: dict[str, str | None], payload: bytes = body) -> tuple[int, Any]:
                sent = {k: v for k, v in {**headers, **auth, **changes}.items() if v is not None}
                resp = await client.post(url, headers=sent, content=payload)
                assert resp.http_version == "HTTP/2"
                return resp.status_code, resp.json() if resp.content else None

            assert await post({"apns-topic": None}) == (400, {"reason": "MissingTopic"})
            assert await post({"apns-topic": "com.other.app"}) == (400, {"reason": "DeviceTokenNotForTopic"})
            assert await post({"apns-collapse-id": "c" * 65}) == (400, {"reason": "BadCollapseId"})
            assert await post({"apns-id": "n-1"}) == (400, {"reason": "BadMessageId"})
            assert await post({"authorization": None}) == (403, {"reason": "MissingProviderToken"})
            assert await post({}, b"") == (400, {"reason": "PayloadEmpty"})
            assert await post({}, b"{" + b" " * 5000 + b"}") == (413, {"reason": "PayloadTooLarge"})
        assert await env.ledger() == []


@pytest.mark.parametrize("provider", PUSH)
async def test_connection_refused_is_transient(provider: str) -> None:
    settings = config.load({"NOTIFY_SIMULATOR_PORT": str(free_port()), "NOTIFY_SIMULATOR_APNS_PORT": str(free_port())})
    connector = create_connector(provider, settings)
    try:
        outcome = await connector.send(message(provider))
    finally:
        await connector.close()
    assert (outcome.kind, outcome.reason) == ("transient", "connection"), outcome


async def test_fcm_refused_after_the_token_was_granted_is_transient() -> None:
    async with simulated() as env:
        fcm = env.connector("fcm", base_url=f"http://127.0.0.1:{free_port()}/fcm")
        outcome = await fcm.send(message("fcm"))
        assert (outcome.kind, outcome.reason) == ("transient", "connection"), outcome


async def test_run_simulator_serves_apns_on_its_own_port() -> None:
    settings = config.load({"NOTIFY_SIMULATOR_PORT": str(free_port()), "NOTIFY_SIMULATOR_APNS_PORT": str(free_port())})
    ready = asyncio.Event()
    server = asyncio.create_task(run_simulator(settings, ready=ready))
    await asyncio.wait_for(ready.wait(), 5)
    connectors = [create_connector(p, settings) for p in PUSH]
    try:
        assert [(await c.send(message(c.name))).kind for c in connectors] == ["accepted", "accepted"]
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
        assert (await connectors[1].send(message("apns"))).kind in ("transient", "ambiguous")
    finally:
        for connector in connectors:
            await connector.close()
