"""The one connector interface: what to send (`Message`), what happened (`Outcome`), receipts and status queries.

Every provider call ends in exactly one of four outcome kinds (ARCHITECTURE.md, "Delivery semantics"):

- accepted: the provider took the message (2xx) and gave its id;
- permanent: it refused the message for a reason a retry cannot fix (bad number, unsubscribed, bad request,
  bad credentials); never retried on the same provider;
- transient: nothing was sent and a retry or the fallback provider may succeed (5xx, 429 with Retry-After,
  connection refused, connect timeout);
- ambiguous: the request left, but no answer came back (read timeout, connection lost mid-answer). The provider may
  have accepted it: the caller must not resend blindly but reconcile first (status query, receipts).

The classification functions are pure (HTTP status, provider error body, exception) so they are unit-tested without
a network; connectors only add the transport.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

import aiohttp
import httpx

from pipeline.config import Settings
from pipeline.errors import NotifyError

OutcomeKind = Literal["accepted", "permanent", "transient", "ambiguous"]
# A short, provider-independent reason, for metrics and for the circuit breaker (auth and server_error are the
# provider's fault, invalid_recipient and unsubscribed the recipient's).
Reason = Literal[
    "ok", "invalid_recipient", "unsubscribed", "bad_request", "auth", "rate_limited", "server_error",
    "connection", "timeout", "connection_lost",
]
DeliveryState = Literal["delivered", "failed", "pending", "unknown"]
# The ReceiptStatus enum of schemas/ProviderReceipt.avsc.
ReceiptStatus = Literal[
    "accepted", "sent", "deferred", "delivered", "failed", "opened", "clicked", "complained", "unsubscribed", "other",
]
Channel = Literal["sms", "email", "push"]


class ProviderQueryError(NotifyError):
    """A status query could not get an answer (transport error, 5xx, bad credentials): nothing is known."""


@dataclass(frozen=True)
class Message:
    """One message to one recipient on one channel; `body` (and `subject` for email) are already rendered."""

    notification_id: str
    channel: Channel
    to: str  # E.164 phone number for SMS, email address for email
    body: str
    subject: str | None = None
    html: str | None = None  # email only: the HTML part beside the text one (the template's email_html.html)
    template_id: str | None = None  # for the record and the provider's metadata; the body is what is sent
    params: Mapping[str, str] = field(default_factory=dict)
    collapse_key: str | None = None  # push only
    # Shadow mode: send through the provider's test mode (Twilio test credentials, SendGrid sandbox, Mailgun
    # o:testmode, FCM validate_only), which checks and answers like a real send but never reaches the user.
    test_mode: bool = False


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    provider: str
    reason: Reason
    provider_message_id: str | None = None  # set when accepted
    error_code: str | None = None  # the provider's own code (Twilio 21211, HTTP status otherwise)
    error_message: str | None = None
    retry_after_s: float | None = None  # from a 429's Retry-After
    latency_s: float = 0.0
    raw: Mapping[str, Any] | None = None  # the provider's answer, small (error bodies, accepted JSON)

    @property
    def retryable(self) -> bool:
        """Only transient outcomes may be retried without asking the provider first."""
        return self.kind == "transient"


@dataclass(frozen=True)
class DeliveryStatus:
    """What the provider's status API says about one message. `unknown`: the provider has no such message."""

    state: DeliveryState
    raw_status: str | None = None
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class Found:
    """A message the provider holds for our reference: its id and what its status API says."""

    provider_message_id: str
    status: DeliveryStatus


@dataclass(frozen=True)
class Receipt:
    """One delivery receipt from a webhook; maps onto the ProviderReceipt record."""

    provider: str
    provider_message_id: str
    status: ReceiptStatus
    raw_status: str
    notification_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    occurred_at: datetime | None = None


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def classify_status(provider: str, status: int, *, retry_after: str | None = None, error_code: str | None = None,
                    error_message: str | None = None, raw: Mapping[str, Any] | None = None) -> Outcome:
    """The provider-independent part: what an HTTP status alone says (used for non-2xx answers)."""
    code = error_code or str(status)

    def out(kind: OutcomeKind, reason: Reason, retry_after_s: float | None = None) -> Outcome:
        return Outcome(kind, provider, reason, error_code=code, error_message=error_message,
                       retry_after_s=retry_after_s, raw=raw)

    if status == 429:
        return out("transient", "rate_limited", parse_retry_after(retry_after))
    if status >= 500 or status == 408:
        # 408: the server gave up waiting for our request, so it did not take it.
        return out("transient", "server_error", parse_retry_after(retry_after))
    if status in (401, 403):
        return out("permanent", "auth")
    return out("permanent", "bad_request")


def classify_exception(provider: str, exc: BaseException) -> Outcome:
    """A transport failure: did the request leave? Connect failures are transient, the rest ambiguous."""
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError | aiohttp.ClientConnectorError | aiohttp.InvalidURL):
        # Refused, unreachable, DNS, TLS handshake, no connection within the connect timeout, or a base URL that is
        # not one: nothing was sent.
        return Outcome("transient", provider, "connection", error_code="connect", error_message=message)
    if isinstance(exc, TimeoutError):
        # Read timeout: the request (or part of it) left; the provider may have accepted the message.
        return Outcome("ambiguous", provider, "timeout", error_code="timeout", error_message=message)
    # Disconnected, reset or a broken answer after the request was written.
    return Outcome("ambiguous", provider, "connection_lost", error_code="connection_lost", error_message=message)


def classify_httpx_exception(provider: str, exc: httpx.HTTPError | httpx.InvalidURL) -> Outcome:
    """The same question for httpx (the push connectors' HTTP/2 client): did the request leave?

    Connect errors and timeouts, a full pool and a URL that cannot be requested mean nothing was sent: transient.
    Read and write timeouts are ambiguous ("timeout"); anything else after the connection stood (reset, GOAWAY,
    a broken answer) is ambiguous ("connection_lost").
    """
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout | httpx.UnsupportedProtocol
                  | httpx.InvalidURL):
        return Outcome("transient", provider, "connection", error_code="connect", error_message=message)
    if isinstance(exc, httpx.TimeoutException):
        return Outcome("ambiguous", provider, "timeout", error_code="timeout", error_message=message)
    return Outcome("ambiguous", provider, "connection_lost", error_code="connection_lost", error_message=message)


def accepted(provider: str, provider_message_id: str, raw: Mapping[str, Any] | None = None) -> Outcome:
    return Outcome("accepted", provider, "ok", provider_message_id=provider_message_id, raw=raw)


def json_object(body: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """A provider's JSON answer as a dict; a non-JSON body becomes {"message": <its start>}, nothing becomes {}."""
    if isinstance(body, Mapping):
        return dict(body)
    try:
        data = json.loads(body or "")
    except ValueError:
        return {"message": (body or "")[:500]} if body else {}
    return data if isinstance(data, dict) else {}


def collapse_id(msg: Message) -> str:
    """A push notification's collapse id: `collapse_key or notification_id`, so a resend after an ambiguous outcome
    replaces the first notification on the device. Kept within APNs' 64 bytes (apns-collapse-id; FCM passes it on
    to APNs for iOS): longer keys become a UUIDv5 of themselves (32 hex characters)."""
    key = msg.collapse_key or msg.notification_id
    return key if len(key.encode()) <= 64 else uuid.uuid5(uuid.NAMESPACE_URL, key).hex


def limits(settings: Settings) -> dict[str, Any]:
    """The timeout and concurrency arguments every connector takes, from the one config module."""
    return {"timeout_s": settings.provider_timeout_s, "connect_timeout_s": settings.provider_connect_timeout_s,
            "max_concurrency": settings.provider_max_concurrency}


def small(payload: Any, limit: int = 2000) -> Mapping[str, Any] | None:
    """A provider payload kept in an Outcome: dicts only, oversized ones cut down to a note."""
    if not isinstance(payload, dict):
        return None if payload in (None, "") else {"text": str(payload)[:limit]}
    text = repr(payload)
    return payload if len(text) <= limit else {"truncated": text[:limit]}


TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)


class Connector(ABC):
    """A provider connector. Subclasses implement `_send`, `_status`, `parse_receipt` and `verify_receipt`, and
    `_find` where the provider can list what it holds.

    `send` never raises for provider or transport failures: it returns an Outcome. At most `max_concurrency`
    calls (sends and status queries) are in flight at once; time waiting for a slot is not in `latency_s`.
    """

    name: ClassVar[str]
    channel: ClassVar[Channel]
    supports_test_mode: ClassVar[bool] = False  # whether `Message.test_mode` sends can be made (shadow mode)

    def __init__(self, *, timeout_s: float, connect_timeout_s: float, max_concurrency: int) -> None:
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(connect_timeout_s, timeout_s)
        self.max_concurrency = max_concurrency
        self._slots = asyncio.Semaphore(max_concurrency)
        self._session: aiohttp.ClientSession | None = None

    @property
    def client_timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.connect_timeout_s)

    def session(self) -> aiohttp.ClientSession:
        """The connector's HTTP session (created on first use, inside the running loop)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self.client_timeout,
                connector=aiohttp.TCPConnector(limit=self.max_concurrency, limit_per_host=self.max_concurrency),
            )
        return self._session

    async def send(self, msg: Message) -> Outcome:
        if msg.channel != self.channel:
            raise ValueError(f"{self.name} sends {self.channel}, not {msg.channel}")
        if msg.test_mode and not self.supports_test_mode:
            raise ValueError(f"{self.name} has no test mode: it cannot shadow traffic")
        async with self._slots:
            started = time.perf_counter()
            try:
                outcome = await self._send(msg)
            except TRANSPORT_ERRORS as exc:
                outcome = classify_exception(self.name, exc)
            return replace(outcome, latency_s=time.perf_counter() - started)

    async def status(self, provider_message_id: str) -> DeliveryStatus:
        """The provider's view of one message; raises ProviderQueryError when it cannot be asked."""
        async with self._slots:
            try:
                return await self._status(provider_message_id)
            except TRANSPORT_ERRORS as exc:
                raise ProviderQueryError(f"{self.name} status of {provider_message_id}: {exc!r}") from exc

    async def find(self, msg: Message, since: datetime, until: datetime | None = None) -> list[Found]:
        """The provider's records that match `msg` (same notification id, or same recipient and body where the
        provider keeps no reference of ours) sent at or after `since`, newest first; [] when the provider has no
        such message (it never arrived); ProviderQueryError when it cannot tell. Content matches can be another
        notification's identical message: the caller bounds the window (`until`: when our send could last have
        left) and skips candidates already recorded for another delivery.

        For reconciling a send that got no answer (accept-then-hang, a worker that died mid-send): there is no
        provider message id to ask `status` about. Providers stamp their records to the second, so `since` counts
        from the start of its second (a match a little early beats a resend).
        """
        async with self._slots:
            try:
                return await self._find(msg, since, until)
            except TRANSPORT_ERRORS as exc:
                raise ProviderQueryError(f"{self.name} lookup of {msg.notification_id}: {exc!r}") from exc

    async def _find(self, msg: Message, since: datetime, until: datetime | None) -> list[Found]:
        raise ProviderQueryError(f"{self.name} has no lookup by reference")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> Connector:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abstractmethod
    async def _send(self, msg: Message) -> Outcome: ...

    @abstractmethod
    async def _status(self, provider_message_id: str) -> DeliveryStatus: ...

    @abstractmethod
    def verify_receipt(self, url: str, body: bytes, headers: Mapping[str, str]) -> bool:
        """Whether a webhook request really comes from the provider (its signature scheme)."""

    @abstractmethod
    def parse_receipt(self, url: str, body: bytes, headers: Mapping[str, str]) -> list[Receipt]:
        """The receipts in one webhook request (check `verify_receipt` first); unknown shapes give []."""


def check_query(what: str, status: int, payload: Any) -> None:
    """A status-query answer that says nothing about the message (auth, throttling, 5xx): ProviderQueryError."""
    if status in (401, 403, 429) or status >= 500:
        raise ProviderQueryError(f"{what}: HTTP {status} {str(payload)[:200]}")


def utc_second(when: datetime) -> datetime:
    """`when` in UTC, cut to its second (naive means UTC): providers' record times have no finer grain."""
    aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    return aware.astimezone(UTC).replace(microsecond=0)


def basic_auth(login: str, password: str) -> str:
    """An Authorization header value for HTTP basic auth (aiohttp 3.14 deprecates its BasicAuth)."""
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by case-insensitive name (webhook frameworks differ in how they hand headers over)."""
    wanted = name.lower()
    return next((value for key, value in headers.items() if key.lower() == wanted), None)
