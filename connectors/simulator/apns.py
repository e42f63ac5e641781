"""Apple Push Notification service (the provider API) on a port of its own, HTTP/2 only, as APNs is.

aiohttp's server speaks HTTP/1.1 only, so this is a small HTTP/2 server on the `h2` protocol library and asyncio:
cleartext HTTP/2 with prior knowledge (h2c), which is what httpx sends with `http1=False, http2=True` to an
http:// URL. Each stream is handled in its own task, so one connection carries many requests at once and a hung
request holds up nobody else; a stream the client resets has its task cancelled. It shares the aiohttp app's
SimulatorState: one ledger, faults under "apns" (POST /_admin/providers/apns), answers counted in /_admin/stats.

POST /3/device/{token} with:
    authorization: bearer <JWT>   ES256, header kid = NOTIFY_APNS_KEY_ID, claims iss = NOTIFY_APNS_TEAM_ID and iat,
                                  checked with the public part of NOTIFY_APNS_PRIVATE_KEY: missing -> 403
                                  MissingProviderToken, bad -> 403 InvalidProviderToken, iat older than an hour ->
                                  403 ExpiredProviderToken
    apns-topic                    NOTIFY_APNS_TOPIC; missing -> 400 MissingTopic, another -> 400 DeviceTokenNotForTopic
    apns-push-type, apns-priority, apns-expiration, apns-collapse-id (<= 64 bytes), apns-id (a UUID)
    body                          JSON, at most 4096 bytes, with "aps"; our "notification_id" key is read if present

answers 200 with `apns-id` (the one sent, else a new UUID) and no body, or {"reason": "..."}. Device tokens are
64 hex characters (else 400 BadDeviceToken); one starting with "0000" is 410 Unregistered with a "timestamp".
Faults: outage -> 503 ServiceUnavailable, 5xx -> 500 InternalServerError, 429 -> 429 TooManyRequests (with a
Retry-After, which real APNs does not send), permanent -> 400 BadDeviceToken, hang -> accepted, recorded, never
answered; a fault programmed for the device token (device_faults) is answered the same way once the request passed
auth and the header checks. There are no delivery receipts: APNs has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from typing import cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from connectors.apns_push import load_key
from connectors.simulator.common import Simulator
from connectors.simulator.state import Fault

log = logging.getLogger("notify.simulator")

P = "apns"
MAX_PAYLOAD = 4096
TOKEN = re.compile(r"^[0-9a-fA-F]{64}$")
PUSH_TYPES = {"alert", "background", "location", "voip", "complication", "fileprovider", "mdm", "liveactivity",
              "pushtotalk", "widgets", "controls"}
Answer = tuple[int, dict[str, str], bytes]


def reason(status: int, why: str, headers: dict[str, str] | None = None, **extra: object) -> Answer:
    body = json.dumps({"reason": why, **extra}).encode()
    return status, {"content-type": "application/json", **(headers or {})}, body


class ApnsHandler:
    """The APNs request logic, apart from the HTTP/2 plumbing."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        settings = sim.settings
        self.key_id, self.team_id, self.topic = settings.apns_key_id, settings.apns_team_id, settings.apns_topic
        self.public_key: ec.EllipticCurvePublicKey = load_key(settings.apns_private_key.read_bytes()).public_key()

    def _auth_error(self, authorization: str | None) -> Answer | None:
        if not authorization or not authorization.lower().startswith("bearer "):
            return reason(403, "MissingProviderToken")
        token = authorization[7:].strip()
        try:
            head = jwt.get_unverified_header(token)
            claims = jwt.decode(token, self.public_key, algorithms=["ES256"],
                                options={"require": ["iss", "iat"], "verify_iat": False})
        except jwt.InvalidTokenError:
            return reason(403, "InvalidProviderToken")
        if head.get("kid") != self.key_id or claims.get("iss") != self.team_id:
            return reason(403, "InvalidProviderToken")
        iat = claims.get("iat")
        if not isinstance(iat, int | float) or iat > time.time() + 300:
            return reason(403, "InvalidProviderToken")
        if iat < time.time() - 3600:
            return reason(403, "ExpiredProviderToken")
        return None

    def _header_error(self, headers: Mapping[str, str]) -> Answer | None:
        topic = headers.get("apns-topic")
        if not topic:
            return reason(400, "MissingTopic")
        if headers.get("apns-push-type", "alert") not in PUSH_TYPES:
            return reason(400, "InvalidPushType")
        if headers.get("apns-priority", "10") not in ("1", "5", "10"):
            return reason(400, "BadPriority")
        if not headers.get("apns-expiration", "0").isdigit():
            return reason(400, "BadExpirationDate")
        if len(headers.get("apns-collapse-id", "").encode()) > 64:
            return reason(400, "BadCollapseId")
        if "apns-id" in headers:
            try:
                uuid.UUID(headers["apns-id"])
            except ValueError:
                return reason(400, "BadMessageId")
        return None

    def _busy(self, fault: Fault | None) -> Answer | None:
        """APNs' answers to an outage, a 5xx or a 429 fault; None for the other faults."""
        if fault == "outage":
            return reason(503, "ServiceUnavailable")
        if fault == "5xx":
            return reason(500, "InternalServerError")
        if fault == "429":
            return reason(429, "TooManyRequests", {"retry-after": f"{self.sim.state.faults[P].retry_after_s:g}"})
        return None

    async def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
        state = self.sim.state
        fault = await state.draw_fault(P)
        if (busy := self._busy(fault)) is not None:
            return busy
        match = re.fullmatch(r"/3/device/([^/?]*)", path)
        if match is None:
            return reason(404, "BadPath")
        if method != "POST":
            return reason(405, "MethodNotAllowed")
        if denied := self._auth_error(headers.get("authorization")):
            return denied
        if bad := self._header_error(headers):
            return bad
        device = match.group(1)
        if not device:
            return reason(400, "MissingDeviceToken")
        fault = state.device_fault(P, device) or fault  # programmed for this token: replaces the draw
        if (busy := self._busy(fault)) is not None:
            return busy
        if not TOKEN.match(device) or fault == "permanent":
            return reason(400, "BadDeviceToken")
        if headers["apns-topic"] != self.topic:
            return reason(400, "DeviceTokenNotForTopic")
        if device.startswith("0000"):
            return reason(410, "Unregistered", timestamp=int(time.time() * 1000) - 86_400_000)
        if not body:
            return reason(400, "PayloadEmpty")
        if len(body) > MAX_PAYLOAD:
            return reason(413, "PayloadTooLarge")
        try:
            payload = json.loads(body)
        except ValueError:
            return reason(400, "BadPayload")
        if not isinstance(payload, dict) or not isinstance(payload.get("aps"), dict):
            return reason(400, "BadPayload")
        alert = payload["aps"].get("alert")
        alert = alert if isinstance(alert, dict) else {"body": str(alert or "")}
        message_id = str(uuid.UUID(headers["apns-id"])) if "apns-id" in headers else str(uuid.uuid4()).upper()
        nid = payload.get("notification_id")
        entry = state.accept(P, message_id, notification_id=str(nid) if nid else None, to=device.lower(),
                             sender=headers["apns-topic"], body=str(alert.get("body") or ""),
                             subject=alert.get("title"), collapse_id=headers.get("apns-collapse-id"))
        if fault == "hang":
            entry.hung = True
            await state.hang()
        return 200, {"apns-id": message_id}, b""


class _Stream:
    def __init__(self, headers: list[tuple[str, str]]) -> None:
        self.headers = headers
        self.body = bytearray()


class _Connection(asyncio.Protocol):
    """One client connection: h2's state machine, a task per request stream."""

    def __init__(self, server: ApnsServer) -> None:
        self.server = server
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport subclasses
        self.server.connections.add(self)
        self.h2.initiate_connection()
        self.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            self.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived) and event.stream_id is not None:
                self.streams[event.stream_id] = _Stream([(str(k), str(v)) for k, v in event.headers or []])
            elif isinstance(event, h2.events.DataReceived) and event.stream_id is not None:
                if (stream := self.streams.get(event.stream_id)) is not None and len(stream.body) <= 2 * MAX_PAYLOAD:
                    stream.body.extend(event.data or b"")
                self.h2.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id is not None:
                if (stream := self.streams.pop(event.stream_id, None)) is not None:
                    self._start(event.stream_id, stream)
            elif isinstance(event, h2.events.StreamReset) and event.stream_id is not None:
                self.streams.pop(event.stream_id, None)
                if (task := self.tasks.pop(event.stream_id, None)) is not None:
                    task.cancel()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.close()
        self.flush()

    def _start(self, stream_id: int, stream: _Stream) -> None:
        task = asyncio.create_task(self._answer(stream_id, stream))
        self.tasks[stream_id] = task
        task.add_done_callback(lambda _t: self.tasks.pop(stream_id, None))

    async def _answer(self, stream_id: int, stream: _Stream) -> None:
        pseudo = {k: v for k, v in stream.headers if k.startswith(":")}
        headers = {k.lower(): v for k, v in stream.headers if not k.startswith(":")}
        try:
            status, out_headers, body = await self.server.handler.handle(
                pseudo.get(":method", ""), pseudo.get(":path", ""), headers, bytes(stream.body))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("apns simulator: request failed")
            status, out_headers, body = reason(500, "InternalServerError")
        self.server.handler.sim.state.count(P, str(status))
        if self.transport is None or self.transport.is_closing():
            return
        try:
            response = [(":status", str(status)), *out_headers.items(), ("content-length", str(len(body)))]
            self.h2.send_headers(stream_id, response, end_stream=not body)
            if body:
                self.h2.send_data(stream_id, body, end_stream=True)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return  # the client gave up on this stream (timeout, reset)
        self.flush()

    def close(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        self.server.connections.discard(self)


class ApnsServer:
    """The APNs endpoint of one simulator (its Simulator object: state, settings), listening on host:port."""

    def __init__(self, sim: Simulator) -> None:
        self.handler = ApnsHandler(sim)
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self.port: int | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen (port 0: a free one) and return the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self.connections):
            connection.close()
        tasks = [t for c in self.connections for t in c.tasks.values()]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
