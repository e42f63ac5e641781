"""Pure parts of the connectors, without a network: outcome classification per provider, Retry-After, transport
errors, receipt signatures and parsing, the simulator's fault settings."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from email.utils import formatdate
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from twilio.request_validator import RequestValidator

from connectors import mailgun_email, sendgrid_email, termii_sms, twilio_sms
from connectors.base import classify_exception, parse_retry_after
from connectors.factory import create_connector
from connectors.simulator import sendgrid as sim_sendgrid
from connectors.simulator.state import FaultConfig, FaultConfigError
from pipeline import config
from pipeline.config import Settings
from pipeline.errors import ConfigError


@pytest.fixture
def cfg() -> Settings:
    return config.load({})


def twilio_error(status: int, code: int, message: str = "x") -> dict[str, Any]:
    return {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status}


@pytest.mark.parametrize(("status", "body", "headers", "kind", "reason", "code"), [
    (201, {"sid": "SM" + "a" * 32, "status": "queued"}, {}, "accepted", "ok", None),
    (400, twilio_error(400, 21211, "The 'To' number 123 is not a valid phone number."), {}, "permanent",
     "invalid_recipient", "21211"),
    (400, twilio_error(400, 21610, "Attempt to send to unsubscribed recipient"), {}, "permanent", "unsubscribed",
     "21610"),
    (400, twilio_error(400, 21614), {}, "permanent", "invalid_recipient", "21614"),
    (401, {"code": 20003, "detail": "Your AccountSid or AuthToken was incorrect.", "message": "Authenticate",
           "status": 401}, {}, "permanent", "auth", "20003"),
    (429, twilio_error(429, 20429, "Too Many Requests"), {"Retry-After": "3"}, "transient", "rate_limited", "20429"),
    (500, twilio_error(500, 20500), {}, "transient", "server_error", "20500"),
    (503, "<html>Service Unavailable</html>", {}, "transient", "server_error", "503"),
    (400, twilio_error(400, 12345), {}, "permanent", "bad_request", "12345"),
    (201, {"status": "queued"}, {}, "ambiguous", "server_error", "201"),
])
def test_twilio_answers_are_classified_by_status_and_twilio_error_code(
        status: int, body: Any, headers: dict[str, str], kind: str, reason: str, code: str | None) -> None:
    outcome = twilio_sms.classify(status, body if isinstance(body, str) else json.dumps(body), headers)
    assert (outcome.kind, outcome.reason, outcome.error_code) == (kind, reason, code)
    assert outcome.provider == "twilio"
    if kind == "accepted":
        assert outcome.provider_message_id == "SM" + "a" * 32
    if status == 429:
        assert outcome.retry_after_s == 3.0


@pytest.mark.parametrize(("status", "body", "headers", "kind", "reason"), [
    (200, {"code": "ok", "message_id": "3017000000000000000001", "message": "Successfully Sent"}, {}, "accepted",
     "ok"),
    (400, {"code": "fail", "message": "Invalid phone number: 123"}, {}, "permanent", "invalid_recipient"),
    (400, {"code": "fail", "message": "Invalid Sender Id"}, {}, "permanent", "bad_request"),
    (401, {"code": "fail", "message": "Unauthorized: No valid API key provided"}, {}, "permanent", "auth"),
    (422, {"code": "fail", "message": "The sms field is required."}, {}, "permanent", "bad_request"),
    (429, {"message": "Too Many Requests"}, {"Retry-After": "5"}, "transient", "rate_limited"),
    (502, "Bad Gateway", {}, "transient", "server_error"),
    (200, {"message": "Insufficient balance"}, {}, "ambiguous", "server_error"),
])
def test_termii_answers_are_classified(status: int, body: Any, headers: dict[str, str], kind: str,
                                       reason: str) -> None:
    outcome = termii_sms.classify(status, body if isinstance(body, str) else json.dumps(body), headers)
    assert (outcome.kind, outcome.reason) == (kind, reason)
    if kind == "accepted":
        assert outcome.provider_message_id == "3017000000000000000001"
    if status == 429:
        assert outcome.retry_after_s == 5.0


def sendgrid_errors(message: str, field: str | None = None) -> str:
    return json.dumps({"errors": [{"message": message, "field": field, "help": None}]})


@pytest.mark.parametrize(("status", "body", "headers", "kind", "reason"), [
    (202, "", {"X-Message-Id": "W86EgYT6SQKk0lRflfLRsA"}, "accepted", "ok"),
    (202, "", {}, "ambiguous", "server_error"),
    (400, sendgrid_errors("Does not contain a valid address.", "personalizations.0.to.0.email"), {}, "permanent",
     "invalid_recipient"),
    (400, sendgrid_errors("The subject is required.", "subject"), {}, "permanent", "bad_request"),
    (401, sendgrid_errors("The provided authorization grant is invalid, expired, or revoked"), {}, "permanent",
     "auth"),
    (403, sendgrid_errors("access forbidden"), {}, "permanent", "auth"),
    (413, sendgrid_errors("Payload Too Large"), {}, "permanent", "bad_request"),
    (429, sendgrid_errors("too many requests"), {"Retry-After": "7"}, "transient", "rate_limited"),
    (500, sendgrid_errors("internal error"), {}, "transient", "server_error"),
])
def test_sendgrid_answers_are_classified(status: int, body: str, headers: dict[str, str], kind: str,
                                         reason: str) -> None:
    outcome = sendgrid_email.classify(status, body, headers)
    assert (outcome.kind, outcome.reason) == (kind, reason)
    if kind == "accepted":
        assert outcome.provider_message_id == "W86EgYT6SQKk0lRflfLRsA"
    if status == 429:
        assert outcome.retry_after_s == 7.0


def test_a_sendgrid_429_without_retry_after_waits_until_the_rate_limit_reset() -> None:
    reset = str(int(time.time()) + 30)
    outcome = sendgrid_email.classify(429, sendgrid_errors("too many requests"), {"X-RateLimit-Reset": reset})
    assert outcome.kind == "transient"
    assert outcome.retry_after_s is not None and 28 <= outcome.retry_after_s <= 30


@pytest.mark.parametrize(("status", "body", "kind", "reason"), [
    (200, {"id": "<20260101120000.abc@mg.notify.example>", "message": "Queued. Thank you."}, "accepted", "ok"),
    (400, {"message": "to parameter is not a valid address. please check documentation"}, "permanent",
     "invalid_recipient"),
    (400, {"message": "from parameter is missing"}, "permanent", "bad_request"),
    (401, "Forbidden", "permanent", "auth"),
    (404, {"message": "Domain not found: mg.example"}, "permanent", "bad_request"),
    (429, {"message": "Too many requests"}, "transient", "rate_limited"),
    (503, {"message": "Service Unavailable"}, "transient", "server_error"),
])
def test_mailgun_answers_are_classified(status: int, body: Any, kind: str, reason: str) -> None:
    outcome = mailgun_email.classify(status, body if isinstance(body, str) else json.dumps(body), {})
    assert (outcome.kind, outcome.reason) == (kind, reason)
    if kind == "accepted":
        assert outcome.provider_message_id == "20260101120000.abc@mg.notify.example"  # without angle brackets


def test_retry_after_reads_seconds_and_http_dates_and_ignores_garbage() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    in_a_minute = parse_retry_after(formatdate(time.time() + 60, usegmt=True))
    assert in_a_minute is not None and 58 <= in_a_minute <= 60


def test_transport_errors_are_transient_before_the_request_left_and_ambiguous_after() -> None:
    refused = aiohttp.ClientConnectorError(aiohttp.client_reqrep.ConnectionKey(
        "127.0.0.1", 1, False, True, None, None, None), ConnectionRefusedError(111, "Connection refused"))
    assert classify_exception("twilio", refused).kind == "transient"
    assert classify_exception("twilio", aiohttp.ConnectionTimeoutError("connect")).kind == "transient"
    assert classify_exception("twilio", aiohttp.InvalidURL("nohost")).kind == "transient"
    assert classify_exception("twilio", TimeoutError()).kind == "ambiguous"
    assert classify_exception("twilio", aiohttp.SocketTimeoutError("read")).kind == "ambiguous"
    assert classify_exception("twilio", aiohttp.ServerDisconnectedError()).kind == "ambiguous"


def test_the_simulators_sendgrid_signing_key_matches_the_configured_default(cfg: Settings) -> None:
    assert sim_sendgrid.public_key() == cfg.sendgrid_webhook_public_key


def test_twilio_receipts_verify_with_the_auth_token_and_carry_our_notification_id(cfg: Settings) -> None:
    connector = create_connector("twilio", cfg)
    url = "https://hooks.example/twilio?nid=n-1"
    params = {"MessageSid": "SM" + "b" * 32, "MessageStatus": "undelivered", "ErrorCode": "30003", "To": "+1555"}
    signature = RequestValidator(cfg.twilio_auth_token).compute_signature(url, params)
    body = urlencode(params).encode()
    assert connector.verify_receipt(url, body, {"x-twilio-signature": signature})
    assert not connector.verify_receipt(url, body.replace(b"undelivered", b"delivered"),
                                        {"X-Twilio-Signature": signature})
    assert not connector.verify_receipt(url, body, {})
    [receipt] = connector.parse_receipt(url, body, {})
    assert (receipt.provider_message_id, receipt.status, receipt.notification_id, receipt.error_code) == (
        "SM" + "b" * 32, "failed", "n-1", "30003")


def test_termii_receipts_verify_with_hmac_sha512_of_the_body(cfg: Settings) -> None:
    connector = create_connector("termii", cfg)
    body = json.dumps({"type": "outbound", "message_id": "301700", "status": "DELIVERED",
                       "sent_at": "2026-01-01 10:00:00"}).encode()
    signature = hmac.new(cfg.termii_secret_key.encode(), body, hashlib.sha512).hexdigest()
    assert connector.verify_receipt("", body, {"X-Termii-Signature": signature})
    assert not connector.verify_receipt("", body + b" ", {"X-Termii-Signature": signature})
    [receipt] = connector.parse_receipt("", body, {})
    assert (receipt.provider_message_id, receipt.status, receipt.occurred_at is not None) == ("301700", "delivered",
                                                                                               True)


def test_sendgrid_events_map_to_receipts_and_a_forged_signature_fails(cfg: Settings) -> None:
    connector = create_connector("sendgrid", cfg)
    events = [{"event": "bounce", "sg_message_id": "abc.filterdrecv-1", "timestamp": 1767261600, "status": "5.1.1",
               "reason": "550 no such user", "notification_id": "n-2"},
              {"event": "open", "sg_message_id": "abc.filterdrecv-1", "timestamp": 1767261600}]
    body = json.dumps(events).encode()
    forged = base64.b64encode(b"0" * 70).decode()
    assert not connector.verify_receipt("", body, {"X-Twilio-Email-Event-Webhook-Signature": forged,
                                                   "X-Twilio-Email-Event-Webhook-Timestamp": "1"})
    bounce, opened = connector.parse_receipt("", body, {})
    assert (bounce.provider_message_id, bounce.status, bounce.notification_id, bounce.error_code) == (
        "abc", "failed", "n-2", "5.1.1")
    assert opened.status == "opened"


def test_mailgun_receipts_verify_the_body_signature_and_temporary_failures_are_deferred(cfg: Settings) -> None:
    connector = create_connector("mailgun", cfg)
    timestamp, token = "1767261600", "t" * 50
    signature = hmac.new(cfg.mailgun_webhook_signing_key.encode(), (timestamp + token).encode(),
                         hashlib.sha256).hexdigest()
    event = {"event": "failed", "severity": "temporary", "timestamp": 1767261600.5,
             "message": {"headers": {"message-id": "m1@mg"}}, "user-variables": {"notification_id": "n-3"},
             "delivery-status": {"code": 452, "message": "mailbox full"}}
    body = json.dumps({"signature": {"timestamp": timestamp, "token": token, "signature": signature},
                       "event-data": event}).encode()
    assert connector.verify_receipt("", body, {})
    assert not connector.verify_receipt("", body.replace(token.encode(), b"u" * 50), {})
    [receipt] = connector.parse_receipt("", body, {})
    assert (receipt.provider_message_id, receipt.status, receipt.notification_id, receipt.error_code) == (
        "m1@mg", "deferred", "n-3", "452")


def test_fault_settings_are_validated_and_merged() -> None:
    faults = FaultConfig().updated({"error_rates": {"5xx": 0.5}, "latency_ms": 10})
    faults = faults.updated({"accept_then_hang": 0.25, "jitter_ms": 2})
    assert (faults.error_rates, faults.latency_ms, faults.jitter_ms, faults.accept_then_hang) == (
        {"5xx": 0.5}, 10.0, 2.0, 0.25)
    assert FaultConfig().updated({"accept_then_hang": True}).accept_then_hang == 1.0
    with pytest.raises(FaultConfigError):
        FaultConfig().updated({"error_rates": {"5xx": 0.7, "429": 0.5}})
    with pytest.raises(FaultConfigError):
        FaultConfig().updated({"latncy_ms": 5})
    with pytest.raises(FaultConfigError):
        FaultConfig().updated({"error_rates": {"timeout": 0.1}})
    with pytest.raises(FaultConfigError):
        FaultConfig().updated({"undelivered_rate": 2})
    assert FaultConfig().updated({"outage_s": 30}).public()["outage_remaining_s"] > 29


def test_provider_settings_default_to_the_simulator_and_reject_bad_urls() -> None:
    settings = config.load({"NOTIFY_SIMULATOR_PORT": "58111", "NOTIFY_MAILGUN_BASE_URL": "https://api.mailgun.net/"})
    assert settings.provider_base_url("twilio") == "http://127.0.0.1:58111/twilio"
    assert settings.provider_base_url("mailgun") == "https://api.mailgun.net"
    assert settings.webhook_url("twilio") is None
    with pytest.raises(ConfigError, match="NOTIFY_WEBHOOK_BASE_URL"):
        config.load({"NOTIFY_WEBHOOK_BASE_URL": "hooks.example"})
    with pytest.raises(ConfigError, match="NOTIFY_PROVIDER_TIMEOUT_S"):
        config.load({"NOTIFY_PROVIDER_TIMEOUT_S": "0"})
