"""Push straight to Apple's APNs provider API over HTTP/2 with token-based auth, with httpx.

Apple ships no server SDK, so this follows the documented API ("Sending notification requests to APNs"):

    POST {base}/3/device/{device token}          HTTP/2 only (APNs refuses HTTP/1.1)
    authorization: bearer <JWT>  apns-topic: <bundle id>  apns-push-type: alert  apns-priority: 10
    apns-expiration: <epoch s>  apns-collapse-id: <collapse key or notification id>  apns-id: <UUID>
    {"aps": {"alert": {"title", "body"}}, "notification_id": ...}

200 carries the `apns-id` header: we send our notification id there (APNs requires a canonical UUID, which our
notification ids are; any other id is mapped to a UUIDv5 of it, so a resend still carries the same apns-id) and
APNs echoes it, so the provider message id is our own reference. Errors are {"reason": "..."} (410 Unregistered
also has "timestamp", when the token stopped being valid).

The provider token is a JWT signed with the team's .p8 key (ES256, PyJWT): header {alg: ES256, kid: key id}, claims
{iss: team id, iat}. APNs rejects one older than an hour (403 ExpiredProviderToken) and one renewed more often
than every 20 minutes (429 TooManyProviderTokenUpdates), so it is cached and renewed every 50 minutes. On
ExpiredProviderToken (our clock or the cache was off) it is renewed at once and the request made again, once:
a 403 means APNs took nothing, so that retry cannot duplicate.

Transport: httpx with `http1=False, http2=True`. Over TLS that is HTTP/2 through ALPN, as APNs wants; over plain
http (the simulator, NOTIFY_SIMULATOR_APNS_PORT) it is HTTP/2 with prior knowledge (h2c). One connection carries
many concurrent streams; the connector's semaphore still bounds requests in flight (NOTIFY_PROVIDER_MAX_CONCURRENCY).
httpx's connect timeout (nothing sent: transient) and read timeout (ambiguous) come from the same settings as every
connector's, and the whole request is bounded by NOTIFY_PROVIDER_TIMEOUT_S.

Status and receipts: APNs has neither. `_status` raises ProviderQueryError (as fcm_push.py explains, the send answer is
final, and the collapse id keeps a resend after an ambiguous outcome from showing twice). `find` keeps the base
default (ProviderQueryError): APNs lists nothing it accepted.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from connectors.base import (
    Connector,
    DeliveryStatus,
    Message,
    Outcome,
    OutcomeKind,
    ProviderQueryError,
    Reason,
    Receipt,
    accepted,
    classify_httpx_exception,
    classify_status,
    collapse_id,
    header,
    json_object,
    limits,
    parse_retry_after,
    small,
)
from pipeline.config import Settings

NAME = "apns"
TOKEN_MAX_AGE_S = 50 * 60  # renewed after 50 min: APNs refuses tokens older than 60 min, renewals under 20 min
# APNs' `reason` values (Apple's "Handling notification responses from APNs") as (kind, reason).
REASONS: dict[str, tuple[OutcomeKind, Reason]] = {
    "BadDeviceToken": ("permanent", "invalid_recipient"),
    "DeviceTokenNotForTopic": ("permanent", "invalid_recipient"),
    "Unregistered": ("permanent", "invalid_recipient"),  # 410: the app is gone from the device
    "ExpiredToken": ("permanent", "invalid_recipient"),  # 410
    "MissingDeviceToken": ("permanent", "invalid_recipient"),
    "InvalidProviderToken": ("permanent", "auth"),
    "ExpiredProviderToken": ("permanent", "auth"),
    "MissingProviderToken": ("permanent", "auth"),
    "BadCertificate": ("permanent", "auth"),
    "BadCertificateEnvironment": ("permanent", "auth"),
    "BadEnvironmentKeyInToken": ("permanent", "auth"),
    "Forbidden": ("permanent", "auth"),
    "TopicDisallowed": ("permanent", "auth"),  # the key's team may not push to this bundle id
    "TooManyRequests": ("transient", "rate_limited"),  # 429: too many pushes to one device
    "TooManyProviderTokenUpdates": ("transient", "rate_limited"),
    "InternalServerError": ("transient", "server_error"),
    "ServiceUnavailable": ("transient", "server_error"),
    "Shutdown": ("transient", "server_error"),
    "IdleTimeout": ("transient", "server_error"),
}


def apns_id(notification_id: str) -> str:
    """Our notification id as the canonical UUID APNs wants in apns-id (a UUIDv5 of it when it is not one)."""
    try:
        return str(uuid.UUID(notification_id))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"notify:{notification_id}"))


def classify(status: int, body: str | Mapping[str, Any] | None, headers: Mapping[str, str] | None = None) -> Outcome:
    """An APNs answer to POST /3/device/{token} as an Outcome (pure)."""
    headers = headers or {}
    payload = json_object(body)
    if status == 200:
        message_id = header(headers, "apns-id")
        if message_id:
            return accepted(NAME, message_id)
        return Outcome("ambiguous", NAME, "server_error", error_code="200", error_message="200 without apns-id")
    reason = str(payload.get("reason") or "") or None
    retry_after = header(headers, "Retry-After")
    if reason in REASONS:
        kind, why = REASONS[reason]
        return Outcome(kind, NAME, why, error_code=reason, error_message=f"HTTP {status} {reason}", raw=small(payload),
                       retry_after_s=parse_retry_after(retry_after) if kind == "transient" else None)
    # Other 400s (BadCollapseId, BadExpirationDate, BadPriority, BadTopic, PayloadEmpty, ...), 413 PayloadTooLarge,
    # 404 BadPath, 405 MethodNotAllowed: our request is wrong; 5xx and 429 without a known reason: transient.
    return classify_status(NAME, status, retry_after=retry_after, error_code=reason,
                           error_message=f"HTTP {status} {reason or ''}".strip(), raw=small(payload))


def load_key(pem: str | bytes) -> ec.EllipticCurvePrivateKey:
    """An APNs auth key (.p8: PKCS#8 PEM of a P-256 key)."""
    key = serialization.load_pem_private_key(pem.encode() if isinstance(pem, str) else pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("an APNs auth key is a P-256 (ES256) key")
    return key


class ApnsPush(Connector):
    name = NAME
    channel = "push"

    def __init__(self, *, base_url: str, key_id: str, team_id: str, private_key: str | bytes, topic: str,
                 timeout_s: float, connect_timeout_s: float, max_concurrency: int, ttl_s: int = 86400) -> None:
        super().__init__(timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, max_concurrency=max_concurrency)
        self.base_url = base_url.rstrip("/")
        self.key_id = key_id
        self.team_id = team_id
        self.key = load_key(private_key)
        self.topic = topic
        self.ttl_s = ttl_s
        self._jwt: tuple[str, float] | None = None  # (token, issued at)
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ApnsPush:
        kwargs: dict[str, Any] = {
            "base_url": settings.provider_base_url(NAME), "key_id": settings.apns_key_id,
            "team_id": settings.apns_team_id, "private_key": settings.apns_private_key.read_bytes(),
            "topic": settings.apns_topic, **limits(settings),
        }
        return cls(**{**kwargs, **overrides})

    def client(self) -> httpx.AsyncClient:
        """The HTTP/2 client (created on first use, inside the running loop)."""
        if self._client is None or self._client.is_closed:
            self._client = httpx.AsyncClient(
                http1=False, http2=True,
                timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
                limits=httpx.Limits(max_connections=self.max_concurrency,
                                    max_keepalive_connections=self.max_concurrency),
            )
        return self._client

    def provider_token(self, *, renew: bool = False) -> str:
        """The cached provider JWT, renewed when older than TOKEN_MAX_AGE_S (or when `renew`)."""
        now = time.time()
        if renew or self._jwt is None or now - self._jwt[1] >= TOKEN_MAX_AGE_S:
            token = jwt.encode({"iss": self.team_id, "iat": int(now)}, self.key, algorithm="ES256",
                               headers={"kid": self.key_id})
            self._jwt = (token, now)
        return self._jwt[0]

    def request_parts(self, msg: Message) -> tuple[str, dict[str, str], bytes]:
        """URL, headers (without authorization) and body of one notification."""
        alert = {"title": msg.subject, "body": msg.body} if msg.subject else {"body": msg.body}
        body = {"aps": {"alert": alert, "sound": "default"}, "notification_id": msg.notification_id}
        headers = {
            "apns-topic": self.topic, "apns-push-type": "alert", "apns-priority": "10",
            "apns-expiration": str(int(time.time()) + self.ttl_s), "apns-collapse-id": collapse_id(msg),
            "apns-id": apns_id(msg.notification_id), "content-type": "application/json",
        }
        url = f"{self.base_url}/3/device/{quote(msg.to, safe='')}"
        return url, headers, json.dumps(body, separators=(",", ":")).encode()

    async def _post(self, url: str, headers: dict[str, str], body: bytes, *, renew: bool) -> Outcome:
        headers = {**headers, "authorization": f"bearer {self.provider_token(renew=renew)}"}
        async with asyncio.timeout(self.timeout_s):
            resp = await self.client().post(url, headers=headers, content=body)
        return classify(resp.status_code, resp.text, resp.headers)

    async def _send(self, msg: Message) -> Outcome:
        if not msg.to:
            return Outcome("permanent", NAME, "invalid_recipient", error_code="MissingDeviceToken",
                           error_message="no device token")
        url, headers, body = self.request_parts(msg)
        try:
            outcome = await self._post(url, headers, body, renew=False)
            if outcome.error_code == "ExpiredProviderToken":
                outcome = await self._post(url, headers, body, renew=True)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return classify_httpx_exception(NAME, exc)
        return outcome

    async def _status(self, provider_message_id: str) -> DeliveryStatus:
        raise ProviderQueryError(f"APNs has no status API (asked about {provider_message_id})")

    async def close(self) -> None:
        await super().close()
        if self._client is not None:
            await self._client.aclose()

    def verify_receipt(self, url: str, body: bytes, headers: Mapping[str, str]) -> bool:
        return False  # APNs sends no delivery webhooks

    def parse_receipt(self, url: str, body: bytes, headers: Mapping[str, str]) -> list[Receipt]:
        return []
