"""`Connector.find`: looking a message up at the provider by our reference (notification id / recipient / body),
for sends that got no answer. Each connector through its real SDK/HTTP path against the provider simulator; no
stack needed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from datetime import UTC, datetime, timedelta

import pytest
from support.provider_sim import DELAY_MS, PROVIDERS, message, simulated

from connectors.base import Connector, Found, Message, ProviderQueryError
from connectors.factory import create_connector
from pipeline import config

# Long enough for the simulator to count a message delivered (Twilio lists a message by its date sent, which a
# queued one does not have yet).
SETTLE_S = DELAY_MS / 1000 + 0.1


def _recently() -> datetime:
    """A `since` a little before now, the way a reconciler would take the attempt's start."""
    return datetime.now(UTC) - timedelta(seconds=1)


async def _sent(connector: Connector, msg: Message) -> str:
    outcome = await connector.send(msg)
    assert outcome.kind == "accepted" and outcome.provider_message_id is not None, outcome
    await asyncio.sleep(SETTLE_S)
    return outcome.provider_message_id


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_sent_message_is_found_with_the_id_the_send_returned_and_its_status(provider: str) -> None:
    async with simulated(webhooks=False) as env:
        connector = env.connector(provider)
        since = _recently()
        await _sent(connector, message(provider, "n-other"))  # another message to the same recipient
        msg = dataclasses.replace(message(provider, "n-find"), body="Your code is 654321")
        provider_message_id = await _sent(connector, msg)
        [found] = await connector.find(msg, since)
        assert isinstance(found, Found)
        assert found.provider_message_id == provider_message_id
        assert found.status.state == "delivered"
        assert found.status == await connector.status(provider_message_id)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_message_never_sent_is_not_found(provider: str) -> None:
    async with simulated(webhooks=False) as env:
        connector = env.connector(provider)
        since = _recently()
        await _sent(connector, message(provider, "n-sent"))
        never = dataclasses.replace(message(provider, "n-never"), body="Your code is 000000")
        assert await connector.find(never, since) == []


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_message_sent_before_since_is_not_found(provider: str) -> None:
    async with simulated(webhooks=False) as env:
        connector = env.connector(provider)
        msg = message(provider, "n-old")
        await _sent(connector, msg)
        assert await connector.find(msg, datetime.now(UTC) + timedelta(seconds=1)) == []
        assert len(await connector.find(msg, _recently())) == 1  # the same lookup with an earlier since
        if provider in ("twilio", "termii"):  # content matches: `until` bounds the window from the other side
            assert await connector.find(msg, _recently(), until=datetime.now(UTC) - timedelta(seconds=30)) == []


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_the_newest_of_two_sends_is_found(provider: str) -> None:
    async with simulated(webhooks=False) as env:
        connector = env.connector(provider)
        since = _recently()
        msg = message(provider, "n-twice")
        await _sent(connector, msg)
        await asyncio.sleep(1)  # providers stamp to the second
        second = await _sent(connector, msg)
        found = await connector.find(msg, since)
        assert len(found) == 2 and found[0].provider_message_id == second  # both, newest first


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_an_outage_is_a_query_error_not_a_missing_message(provider: str) -> None:
    async with simulated(webhooks=False) as env:
        connector = env.connector(provider)
        msg = message(provider, "n-down")
        await _sent(connector, msg)
        await env.configure(provider, outage_s=60)
        with pytest.raises(ProviderQueryError):
            await connector.find(msg, _recently())


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_wrong_credentials_are_a_query_error(provider: str) -> None:
    credentials = {"twilio": {"auth_token": "wrong"}, "termii": {"api_key": "wrong"},
                   "sendgrid": {"api_key": "SG.wrong"}, "mailgun": {"api_key": "wrong"}}[provider]
    async with simulated(webhooks=False) as env:
        with pytest.raises(ProviderQueryError):
            await env.connector(provider, **credentials).find(message(provider), _recently())


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_an_accept_then_hang_send_reported_ambiguous_is_found(provider: str) -> None:
    async with simulated(webhooks=False) as env:
        connector = env.connector(provider, timeout_s=0.3)
        since = _recently()
        await env.configure(provider, accept_then_hang=True)
        msg = message(provider, "n-hang")
        outcome = await connector.send(msg)
        assert outcome.kind == "ambiguous" and outcome.provider_message_id is None, outcome
        await asyncio.sleep(SETTLE_S)
        [found] = await connector.find(msg, since)
        [entry] = await env.ledger(provider=provider)  # (Twilio's ledger learns notification ids from callbacks)
        assert entry["hung"] is True
        assert found.provider_message_id == entry["provider_message_id"]
        assert found.status.state == "delivered"


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_provider_that_cannot_be_reached_is_a_query_error(provider: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    connector = create_connector(provider, config.load({"NOTIFY_SIMULATOR_PORT": str(closed_port)}))
    try:
        with pytest.raises(ProviderQueryError):
            await connector.find(message(provider), _recently())
    finally:
        await connector.close()


@pytest.mark.parametrize("provider", ["fcm", "apns"])
async def test_push_providers_have_no_lookup(provider: str) -> None:
    async with simulated(webhooks=False) as env:
        with pytest.raises(ProviderQueryError, match="no lookup"):
            await env.connector(provider).find(message(provider), _recently())


async def test_the_twilio_sdk_pages_through_the_simulators_message_list() -> None:
    async with simulated(webhooks=False) as env:
        twilio = env.connector("twilio")
        for i in range(5):
            await twilio.send(dataclasses.replace(message("twilio", f"n-{i}"), body=f"message {i}"))
        await twilio.send(message("twilio", "n-elsewhere", to="+2348039999999"))
        await asyncio.sleep(SETTLE_S)
        client = twilio.client  # type: ignore[attr-defined]  # TwilioSms's SDK client
        listed = await client.messages.list_async(to=message("twilio").to, page_size=2)
        assert [m.body for m in listed] == [f"message {i}" for i in reversed(range(5))]  # newest first, 3 pages
