"""The provider simulator on free ports for tests (HTTP/1.1 and APNs' HTTP/2), with a webhook receiver and settings
pointing at them.

    async with simulated() as env:
        outcome = await env.connector("twilio").send(message("twilio", "n-1"))
        [entry] = await env.ledger(provider="twilio")
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from connectors.base import Channel, Connector, Message
from connectors.factory import create_connector
from connectors.simulator import create_simulator_app
from connectors.simulator.apns import ApnsServer
from connectors.simulator.common import SIM
from pipeline import config
from pipeline.config import Settings

PROVIDERS = ["twilio", "termii", "sendgrid", "mailgun"]
CHANNEL: dict[str, Channel] = {"twilio": "sms", "termii": "sms", "sendgrid": "email", "mailgun": "email",
                                "fcm": "push", "apns": "push"}
GOOD_TO = {"sms": "+2348031234567", "email": "ada@example.com"}
# Push recipients are per provider: an FCM registration token, an APNs device token (64 hex).
PUSH_TO = {"fcm": "dGVzdC1kZXZpY2U6APA91bHsimulatorRegistrationToken-1", "apns": "a1b2c3d4" * 8}
BAD_TO = {"twilio": "+15005550001", "termii": "12", "sendgrid": "ada@localhost", "mailgun": "ada@localhost"}
WRONG_CREDENTIALS = {"twilio": {"auth_token": "wrong"}, "termii": {"api_key": "wrong"},
                     "sendgrid": {"api_key": "SG.wrong"}, "mailgun": {"api_key": "wrong"}}
DELAY_MS = 100


@dataclass
class Hook:
    provider: str
    url: str
    body: bytes
    headers: dict[str, str]


@dataclass
class Env:
    settings: Settings
    http: aiohttp.ClientSession
    sim_url: str
    hooks: list[Hook]
    connectors: list[Connector] = field(default_factory=list)

    def connector(self, provider: str, **overrides: Any) -> Connector:
        made = create_connector(provider, self.settings, **overrides)
        self.connectors.append(made)
        return made

    async def configure(self, provider: str, **faults: Any) -> None:
        async with self.http.post(f"{self.sim_url}/_admin/providers/{provider}", json=faults) as resp:
            assert resp.status == 200, await resp.text()

    async def ledger(self, **filters: str) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.sim_url}/_admin/ledger", params=filters) as resp:
            data = await resp.json()
        assert data["count"] == len(data["entries"])
        return list(data["entries"])

    async def test_sends(self, provider: str | None = None) -> list[dict[str, Any]]:
        params = {} if provider is None else {"provider": provider}
        async with self.http.get(f"{self.sim_url}/_admin/test-sends", params=params) as resp:
            return list((await resp.json())["entries"])

    async def wait_hooks(self, count: int, timeout: float = 3.0) -> list[Hook]:
        deadline = time.monotonic() + timeout
        while len(self.hooks) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.hooks


@asynccontextmanager
async def simulated(*, webhooks: bool = True, timeout_s: str = "5") -> AsyncIterator[Env]:
    """A webhook receiver and the simulator on free ports, settings pointing at both."""
    hooks: list[Hook] = []

    async def receive(request: web.Request) -> web.Response:
        hooks.append(Hook(request.match_info["provider"], str(request.url), await request.read(),
                          dict(request.headers)))
        return web.Response(text="ok")

    receiver = web.Application()
    receiver.router.add_post("/hooks/{provider}", receive)
    async with TestServer(receiver, host="127.0.0.1") as hook_server, aiohttp.ClientSession() as http:
        env_vars = {"NOTIFY_SIMULATOR_DELIVERY_DELAY_MS": str(DELAY_MS), "NOTIFY_PROVIDER_TIMEOUT_S": timeout_s,
                    "NOTIFY_PROVIDER_CONNECT_TIMEOUT_S": "1"}
        if webhooks:
            env_vars["NOTIFY_WEBHOOK_BASE_URL"] = str(hook_server.make_url("/hooks"))
        settings = config.load(env_vars)
        app = create_simulator_app(settings, seed=7)
        apns = ApnsServer(app[SIM])
        async with TestServer(app, host="127.0.0.1") as sim:
            assert sim.port is not None
            apns_port = await apns.start("127.0.0.1", 0)
            env = Env(dataclasses.replace(settings, simulator_port=sim.port, simulator_apns_port=apns_port), http,
                      str(sim.make_url("")).rstrip("/"), hooks)
            try:
                yield env
            finally:
                for made in env.connectors:
                    await made.close()
                await apns.close()


def message(provider: str, nid: str = "n-1", to: str | None = None) -> Message:
    channel = CHANNEL[provider]
    return Message(nid, channel, to or PUSH_TO.get(provider) or GOOD_TO[channel], "Your code is 123456",
                   subject="Your code")
