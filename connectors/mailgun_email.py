"""Email through Mailgun's HTTP API (no official async SDK), with aiohttp.

Send: POST {base}/v3/{domain}/messages, basic auth api:<key>, form fields from, to, subject, text and
v:notification_id (a user variable, echoed in every event); the answer is {"id": "<...>", "message": "Queued.
Thank you."}. The id is kept without its angle brackets, as events and webhooks show it. Status: GET
{base}/v3/{domain}/events?message-id=<id>; lookup by reference (`find`): the same events filtered by recipient and
begin, matched on the v:notification_id user variable. Webhooks: JSON {"signature": {timestamp, token, signature},
"event-data": {...}}, signature = hex HMAC-SHA256(webhook signing key, timestamp + token).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from connectors.base import (
    Connector,
    DeliveryStatus,
    Found,
    Message,
    Outcome,
    ProviderQueryError,
    Receipt,
    ReceiptStatus,
    accepted,
    basic_auth,
    check_query,
    classify_status,
    header,
    json_object,
    limits,
    small,
    utc_second,
)
from pipeline.config import Settings

NAME = "mailgun"
RECEIPTS: dict[str, ReceiptStatus] = {
    "accepted": "accepted", "delivered": "delivered", "opened": "opened", "clicked": "clicked",
    "complained": "complained", "unsubscribed": "unsubscribed",
}
EVENTS_LIMIT = 300  # the Events API's largest page


def classify(status: int, body: str | Mapping[str, Any] | None, headers: Mapping[str, str] | None = None) -> Outcome:
    """A Mailgun answer to /messages as an Outcome (pure)."""
    payload = json_object(body)
    message = str(payload.get("message") or "") or None
    if 200 <= status < 300:
        message_id = str(payload.get("id") or "").strip().strip("<>")
        if message_id:
            return accepted(NAME, message_id, small(payload))
        return Outcome("ambiguous", NAME, "server_error", error_code=str(status),
                       error_message="2xx answer without a message id", raw=small(payload))
    if status == 400 and message and ("'to'" in message or message.startswith("to ") or "address" in message):
        return Outcome("permanent", NAME, "invalid_recipient", error_code="400", error_message=message,
                       raw=small(payload))
    return classify_status(NAME, status, retry_after=header(headers or {}, "Retry-After"), error_message=message,
                           raw=small(payload))


def event_status(event: Mapping[str, Any]) -> ReceiptStatus:
    kind = str(event.get("event", ""))
    if kind == "failed":
        return "failed" if event.get("severity") == "permanent" else "deferred"
    return RECEIPTS.get(kind, "other")


def message_id_of(event: Mapping[str, Any]) -> str:
    """An event's message id without angle brackets ("" when it has none)."""
    return str(((event.get("message") or {}).get("headers") or {}).get("message-id") or "").strip("<>")


def delivery_status(events: list[dict[str, Any]]) -> DeliveryStatus:
    """One message's events (in any order) as its status: delivered or failed when an event says so."""
    if not events:
        return DeliveryStatus("unknown")
    events = sorted(events, key=_stamp)  # Mailgun lists newest first unless asked otherwise
    statuses = [(event_status(e), e) for e in events]
    for wanted in ("delivered", "failed"):
        for found, event in statuses:
            if found == wanted:
                delivery = event.get("delivery-status") or {}
                code = delivery.get("code")
                return DeliveryStatus(wanted, str(event.get("event")), str(code) if code else None,
                                      delivery.get("message") or None)
    return DeliveryStatus("pending", str(events[-1].get("event")))


class MailgunEmail(Connector):
    name = NAME
    channel = "email"
    supports_test_mode = True

    def __init__(self, *, base_url: str, api_key: str, domain: str, from_email: str, webhook_signing_key: str,
                 timeout_s: float, connect_timeout_s: float, max_concurrency: int) -> None:
        super().__init__(timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, max_concurrency=max_concurrency)
        self.base_url = f"{base_url.rstrip('/')}/v3/{domain}"
        self.auth = {"Authorization": basic_auth("api", api_key)}
        self.from_email = from_email
        self.signing_key = webhook_signing_key.encode()

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> MailgunEmail:
        kwargs: dict[str, Any] = {
            "base_url": settings.provider_base_url(NAME), "api_key": settings.mailgun_api_key,
            "domain": settings.mailgun_domain, "from_email": settings.email_from,
            "webhook_signing_key": settings.mailgun_webhook_signing_key, **limits(settings),
        }
        return cls(**{**kwargs, **overrides})

    async def _send(self, msg: Message) -> Outcome:
        form = {"from": self.from_email, "to": msg.to, "subject": msg.subject or "", "text": msg.body,
                "v:notification_id": msg.notification_id}
        if msg.html:
            form["html"] = msg.html
        if msg.test_mode:  # Mailgun test mode: accepted and answered as usual, never delivered
            form["o:testmode"] = "yes"
        async with self.session().post(f"{self.base_url}/messages", data=form, headers=self.auth) as resp:
            return classify(resp.status, await resp.text(), resp.headers)

    async def _events(self, what: str, params: Mapping[str, str]) -> tuple[int, list[dict[str, Any]]]:
        """One page of the Events API (GET /v3/{domain}/events) for `params`: the HTTP status and the events."""
        async with self.session().get(f"{self.base_url}/events", params=params, headers=self.auth) as resp:
            status, text = resp.status, await resp.text()
        check_query(what, status, text)
        items = json_object(text).get("items") if status == 200 else None
        return status, [e for e in items or [] if isinstance(e, dict)]

    async def _status(self, provider_message_id: str) -> DeliveryStatus:
        _, events = await self._events(f"mailgun status of {provider_message_id}",
                                       {"message-id": provider_message_id})
        return delivery_status(events)

    async def _find(self, msg: Message, since: datetime, until: datetime | None) -> list[Found]:
        """The recipient's events since `since` (one page), matched on our v:notification_id user variable."""
        what = f"mailgun lookup of {msg.notification_id}"
        params = {"recipient": msg.to, "begin": str(int(utc_second(since).timestamp())), "ascending": "yes",
                  "limit": str(EVENTS_LIMIT)}
        status, events = await self._events(what, params)
        if status != 200:  # a refused query (400, unknown domain 404) says nothing about the message
            raise ProviderQueryError(f"{what}: HTTP {status}")
        ours = _by_message([e for e in events if _reference(e) == msg.notification_id])
        if not ours:
            if len(events) >= EVENTS_LIMIT:  # a full page: ours may be on the next one
                raise ProviderQueryError(f"{what}: {EVENTS_LIMIT}+ events since {since.isoformat()}, none ours")
            return []
        newest_first = sorted(ours, key=lambda mid: _stamp(ours[mid][0]), reverse=True)  # by each send's first event
        return [Found(mid, delivery_status(ours[mid])) for mid in newest_first]

    def verify_receipt(self, url: str, body: bytes, headers: Mapping[str, str]) -> bool:
        try:
            signature = json.loads(body).get("signature") or {}
            signed = f"{signature['timestamp']}{signature['token']}".encode()
            given = str(signature["signature"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return False
        expected = hmac.new(self.signing_key, signed, hashlib.sha256).hexdigest()
        return hmac.compare_digest(given, expected)

    def parse_receipt(self, url: str, body: bytes, headers: Mapping[str, str]) -> list[Receipt]:
        event = json_object(body.decode(errors="replace")).get("event-data")
        if not isinstance(event, dict):
            return []
        message_id = message_id_of(event)
        if not message_id:
            return []
        status = event_status(event)
        delivery = event.get("delivery-status") or {}
        failed = status in ("failed", "deferred")
        stamp = event.get("timestamp")
        return [Receipt(
            NAME, message_id, status, str(event.get("event")),
            notification_id=(event.get("user-variables") or {}).get("notification_id"),
            error_code=str(delivery.get("code")) if failed and delivery.get("code") else None,
            error_message=(delivery.get("message") or event.get("reason")) if failed else None,
            occurred_at=datetime.fromtimestamp(stamp, UTC) if isinstance(stamp, int | float) else None,
        )]


def _reference(event: Mapping[str, Any]) -> Any:
    return (event.get("user-variables") or {}).get("notification_id")


def _stamp(event: Mapping[str, Any]) -> float:
    stamp = event.get("timestamp")
    return float(stamp) if isinstance(stamp, int | float) else 0.0


def _by_message(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Events grouped by message id, each group oldest first; events without a message id are left out."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for event in sorted(events, key=_stamp):
        if message_id := message_id_of(event):
            groups.setdefault(message_id, []).append(event)
    return groups
