"""SMS through Termii's documented HTTP API (no official Python SDK), with aiohttp.

Send: POST {base}/api/sms/send, JSON {to, from, sms, type: "plain", channel, api_key}; the answer carries
message_id. Status: GET {base}/api/sms/inbox?api_key=...&message_id=... (Termii's "History" endpoint: a JSON list,
empty when Termii has no such message). Delivery reports: JSON POSTed to the webhook set in Termii's console,
signed in X-Termii-Signature (hex HMAC-SHA512 of the body with the account's secret key).

Termii has no client-reference field: receipts are matched through message_id (the delivery row stores it). We
also send X-Notify-Reference: <notification id>, which Termii ignores and the simulator records in its ledger.
Lookup by reference (`find`) therefore reads the whole History and matches receiver and text.
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
    DeliveryState,
    DeliveryStatus,
    Found,
    Message,
    Outcome,
    ProviderQueryError,
    Receipt,
    ReceiptStatus,
    accepted,
    check_query,
    classify_status,
    header,
    json_object,
    limits,
    small,
    utc_second,
)
from pipeline.config import Settings

NAME = "termii"
REFERENCE_HEADER = "X-Notify-Reference"


def classify(status: int, body: str | Mapping[str, Any] | None, headers: Mapping[str, str] | None = None) -> Outcome:
    """A Termii answer to /api/sms/send as an Outcome (pure)."""
    payload = json_object(body)
    headers = headers or {}
    message = str(payload.get("message") or "") or None
    if 200 <= status < 300:
        message_id = payload.get("message_id_str") or payload.get("message_id")
        if message_id:
            return accepted(NAME, str(message_id), small(payload))
        # Termii answers some refusals with 200 and no message id; nothing says whether it was queued.
        return Outcome("ambiguous", NAME, "server_error", error_code=str(status), error_message=message,
                       raw=small(payload))
    if status in (400, 422) and message and any(w in message.lower() for w in ("phone", "number", "receiver")):
        return Outcome("permanent", NAME, "invalid_recipient", error_code=str(status), error_message=message,
                       raw=small(payload))
    return classify_status(NAME, status, retry_after=header(headers, "Retry-After"), error_message=message,
                           raw=small(payload))


def delivery_state(raw: str) -> DeliveryState:
    """Termii's message status words (History and delivery reports) as our state."""
    word = raw.split("|")[0].strip().lower()
    if word in ("delivered", "delivrd"):
        return "delivered"
    if word in ("failed", "message failed", "rejected", "expired", "dnd active on phone number", "undelivered"):
        return "failed"
    return "pending"


def receipt_status(raw: str) -> ReceiptStatus:
    state = delivery_state(raw)
    if state == "delivered" or state == "failed":
        return state
    return "sent" if "sent" in raw.lower() else "other"


class TermiiSms(Connector):
    name = NAME
    channel = "sms"

    def __init__(self, *, base_url: str, api_key: str, secret_key: str, sender_id: str, timeout_s: float,
                 connect_timeout_s: float, max_concurrency: int, route: str = "generic") -> None:
        super().__init__(timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, max_concurrency=max_concurrency)
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.secret_key = secret_key
        self.sender_id = sender_id
        self.route = route  # "dnd" delivers to numbers on Do-Not-Disturb (transactional); "generic" does not

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> TermiiSms:
        kwargs: dict[str, Any] = {
            "base_url": settings.provider_base_url(NAME), "api_key": settings.termii_api_key,
            "secret_key": settings.termii_secret_key, "sender_id": settings.termii_sender_id,
            **limits(settings),
        }
        return cls(**{**kwargs, **overrides})

    async def _send(self, msg: Message) -> Outcome:
        payload = {"to": msg.to.lstrip("+"), "from": self.sender_id, "sms": msg.body, "type": "plain",
                   "channel": self.route, "api_key": self.api_key}
        async with self.session().post(f"{self.base_url}/api/sms/send", json=payload,
                                       headers={REFERENCE_HEADER: msg.notification_id}) as resp:
            return classify(resp.status, await resp.text(), resp.headers)

    async def _history(self, what: str, **params: str) -> tuple[int, list[dict[str, Any]]]:
        """Termii's message history (GET /api/sms/inbox), narrowed by `params`: the HTTP status and the items."""
        async with self.session().get(f"{self.base_url}/api/sms/inbox",
                                      params={"api_key": self.api_key, **params}) as resp:
            status, text = resp.status, await resp.text()
        check_query(what, status, text)
        try:
            data: Any = json.loads(text) if status == 200 and text else None
        except ValueError as exc:
            raise ProviderQueryError(f"{what}: unreadable answer {text[:200]!r}") from exc
        items = data.get("data", []) if isinstance(data, dict) else data  # a list; some accounts get {"data": [...]}
        return status, [i for i in items or [] if isinstance(i, dict)]

    async def _status(self, provider_message_id: str) -> DeliveryStatus:
        _, items = await self._history(f"termii status of {provider_message_id}", message_id=provider_message_id)
        match = [i for i in items if str(i.get("message_id")) == provider_message_id]
        if not match:
            return DeliveryStatus("unknown")
        raw = str(match[0].get("status", ""))
        return DeliveryStatus(delivery_state(raw), raw)

    async def _find(self, msg: Message, since: datetime, until: datetime | None) -> list[Found]:
        """The whole history, matched on receiver and exact text: Termii keeps no reference of ours."""
        what = f"termii lookup of {msg.notification_id}"
        status, items = await self._history(what)
        if status != 200:  # the list itself is missing: that says nothing about our message
            raise ProviderQueryError(f"{what}: HTTP {status}")
        start, receiver = utc_second(since), msg.to.lstrip("+")
        matches = [i for i in items if str(i.get("receiver")) == receiver and i.get("message") == msg.body
                   and _created_since(i, start) and (until is None or not _created_since(i, until))]
        matches.sort(key=lambda i: str(i.get("created_at")), reverse=True)  # "YYYY-MM-DD HH:MM:SS" sorts as text
        return [Found(str(i.get("message_id")), DeliveryStatus(delivery_state(str(i.get("status", ""))),
                                                                str(i.get("status", "")))) for i in matches]

    def verify_receipt(self, url: str, body: bytes, headers: Mapping[str, str]) -> bool:
        signature = header(headers, "X-Termii-Signature")
        expected = hmac.new(self.secret_key.encode(), body, hashlib.sha512).hexdigest()
        return signature is not None and hmac.compare_digest(signature.lower(), expected)

    def parse_receipt(self, url: str, body: bytes, headers: Mapping[str, str]) -> list[Receipt]:
        try:
            report: Any = json.loads(body)
        except ValueError:
            return []
        reports = report if isinstance(report, list) else [report]
        out = []
        for item in reports:
            if not isinstance(item, dict) or not item.get("message_id"):
                continue
            raw = str(item.get("status", ""))
            status = receipt_status(raw)
            out.append(Receipt(NAME, str(item["message_id"]), status, raw, occurred_at=_sent_at(item.get("sent_at")),
                               error_message=raw if status == "failed" else None))
        return out


def _sent_at(value: Any) -> datetime | None:
    try:
        return datetime.strptime(str(value), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def _created_since(item: Mapping[str, Any], start: datetime) -> bool:
    created = _sent_at(item.get("created_at"))  # read as UTC, like the delivery reports' sent_at
    return created is not None and created >= start
