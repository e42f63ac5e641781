"""Each connector through its real SDK/HTTP path against the provider simulator on a free local port.

The simulator's ledger is the ground truth: every test counts what the provider really accepted. No stack needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import socket
import time
from urllib.parse import parse_qsl

import pytest
from support.provider_sim import BAD_TO, CHANNEL, DELAY_MS, GOOD_TO, PROVIDERS, WRONG_CREDENTIALS, message, simulated
from twilio.request_validator import RequestValidator

from connectors.factory import create_connector
from connectors.simulator import run_simulator
from pipeline import config

ID_SHAPES = {"twilio": r"^SM[0-9a-f]{32}$", "termii": r"^3017\d{21}$", "sendgrid": r"^[A-Za-z0-9_-]{22}$",
             "mailgun": r"^\d{14}\.[0-9a-f]{16}@mg\.notify\.example$"}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_an_accepted_message_has_the_providers_id_and_exactly_one_ledger_entry(provider: str) -> None:
    async with simulated() as env:
        outcome = await env.connector(provider).send(message(provider, "n-acc"))
        assert (outcome.kind, outcome.reason) == ("accepted", "ok"), outcome
        assert outcome.provider_message_id is not None
        assert re.match(ID_SHAPES[provider], outcome.provider_message_id)
        assert outcome.latency_s > 0
        [entry] = await env.ledger(provider=provider)
        expected_to = GOOD_TO[CHANNEL[provider]].lstrip("+") if provider == "termii" else GOOD_TO[CHANNEL[provider]]
        assert (entry["provider_message_id"], entry["notification_id"], entry["to"], entry["hung"]) == (
            outcome.provider_message_id, "n-acc", expected_to, False)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_wrong_credentials_are_a_permanent_auth_failure_and_nothing_is_accepted(provider: str) -> None:
    async with simulated() as env:
        outcome = await env.connector(provider, **WRONG_CREDENTIALS[provider]).send(message(provider))
        assert (outcome.kind, outcome.reason) == ("permanent", "auth"), outcome
        assert await env.ledger() == []


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_an_invalid_recipient_is_permanent_and_nothing_is_accepted(provider: str) -> None:
    async with simulated() as env:
        outcome = await env.connector(provider).send(message(provider, to=BAD_TO[provider]))
        assert (outcome.kind, outcome.reason) == ("permanent", "invalid_recipient"), outcome
        assert await env.ledger() == []


async def test_an_email_without_at_sign_is_refused_before_any_request() -> None:
    async with simulated() as env:
        for provider in ("sendgrid", "mailgun"):
            outcome = await env.connector(provider).send(message(provider, to="not-an-email"))
            assert (outcome.kind, outcome.reason) == ("permanent", "invalid_recipient"), outcome
        async with env.http.get(f"{env.sim_url}/_admin/stats") as resp:
            stats = await resp.json()
        assert (stats["sendgrid"], stats["mailgun"]) == ({}, {"400": 1})  # SendGrid's SDK helper cannot build it
        assert await env.ledger() == []


async def test_twilio_unsubscribed_and_landline_numbers_are_permanent_with_twilios_codes() -> None:
    async with simulated() as env:
        twilio = env.connector("twilio")
        stop = await twilio.send(message("twilio", to="+15005550004"))
        landline = await twilio.send(message("twilio", to="+15005550009"))
        assert (stop.kind, stop.reason, stop.error_code) == ("permanent", "unsubscribed", "21610")
        assert (landline.kind, landline.reason, landline.error_code) == ("permanent", "invalid_recipient", "21614")
        assert await env.ledger() == []


async def test_concurrent_twilio_sends_each_get_their_own_answer() -> None:
    async with simulated() as env:
        twilio = env.connector("twilio")
        recipients = ["+15005550001" if i % 3 == 0 else f"+1555000{i:04d}" for i in range(12)]
        outcomes = await asyncio.gather(*(twilio.send(message("twilio", f"n-{i}", to))
                                          for i, to in enumerate(recipients)))
        assert [o.kind for o in outcomes] == ["permanent" if i % 3 == 0 else "accepted" for i in range(12)]
        assert len(await env.ledger(provider="twilio")) == 8


async def test_twilio_test_mode_uses_the_test_credentials_and_lands_in_test_sends_not_the_ledger() -> None:
    async with simulated() as env:
        twilio = env.connector("twilio")
        shadow = dataclasses.replace(message("twilio", "n-shadow"), test_mode=True)
        outcome = await twilio.send(shadow)
        assert (outcome.kind, outcome.reason) == ("accepted", "ok"), outcome
        refused = await twilio.send(dataclasses.replace(shadow, to="+15005550001"))
        assert (refused.kind, refused.error_code) == ("permanent", "21211")  # checked like a real send
        async with env.http.get(f"{env.sim_url}/_admin/test-sends?provider=twilio") as resp:
            [entry] = (await resp.json())["entries"]
        assert (entry["notification_id"], entry["provider_message_id"]) == ("n-shadow", outcome.provider_message_id)
        assert await env.ledger() == []  # nobody received it
        wrong = await env.connector("twilio", test_auth_token="not-the-test-token").send(shadow)
        assert (wrong.kind, wrong.reason) == ("permanent", "auth")
        with pytest.raises(ValueError, match="no test mode"):
            await env.connector("termii").send(dataclasses.replace(message("termii"), test_mode=True))


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_programmed_5xx_is_transient(provider: str) -> None:
    async with simulated() as env:
        await env.configure(provider, error_rates={"5xx": 1.0})
        outcome = await env.connector(provider).send(message(provider))
        assert (outcome.kind, outcome.reason, outcome.retryable) == ("transient", "server_error", True), outcome
        assert await env.ledger() == []


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_429_is_transient_with_the_retry_after_the_provider_asked_for(provider: str) -> None:
    async with simulated() as env:
        await env.configure(provider, error_rates={"429": 1.0}, retry_after_s=2)
        outcome = await env.connector(provider).send(message(provider))
        assert (outcome.kind, outcome.reason, outcome.retry_after_s) == ("transient", "rate_limited", 2.0), outcome
        assert await env.ledger() == []


async def test_the_rate_limit_answers_429_beyond_the_programmed_requests_per_second() -> None:
    async with simulated() as env:
        await env.configure("sendgrid", rate_limit_per_s=3, retry_after_s=1)
        sendgrid = env.connector("sendgrid")
        outcomes = await asyncio.gather(*(sendgrid.send(message("sendgrid", f"n-{i}")) for i in range(5)))
        kinds = sorted(o.kind for o in outcomes)
        # Normally 3 accepted and 2 throttled; a second boundary in the middle can let one more through.
        assert kinds.count("transient") in (1, 2) and kinds.count("accepted") == 5 - kinds.count("transient")
        assert len(await env.ledger()) == kinds.count("accepted")


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_an_outage_is_transient_and_sending_works_again_when_it_ends(provider: str) -> None:
    async with simulated() as env:
        connector = env.connector(provider)
        await env.configure(provider, outage_s=60)
        during = await connector.send(message(provider, "n-down"))
        assert (during.kind, during.reason) == ("transient", "server_error"), during
        await env.configure(provider, outage_s=0)
        after = await connector.send(message(provider, "n-up"))
        assert after.kind == "accepted"
        assert [e["notification_id"] for e in await env.ledger()] == ["n-up"]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_connection_refused_is_transient(provider: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    settings = config.load({"NOTIFY_SIMULATOR_PORT": str(closed_port)})
    connector = create_connector(provider, settings)
    try:
        outcome = await connector.send(message(provider))
    finally:
        await connector.close()
    assert (outcome.kind, outcome.reason) == ("transient", "connection"), outcome


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_accept_then_hang_is_ambiguous_while_the_ledger_shows_the_message_accepted(provider: str) -> None:
    async with simulated() as env:
        await env.configure(provider, accept_then_hang=True)
        outcome = await env.connector(provider, timeout_s=0.3).send(message(provider, "n-hang"))
        assert (outcome.kind, outcome.reason, outcome.retryable) == ("ambiguous", "timeout", False), outcome
        assert 0.25 < outcome.latency_s < 2
        [entry] = await env.ledger(provider=provider, notification_id="n-hang")
        assert (entry["hung"], entry["status"] in ("accepted", "delivered")) == (True, True)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_status_is_pending_then_delivered_after_the_delay_and_unknown_for_other_ids(provider: str) -> None:
    async with simulated(webhooks=False) as env:
        connector = env.connector(provider)
        outcome = await connector.send(message(provider))
        assert outcome.provider_message_id is not None
        assert (await connector.status(outcome.provider_message_id)).state == "pending"
        await asyncio.sleep(DELAY_MS / 1000 + 0.05)
        assert (await connector.status(outcome.provider_message_id)).state == "delivered"
        unknown = {"twilio": "SM" + "0" * 32, "termii": "1", "sendgrid": "x" * 22, "mailgun": "nope@mg"}[provider]
        assert (await connector.status(unknown)).state == "unknown"
        assert env.hooks == []  # no webhook configured: no callbacks


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_the_delivery_callback_is_signed_and_parses_to_delivered(provider: str) -> None:
    async with simulated() as env:
        connector = env.connector(provider)
        outcome = await connector.send(message(provider, "n-cb"))
        [hook] = await env.wait_hooks(1)
        await asyncio.sleep(0.05)
        assert len(env.hooks) == 1 and hook.provider == provider
        assert connector.verify_receipt(hook.url, hook.body, hook.headers)
        # Mailgun signs timestamp + token only, not the event: tampering shows in the token.
        tampered = hook.body.replace(b'"token": "', b'"token": "x') if provider == "mailgun" else hook.body + b" "
        assert not connector.verify_receipt(hook.url, tampered, hook.headers)
        receipts = connector.parse_receipt(hook.url, hook.body, hook.headers)
        final = receipts[-1]
        assert (final.provider_message_id, final.status) == (outcome.provider_message_id, "delivered")
        # Termii does not echo a reference; the others carry our notification id back.
        assert final.notification_id == (None if provider == "termii" else "n-cb")
        [entry] = await env.ledger(provider=provider)
        assert [c["status"] for c in entry["callbacks"]] == [200]


async def test_the_twilio_status_callback_signature_is_twilios_own() -> None:
    async with simulated() as env:
        outcome = await env.connector("twilio").send(message("twilio", "n-sig"))
        [hook] = await env.wait_hooks(1)
        [entry] = await env.ledger(provider="twilio")
        assert entry["callback_url"] == hook.url and hook.url.endswith("/hooks/twilio?nid=n-sig")
        params = dict(parse_qsl(hook.body.decode()))
        validator = RequestValidator(env.settings.twilio_auth_token)
        assert validator.validate(hook.url, params, hook.headers["X-Twilio-Signature"])
        assert not RequestValidator("another-token").validate(hook.url, params, hook.headers["X-Twilio-Signature"])
        assert (params["MessageSid"], params["MessageStatus"]) == (outcome.provider_message_id, "delivered")


@pytest.mark.parametrize(("provider", "to"), [("termii", "+15005550004"), ("sendgrid", "x@bounce.simulator.invalid"),
                                              ("mailgun", "x@bounce.simulator.invalid")])
async def test_an_accepted_message_can_still_fail_delivery(provider: str, to: str) -> None:
    async with simulated() as env:
        connector = env.connector(provider)
        outcome = await connector.send(message(provider, "n-bounce", to=to))
        assert outcome.kind == "accepted" and outcome.provider_message_id is not None
        [hook] = await env.wait_hooks(1)
        assert connector.parse_receipt(hook.url, hook.body, hook.headers)[-1].status == "failed"
        assert (await connector.status(outcome.provider_message_id)).state == "failed"


async def test_max_concurrency_bounds_the_requests_in_flight() -> None:
    async with simulated(webhooks=False) as env:
        await env.configure("mailgun", latency_ms=100)
        mailgun = env.connector("mailgun", max_concurrency=2)
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(mailgun.send(message("mailgun", f"n-{i}")) for i in range(6)))
        elapsed = time.perf_counter() - started
        assert [o.kind for o in outcomes] == ["accepted"] * 6
        assert elapsed >= 0.29  # 3 rounds of 2, 100 ms each
        assert all(o.latency_s < 0.25 for o in outcomes)  # the wait for a slot is not provider latency


async def test_admin_rejects_bad_faults_counts_answers_and_resets() -> None:
    async with simulated(webhooks=False) as env:
        async with env.http.post(f"{env.sim_url}/_admin/providers/twilio", json={"error_rates": {"5xx": 2}}) as r:
            assert r.status == 400 and "between 0 and 1" in (await r.json())["error"]
        async with env.http.post(f"{env.sim_url}/_admin/providers/nexmo", json={}) as r:
            assert r.status == 404
        twilio = env.connector("twilio")
        await twilio.send(message("twilio"))
        await twilio.send(message("twilio", to="+15005550001"))
        async with env.http.get(f"{env.sim_url}/_admin/stats") as r:
            assert (await r.json())["twilio"] == {"201": 1, "400": 1, "accepted": 1}
        async with env.http.post(f"{env.sim_url}/_admin/reset") as r:
            assert r.status == 200
        assert await env.ledger() == []


async def test_run_simulator_serves_the_default_base_urls_until_cancelled() -> None:
    with socket.socket() as sock, socket.socket() as apns_sock:
        sock.bind(("127.0.0.1", 0))
        apns_sock.bind(("127.0.0.1", 0))
        port, apns_port = sock.getsockname()[1], apns_sock.getsockname()[1]
    settings = config.load({"NOTIFY_SIMULATOR_PORT": str(port), "NOTIFY_SIMULATOR_APNS_PORT": str(apns_port)})
    ready = asyncio.Event()
    server = asyncio.create_task(run_simulator(settings, ready=ready))
    await asyncio.wait_for(ready.wait(), 5)
    connector = create_connector("termii", settings)
    try:
        assert (await connector.send(message("termii"))).kind == "accepted"
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
        assert (await connector.send(message("termii"))).reason == "connection"
    finally:
        await connector.close()
