"""SMS through Twilio with the official SDK (twilio.rest.Client and its async HTTP client).

Pointing the SDK at another host: every Messages call is built by the `Api` domain as
`Domain.absolute_url() = base_url + "/2010-04-01/Accounts/..."`, and `ApiBase.__init__` sets that `base_url` to
https://api.twilio.com. Overriding `client.api.base_url` (NOTIFY_TWILIO_BASE_URL, by default the simulator's
/twilio) therefore moves every Messages request and nothing else changes: paths, form fields, auth and error
parsing stay the SDK's. Edge/region host rewriting (TWILIO_EDGE, TWILIO_REGION) is kept off by giving the client
an environment of its own, since it would rewrite any host, ours included.

The SDK's own AsyncTwilioHttpClient is subclassed for two gaps: it passes `timeout=None` to aiohttp, which means
"no timeout at all", and TwilioRestException drops the response headers (Retry-After). Our subclass uses the
connector's session (pool size, connect and total timeouts) and keeps the raw answer in a context variable, which
is per asyncio task, so concurrent sends never see each other's answers.

Test mode (`Message.test_mode`, shadow sends): the same request with the account's test credentials
(NOTIFY_TWILIO_TEST_ACCOUNT_SID and _AUTH_TOKEN), which Twilio validates and answers like a real send and never
delivers (nor calls back).

Lookup by reference (`find`): the Messages list (GET .../Messages.json?To=...&DateSent>=YYYY-MM-DD through
`messages.list_async`), matched on the exact body, since no field of the Message resource holds our notification id.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.response import Response
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from connectors.base import (
    Connector,
    DeliveryState,
    DeliveryStatus,
    Found,
    Message,
    Outcome,
    ProviderQueryError,
    Reason,
    Receipt,
    ReceiptStatus,
    accepted,
    basic_auth,
    classify_status,
    header,
    json_object,
    limits,
    small,
    utc_second,
)
from pipeline.config import Settings

NAME = "twilio"
# Twilio error codes (https://www.twilio.com/docs/api/errors) that settle a message for good.
PERMANENT_CODES: dict[int, Reason] = {
    21211: "invalid_recipient",  # invalid 'To' phone number
    21614: "invalid_recipient",  # 'To' is not a mobile number
    21612: "invalid_recipient",  # not reachable from our 'From' number
    21408: "invalid_recipient",  # no permission to send to the region
    21610: "unsubscribed",  # the recipient replied STOP
    21602: "bad_request", 21603: "bad_request", 21604: "bad_request", 21617: "bad_request",
    20003: "auth", 20404: "bad_request",
}
TRANSIENT_CODES: dict[int, Reason] = {20429: "rate_limited", 14107: "rate_limited", 20500: "server_error",
                                      20503: "server_error", 30001: "server_error"}
STATES: dict[str, DeliveryState] = {"delivered": "delivered", "read": "delivered", "failed": "failed",
                                    "undelivered": "failed", "canceled": "failed"}
RECEIPTS: dict[str, ReceiptStatus] = {
    "accepted": "accepted", "queued": "accepted", "scheduled": "accepted", "sending": "sent", "sent": "sent",
    "delivered": "delivered", "undelivered": "failed", "failed": "failed", "canceled": "failed", "read": "opened",
}

_last_answer: ContextVar[Response | None] = ContextVar("twilio_last_answer", default=None)


def classify(status: int, body: str | Mapping[str, Any] | None, headers: Mapping[str, str] | None = None) -> Outcome:
    """A Twilio answer to "create message" as an Outcome (pure)."""
    payload = json_object(body)
    headers = headers or {}
    if 200 <= status < 300:
        sid = payload.get("sid")
        if isinstance(sid, str) and sid:
            return accepted(NAME, sid, small({k: payload.get(k) for k in ("sid", "status", "to")}))
        return Outcome("ambiguous", NAME, "server_error", error_code=str(status),
                       error_message="2xx answer without a message sid", raw=small(payload))
    code = payload.get("code") if isinstance(payload.get("code"), int) else None
    message = str(payload.get("message") or payload.get("detail") or "") or None
    if code in PERMANENT_CODES:
        return Outcome("permanent", NAME, PERMANENT_CODES[code], error_code=str(code), error_message=message,
                       raw=small(payload))
    outcome = classify_status(NAME, status, retry_after=headers.get("Retry-After"),
                              error_code=str(code) if code else None, error_message=message, raw=small(payload))
    if code in TRANSIENT_CODES and outcome.kind == "permanent":
        return Outcome("transient", NAME, TRANSIENT_CODES[code], error_code=str(code), error_message=message)
    return outcome


class _HttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]  # the twilio SDK is untyped
    def __init__(self, connector: TwilioSms) -> None:
        super().__init__(pool_connections=False)
        self._connector = connector

    async def request(self, method: str, url: str, params: dict[str, Any] | None = None,
                      data: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                      auth: tuple[str, str] | None = None, timeout: float | None = None,
                      allow_redirects: bool = False) -> Response:
        headers = dict(headers or {})
        if auth:
            headers["Authorization"] = basic_auth(*auth)
        body: bytes | None = None
        if data is not None:  # the form, encoded once here (aiohttp's FormData builds a multipart writer per call)
            body = urlencode(data, doseq=True).encode()
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        async with self._connector.session().request(
            method.upper(), url, params=params, data=body, headers=headers, allow_redirects=allow_redirects,
        ) as resp:
            answer = Response(resp.status, await resp.text(), dict(resp.headers))
        _last_answer.set(answer)
        return answer

    async def close(self) -> None:  # the session is the connector's
        return None


FIND_PAGE = 200  # messages to one number a lookup by reference reads (newest first)


class TwilioSms(Connector):
    name = NAME
    channel = "sms"
    supports_test_mode = True  # Twilio's test credentials: checked and answered like a real send, never sent

    def __init__(self, *, base_url: str, account_sid: str, auth_token: str, from_number: str,
                 status_callback_url: str | None, timeout_s: float, connect_timeout_s: float,
                 max_concurrency: int, test_account_sid: str | None = None,
                 test_auth_token: str | None = None) -> None:
        super().__init__(timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, max_concurrency=max_concurrency)
        self.from_number = from_number
        self.status_callback_url = status_callback_url
        self.validator = RequestValidator(auth_token)
        self.client = Client(account_sid, auth_token, account_sid=account_sid, http_client=_HttpClient(self),
                             environment={"NOTIFY": "twilio client without TWILIO_EDGE/TWILIO_REGION"})
        self.client.api.base_url = base_url
        # Shadow sends (Message.test_mode) go through the account's test credentials: same API, nothing delivered.
        self.test_client: Client | None = None
        if test_account_sid and test_auth_token:
            self.test_client = Client(test_account_sid, test_auth_token, account_sid=test_account_sid,
                                      http_client=_HttpClient(self),
                                      environment={"NOTIFY": "twilio client without TWILIO_EDGE/TWILIO_REGION"})
            self.test_client.api.base_url = base_url

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> TwilioSms:
        kwargs: dict[str, Any] = {
            "base_url": settings.provider_base_url(NAME), "account_sid": settings.twilio_account_sid,
            "auth_token": settings.twilio_auth_token, "from_number": settings.twilio_from,
            "status_callback_url": settings.webhook_url(NAME), "test_account_sid": settings.twilio_test_account_sid,
            "test_auth_token": settings.twilio_test_auth_token, **limits(settings),
        }
        return cls(**{**kwargs, **overrides})

    def _callback(self, notification_id: str) -> str | None:
        """StatusCallback with our notification id in the query (Twilio signs and echoes the whole URL)."""
        if not self.status_callback_url:
            return None
        joiner = "&" if urlsplit(self.status_callback_url).query else "?"
        return f"{self.status_callback_url}{joiner}{urlencode({'nid': notification_id})}"

    async def _send(self, msg: Message) -> Outcome:
        _last_answer.set(None)
        client = self.client
        if msg.test_mode:
            if self.test_client is None:
                raise ValueError("twilio: test mode needs test credentials (NOTIFY_TWILIO_TEST_ACCOUNT_SID, "
                                 "NOTIFY_TWILIO_TEST_AUTH_TOKEN)")
            client = self.test_client
        try:
            created = await client.messages.create_async(
                to=msg.to, from_=self.from_number, body=msg.body, status_callback=self._callback(msg.notification_id),
            )
        except TwilioRestException as exc:
            answer = _last_answer.get()
            if answer is not None:
                return classify(answer.status_code, answer.text, answer.headers)
            return classify(int(exc.status), {"code": exc.code, "message": exc.msg})
        except (TwilioException, ValueError, KeyError):
            # The SDK could not read an answer (e.g. a 2xx with a broken body): classify what came back, which says
            # accepted when it holds a sid and ambiguous otherwise.
            answer = _last_answer.get()
            if answer is None:
                raise
            return classify(answer.status_code, answer.text, answer.headers)
        return accepted(NAME, str(created.sid), {"sid": str(created.sid), "status": str(created.status)})

    async def _status(self, provider_message_id: str) -> DeliveryStatus:
        try:
            message = await self.client.messages(provider_message_id).fetch_async()
        except TwilioRestException as exc:
            if int(exc.status) == 404:
                return DeliveryStatus("unknown", error_code=str(exc.code), error_message=str(exc.msg))
            raise ProviderQueryError(f"twilio status of {provider_message_id}: HTTP {exc.status} {exc.msg}") from exc
        return _delivery_status(message)

    async def _find(self, msg: Message, since: datetime, until: datetime | None) -> list[Found]:
        """The newest message to msg.to created since `since` with exactly msg.body: the Message resource holds
        none of our reference (the StatusCallback URL is not in it).

        Filtered by To only, never by DateSent: a message still in Twilio's queue has no date_sent and a DateSent
        filter would leave it out, so a reconciler would take "queued at Twilio" for "never arrived" and send again.
        The list is newest first; when a full page is all newer than `since` ours may be further back, so the
        lookup cannot tell rather than answering "not there".
        """
        start = utc_second(since)
        try:
            listed = await self.client.messages.list_async(to=msg.to, limit=FIND_PAGE, page_size=FIND_PAGE)
        except (TwilioException, ValueError, KeyError) as exc:  # non-200 ("Unable to fetch page") or unreadable
            raise ProviderQueryError(f"twilio lookup of {msg.notification_id}: {exc}") from exc
        recent = [m for m in listed if m.date_created is not None and m.date_created >= start]
        matches = [m for m in recent if m.body == msg.body and (until is None or m.date_created <= until)]
        if not matches:
            if len(listed) >= FIND_PAGE and len(recent) == len(listed):
                raise ProviderQueryError(f"twilio lookup of {msg.notification_id}: more than {FIND_PAGE} messages "
                                         f"to {msg.to} since {start.isoformat()}")
            return []
        matches.sort(key=lambda m: m.date_created, reverse=True)
        return [Found(str(m.sid), _delivery_status(m)) for m in matches]

    def verify_receipt(self, url: str, body: bytes, headers: Mapping[str, str]) -> bool:
        signature = header(headers, "X-Twilio-Signature")
        params = dict(parse_qsl(body.decode(), keep_blank_values=True))
        return signature is not None and bool(self.validator.validate(url, params, signature))

    def parse_receipt(self, url: str, body: bytes, headers: Mapping[str, str]) -> list[Receipt]:
        params = dict(parse_qsl(body.decode(), keep_blank_values=True))
        sid = params.get("MessageSid") or params.get("SmsSid")
        if not sid:
            return []
        raw = params.get("MessageStatus") or params.get("SmsStatus") or ""
        nid = parse_qs(urlsplit(url).query).get("nid", [None])[0]
        return [Receipt(NAME, sid, RECEIPTS.get(raw, "other"), raw, notification_id=nid,
                        error_code=params.get("ErrorCode") or None, error_message=params.get("ErrorMessage"))]


def _delivery_status(message: Any) -> DeliveryStatus:
    """A Twilio MessageInstance's status as ours (fetched or listed)."""
    raw = str(message.status)
    code = str(message.error_code) if message.error_code else None
    return DeliveryStatus(STATES.get(raw, "pending"), raw, code,
                          str(message.error_message) if message.error_message else None)
