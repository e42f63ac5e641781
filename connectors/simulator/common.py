"""What the provider modules of the simulator share: the app's state object, auth parsing, magic recipients,
and the delivery-callback sender."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import heapq
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from connectors.simulator.state import LedgerEntry, SimulatorState
from pipeline.config import Settings

log = logging.getLogger("notify.simulator")

E164 = re.compile(r"^\+[1-9]\d{7,14}$")
EMAIL = re.compile(r"^[^@\s<>]+@[^@\s<>]+\.[A-Za-z]{2,}$")

# Twilio's documented magic test numbers, answered the same way by every SMS provider of the simulator.
MAGIC_INVALID = "+15005550001"  # Twilio 21211: not a valid phone number
MAGIC_UNREACHABLE = "+15005550002"  # Twilio 21612: cannot route to this number
MAGIC_NO_PERMISSION = "+15005550003"  # Twilio 21408: no permission for the region
MAGIC_UNSUBSCRIBED = "+15005550004"  # Twilio 21610: the recipient replied STOP (Termii: DND at delivery)
MAGIC_NOT_MOBILE = "+15005550009"  # Twilio 21614: not a mobile number
# Email recipients on this domain are accepted, then bounce (hard bounce at delivery).
BOUNCE_DOMAIN = "bounce.simulator.invalid"

# Built per accepted message when its callback is due: (body, headers) for the callback URL.
CallbackBuilder = Callable[[LedgerEntry, str], tuple[bytes, dict[str, str]]]
# A provider that batches its webhook (SendGrid's Event Webhook posts a JSON array of many messages' events): the
# events of one message when due, and the signed request for a batch of them.
EventsOf = Callable[[LedgerEntry], list[dict[str, Any]]]
SignBatch = Callable[[bytes], dict[str, str]]
BATCH_EVERY_S = 0.1  # how long events wait for others before their batch is posted
BATCH_MAX_EVENTS = 1000


@dataclass(order=True)
class _Due:
    at: float
    seq: int
    entry: LedgerEntry = field(compare=False)
    url: str = field(compare=False)
    events_of: EventsOf = field(compare=False)
    sign: SignBatch = field(compare=False)


@dataclass
class Simulator:
    settings: Settings
    state: SimulatorState
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    session: aiohttp.ClientSession | None = None
    _due: list[_Due] = field(default_factory=list)  # a heap: batched events by due time
    _batcher: asyncio.Task[None] | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def schedule_batched(self, entry: LedgerEntry, url: str | None, events_of: EventsOf, sign: SignBatch) -> None:
        """Queue the message's events for `url` once it is delivered; due events are posted in batches, as
        SendGrid's Event Webhook does (one request per BATCH_EVERY_S and URL, up to BATCH_MAX_EVENTS messages)."""
        if not url or self.state.rng.random() < self.state.faults[entry.provider].lost_receipts:
            return
        entry.callback_url = url
        heapq.heappush(self._due, _Due(entry.deliver_at + 0.005, entry.seq, entry, url, events_of, sign))
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._post_batches())
        self._wake.set()

    async def _post_batches(self) -> None:
        while self._due:
            wait = self._due[0].at - time.time()
            if wait > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            await asyncio.sleep(BATCH_EVERY_S)  # let the batch fill
            now = time.time()
            by_url: dict[str, list[_Due]] = {}
            while self._due and self._due[0].at <= now and sum(map(len, by_url.values())) < BATCH_MAX_EVENTS:
                due = heapq.heappop(self._due)
                by_url.setdefault(due.url, []).append(due)
            for url, items in by_url.items():
                task = asyncio.create_task(self._post_batch(url, items))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    async def _post_batch(self, url: str, items: list[_Due], attempts: int = 3) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        for attempt in range(attempts):
            body = json.dumps([event for item in items for event in item.events_of(item.entry)]).encode()
            record: dict[str, Any] = {"url": url, "at": time.time(), "attempt": attempt + 1, "batch": len(items)}
            try:
                async with self.session.post(url, data=body, headers=items[0].sign(body)) as resp:
                    await resp.read()
                    record["status"] = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"
            for item in items:
                item.entry.callbacks.append(record)
            if 200 <= record.get("status", 0) < 300:
                return
            await asyncio.sleep(0.2 * 2**attempt)
        log.warning("a batch of %d callbacks to %s failed %d times", len(items), url, attempts)

    def schedule_callback(self, entry: LedgerEntry, url: str | None, build: CallbackBuilder) -> None:
        """POST the provider's delivery receipt to `url` once the message is delivered (nothing when url is None)."""
        if not url or self.state.rng.random() < self.state.faults[entry.provider].lost_receipts:
            return  # a receipt that never comes: only the status API tells (reconciliation's case)
        entry.callback_url = url
        task = asyncio.create_task(self._deliver(entry, url, build))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _deliver(self, entry: LedgerEntry, url: str, build: CallbackBuilder, attempts: int = 3) -> None:
        # A little past deliver_at: the loop may wake a hair early, and the receipt must show the final status.
        await asyncio.sleep(max(0.0, entry.deliver_at - time.time()) + 0.005)
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        for attempt in range(attempts):
            body, headers = build(entry, url)  # signed when sent, as the providers do
            record: dict[str, Any] = {"url": url, "at": time.time(), "attempt": attempt + 1}
            try:
                async with self.session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    record["status"] = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"
            entry.callbacks.append(record)
            if 200 <= record.get("status", 0) < 300:
                return
            await asyncio.sleep(0.2 * 2**attempt)
        log.warning("%s callback for %s to %s failed %d times", entry.provider, entry.provider_message_id, url,
                    attempts)

    async def close(self) -> None:
        self.state.stopping.set()
        if self._batcher is not None:
            self._batcher.cancel()
            self.tasks.add(self._batcher)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()


SIM = web.AppKey("simulator", Simulator)


def sim_of(request: web.Request) -> Simulator:
    return request.app[SIM]


def basic_auth(request: web.Request) -> tuple[str, str] | None:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user, password


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(payload), content_type="application/json", headers=headers)
